"""Behaviour of the DiDi-Instruct iteration that a wrong sign cannot fake (docs/method.md §6-§7).

* A fixed discriminator that prefers token k (its logit at every position grows with the share
  of k among the visible tokens) makes a few iterations raise the student's probability of k;
  the reversed preference lowers it.
* The discriminator's own update lowers its loss on the batch it was computed on.
* With zero advantages, the teacher KL pulls a perturbed student back towards the teacher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import diffusion
from didi_jax.distill import didi as distill
from didi_jax.models.discriminator import Spectral
from didi_jax.models.dit import DiT
from didi_jax.train import distill_state as ds
from tests.test_distill import distill_cfg

VOCAB, LENGTH = 8, 8
MASK = VOCAB - 1
TOKEN = 2                     # the token the fixed discriminator prefers (or avoids)
JIT_OPTS = {'xla_backend_optimization_level': 0}


class PreferenceDisc(nnx.Module):
  """A fixed analytic discriminator: logit_i = β · (share of `token` among visible tokens).

  It has the discriminator's call signature, so it runs through the real step unchanged.
  """

  def __init__(self, beta: float, token: int):
    self.beta = nnx.Param(jnp.asarray(beta, jnp.float32))
    self.token = token

  def __call__(self, x, sigma_B, *, update_spectral=False, dropout_key=None):
    del sigma_B, update_spectral, dropout_key
    visible = (x != MASK).astype(jnp.float32)
    share = jnp.sum(visible * (x == self.token), -1) / jnp.maximum(1.0, jnp.sum(visible, -1))
    return jnp.broadcast_to((self.beta[...] * share)[:, None], x.shape)


def make_cfg(**overrides):
  return distill_cfg(VOCAB, LENGTH, (16, 1, 2, 32, 8), **{
      'batch_size': 8, 'num_iterations': 100, 'loss_chunk_len': 0,
      'optim.student.warmup_steps': 1, 'optim.disc.warmup_steps': 1,
      'optim.student.lr': 1e-2, 'optim.disc.lr': 0.0,
      'kl.coef_hi': 0.0, 'kl.coef_lo': 0.0, 'entropy_coef': 0.0, **overrides})


def random_teacher(cfg, seed=0, scale=0.3):
  params = nnx.state(DiT(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param)
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def state_with_disc(cfg, teacher, disc: nnx.Module, student=None):
  graphdef, train, frozen, spectral = nnx.split(disc, nnx.Param, nnx.Nothing, Spectral)
  tx_student, tx_disc = ds.make_optimizers(cfg)
  student = teacher if student is None else student
  copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)
  state = ds.DistillState(step=jnp.zeros((), jnp.int32), student=copy(student),
                          ema=copy(student), disc_train=train, disc_frozen=frozen,
                          spectral=spectral, opt_student=tx_student.init(student),
                          opt_disc=tx_disc.init(train))
  return state, graphdef


def first_step_probs(cfg, params) -> np.ndarray:
  """The student's SUBS distribution at the all-[MASK] input (L, V), from the model itself."""
  model = nnx.merge(ds.make_graphdefs(cfg)[0], params)
  x = jnp.full((1, LENGTH), MASK, jnp.int32)
  logp = diffusion.subs_logprobs(model(x, jnp.zeros((1,))), x, MASK)
  return np.exp(np.asarray(logp, np.float64))[0]


def run(cfg, state, graphdef, teacher, iterations, key=0):
  step = jax.jit(distill.make_distill_step(cfg, ds.make_graphdefs(cfg)[0], graphdef),
                 compiler_options=JIT_OPTS)
  x_data = jax.random.randint(jax.random.key(9), (cfg.distill.batch_size, LENGTH), 0, MASK)
  history = []
  for _ in range(iterations):
    state, metrics = step(state, teacher, x_data, jax.random.key(key))
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


