"""The discriminator's frozen blocks run once per DiDi iteration (docs/method.md §7.4).

`prefix` / `from_prefix` split one discriminator call at a block boundary (DiT and ESM), and a
step with dropout keeps the per-call path (its update draws dropout, its reward pass does not).
The dropout-free step with the shared prefix is pinned by value in tests/test_distill_reference.py
(d_real, d_fake and d_reward against NumPy).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import diffusion, models
from didi_jax.distill import didi as distill
from didi_jax.train import distill_state as ds
from tests.test_distill import LENGTH, MASK, teacher_params, tiny_cfg


def perturbed(module, seed):
  """Every parameter moved by N(0, 0.3²), so zero-initialised layers contribute too."""
  gd, params, rest = nnx.split(module, nnx.Param, ...)
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return nnx.merge(gd, params, rest)


def dit_model_cfg():
  return tiny_cfg().model


def esm_model_cfg():
  m = config_lib.model_config('tiny', vocab_size=34, length=LENGTH)
  m.kind, m.compute_dtype = 'esm', 'float32'
  m.hidden_size, m.n_blocks, m.n_heads, m.mlp_dim = 32, 3, 4, 64
  m.esm.pad_token_id = 1
  return m


@pytest.mark.parametrize('make_cfg', [dit_model_cfg, esm_model_cfg], ids=['dit', 'esm'])
def test_prefix_then_rest_is_the_whole_call(make_cfg):
  m = make_cfg()
  disc = perturbed(models.build(m, 'discriminator', seed=3), 4)
  ids = jax.random.randint(jax.random.key(5), (3, LENGTH), 0, m.vocab_size)
  ids = ids.at[:, 1].set(m.vocab_size - 1)             # some [MASK] inputs
  sigma = jnp.array([0.1, 1.0, 3.0], jnp.float32)
  whole = np.asarray(disc(ids, sigma))
  assert np.std(whole) > 1e-3
  for k in range(m.n_blocks + 1):
    carry = disc.prefix(ids, sigma, k)
    # The carry is the trunk after k blocks, and the rest of the call finishes it.
    np.testing.assert_allclose(np.asarray(disc.trunk_output(carry)[0]),
                               np.asarray(disc.trunk(ids, sigma, num_blocks=k)[0]),
                               rtol=1e-6, atol=1e-6, err_msg=f'trunk after {k} blocks')
    np.testing.assert_allclose(np.asarray(disc.from_prefix(carry, k)), whole, rtol=1e-5,
                               atol=1e-5, err_msg=f'split after {k} blocks')
    # Rows of a carry are independent: the reward pass reads the fake half of the update's.
    half = jax.tree.map(lambda a: a[1:], carry)
    np.testing.assert_allclose(np.asarray(disc.from_prefix(half, k)), whole[1:], rtol=1e-5,
                               atol=1e-5)


def test_shared_only_without_dropout():
  assert distill.shares_disc_prefix(tiny_cfg().distill)
  assert not distill.shares_disc_prefix(tiny_cfg(dropout=0.3).distill)


def test_step_with_dropout_draws_it_in_the_update_only():
  """With distill.dropout > 0 the update's forward (frozen blocks included) uses the step's
  dropout key and the reward pass none, exactly as written in `make_distill_step`."""
  cfg = tiny_cfg(dropout=0.3)
  d = cfg.distill
  teacher = teacher_params(cfg)
  state = ds.init_distill_state(cfg, teacher, jax.random.key(1))
  sgd, dgd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd, with_aux=True))
  x_data = jax.random.randint(jax.random.key(2), (d.batch_size, LENGTH), 0, MASK)
  key = jax.random.key(6)
  new, _, aux = step(state, teacher, x_data, key)

  # The step's key derivation for the discriminator's dropout.
  key_drop = jax.random.split(jax.random.fold_in(key, state.step), 8)[7]
  key_drop_disc = jax.random.split(key_drop, 5)[4]
  sig = diffusion.sigma(aux['t_c_N'])
  z_2N = jnp.concatenate([aux['z_real_NxL'], aux['z_fake_NxL']])
  old = nnx.merge(dgd, state.disc_train, state.disc_frozen, state.spectral, copy=True)
  d_2N = np.asarray(old(z_2N, jnp.concatenate([sig, sig]), update_spectral=True,
                        dropout_key=key_drop_disc))
  n = aux['z_fake_NxL'].shape[0]
  np.testing.assert_allclose(np.asarray(aux['d_real_NxL']), d_2N[:n], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux['d_fake_NxL']), d_2N[n:], rtol=1e-5, atol=1e-5)
  # ... and dropout did act on the update's forward.
  plain = np.asarray(nnx.merge(dgd, state.disc_train, state.disc_frozen, state.spectral)(
      aux['z_fake_NxL'], sig))
  assert np.max(np.abs(plain - d_2N[n:])) > 1e-3

  # The reward pass: the updated discriminator without dropout (float32, jitted vs eager:
  # differences ~1e-4; dropout's are ~1).
  upd = nnx.merge(dgd, new.disc_train, new.disc_frozen, new.spectral)
  np.testing.assert_allclose(np.asarray(aux['d_reward_NxL']),
                             np.asarray(upd(aux['z_fake_NxL'], sig)), rtol=1e-4, atol=5e-4)