@pytest.mark.parametrize('beta', [4.0, -4.0])
def test_fixed_discriminator_preference_moves_the_student(beta):
  cfg = make_cfg()
  teacher = random_teacher(cfg)
  state, graphdef = state_with_disc(cfg, teacher, PreferenceDisc(beta, TOKEN))
  p0 = first_step_probs(cfg, state.student)[:, TOKEN].mean()
  state, history = run(cfg, state, graphdef, teacher, iterations=8)
  p1 = first_step_probs(cfg, state.student)[:, TOKEN].mean()
  # The discriminator is fixed (lr 0) and its rewards carry the preference.
  assert float(state.disc_train['beta'][...]) == beta
  assert all(h['reward_std'] > 0 for h in history)
  # Moved in the preferred direction by a factor, far beyond any drift.
  print(f'beta={beta}: p(token) {p0:.4f} -> {p1:.4f}')
  if beta > 0:
    assert p1 > 2 * p0, (p0, p1)
  else:
    assert p1 < 0.5 * p0, (p0, p1)


def test_discriminator_update_lowers_its_loss_on_the_same_batch():
  cfg = make_cfg(**{'optim.disc.lr': 1e-3, 'optim.student.lr': 0.0})
  cfg.distill.disc_unfreeze_blocks = 1
  teacher = random_teacher(cfg)
  state = ds.init_distill_state(cfg, teacher, jax.random.key(1))
  sgd, dgd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd, with_aux=True),
                 compiler_options=JIT_OPTS)
  x_data = jax.random.randint(jax.random.key(9), (cfg.distill.batch_size, LENGTH), 0, MASK)
  d = cfg.distill
  for it in range(3):
    new, metrics, aux = step(state, teacher, x_data, jax.random.key(3))
    N = aux['z_real_NxL'].shape[0]
    z = jnp.concatenate([aux['z_real_NxL'], aux['z_fake_NxL']])
    sig = diffusion.sigma(jnp.concatenate([aux['t_c_N'], aux['t_c_N']]))

    def loss_at(disc_train, spectral):
      disc = nnx.merge(dgd, disc_train, state.disc_frozen, spectral)
      out = np.asarray(disc(z, sig), np.float64)
      mk = np.asarray(z == MASK)
      bce = lambda x, y: np.logaddexp(0, x) - y * x
      side = lambda o, m, y: (m * bce(o, y)).sum() / m.sum()
      return 0.5 * (side(out[:N], mk[:N], 1 - d.label_smoothing)
                    + side(out[N:], mk[N:], d.label_smoothing))
    before = loss_at(state.disc_train, new.spectral)   # the loss the update descended
    after = loss_at(new.disc_train, new.spectral)
    np.testing.assert_allclose(before, float(metrics['d_loss']), rtol=1e-5)
    assert after < before - 1e-4, (it, before, after)
    state = new


def test_teacher_kl_pulls_a_perturbed_student_back():
  cfg = make_cfg(**{'kl.coef_hi': 1.0, 'kl.coef_lo': 1.0, 'optim.student.lr': 3e-3})
  teacher = random_teacher(cfg)
  leaves, tdef = jax.tree.flatten(teacher)
  keys = jax.random.split(jax.random.key(42), len(leaves))
  student = jax.tree.unflatten(tdef, [x + 0.2 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])
  # β = 0: every reward is 0 up to rounding, so the advantages vanish and only the KL moves θ.
  state, graphdef = state_with_disc(cfg, teacher, PreferenceDisc(0.0, TOKEN), student)

  def jeffrey_at_all_mask(params):
    p_T, p_S = first_step_probs(cfg, teacher), first_step_probs(cfg, params)
    ok = p_T > 0
    kl = lambda a, b: np.sum(np.where(ok, a * (np.log(np.where(ok, a, 1)) -
                                               np.log(np.where(ok, b, 1))), 0), -1)
    return float(np.mean(0.5 * kl(p_T, p_S) + 0.5 * kl(p_S, p_T)))
  kl0 = jeffrey_at_all_mask(state.student)
  state, history = run(cfg, state, graphdef, teacher, iterations=10)
  kl1 = jeffrey_at_all_mask(state.student)
  # β = 0 gives log-odds of ~1e-7 rounding noise, which the spread floor keeps from becoming
  # advantages (docs/method.md §7.2): |A| ≤ 1e-3 while the KL terms are O(0.1).
  assert all(h['adv_floor_frac'] == 1.0 and h['adv_zmax'] < 1e-2 for h in history), history[0]
  np.testing.assert_allclose(history[0]['kl_hi'], kl0, rtol=1e-4)
  assert kl0 > 0.05 and kl1 < 0.5 * kl0, (kl0, kl1)
  assert history[-1]['kl_lo'] < history[0]['kl_lo']
