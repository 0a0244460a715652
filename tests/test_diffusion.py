"""Schedule, masking, SUBS, NELBO, DiT invariants, configs."""
import glob
import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import diffusion
from didi_jax.checkpoint import exporter
from didi_jax.models.discriminator import Discriminator, trainable_mask
from didi_jax.models import dit as dit_lib
from didi_jax.models.dit import DiT, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_dit_numpy as ref  # noqa: E402  pylint: disable=wrong-import-position


def tiny_cfg(vocab=20, length=8, dtype='float32'):
  cfg = config_lib.model_config('tiny', vocab_size=vocab, length=length)
  cfg.compute_dtype = dtype
  return cfg


def randomize(model, seed=0, scale=0.2):
  """Makes zero-initialised weights (adaLN, output layer) non-zero so tests mean something."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


# Tiny programs: XLA's LLVM optimisation dominates the runtime, so skip it (same semantics).
_FAST = {'xla_backend_optimization_level': 0}


def built(cls, cfg, seed=0, scale=0.2):
  """`randomize(cls(cfg))` built inside one jit (eager construction compiles op by op)."""
  make = lambda: randomize(cls(cfg, rngs=nnx.Rngs(seed)), seed, scale)  # noqa: E731
  graphdef = nnx.split(nnx.eval_shape(make))[0]
  return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1], compiler_options=_FAST)())


def jitted(model):
  """model(x, σ, soft_input=...) as one jitted program per input kind."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, x, s, soft: nnx.merge(graphdef, st)(x, s, soft_input=soft),
               static_argnums=3, compiler_options=_FAST)
  return lambda x, s, soft_input='logits': np.asarray(fn(state, x, s, soft_input))


def test_schedule_closed_forms():
  t = jnp.linspace(0.01, 1.0, 50)
  np.testing.assert_allclose(diffusion.alpha(t), 1 - 0.999 * t, rtol=1e-6)
  np.testing.assert_allclose(diffusion.sigma(t), -np.log(1 - 0.999 * np.asarray(t)), rtol=1e-5)
  np.testing.assert_allclose(diffusion.loss_weight(t), 1.0 / np.asarray(t), rtol=1e-5)
  assert abs(float(diffusion.alpha(1.0)) - 1e-3) < 1e-9
  assert abs(float(diffusion.sigma(1.0)) - 6.9078) < 1e-4


def test_masking_rate_matches_schedule():
  key = jax.random.PRNGKey(0)
  x = jnp.zeros((4, 20000), jnp.int32)
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  z = diffusion.forward_mask(key, x, t, mask_id=9)
  rate = np.asarray(jnp.mean(z == 9, axis=1))
  want = 1 - np.asarray(diffusion.alpha(t))
  sd = np.sqrt(want * (1 - want) / 20000)
  assert np.all(np.abs(rate - want) < 5 * sd + 1e-6)


def test_antithetic_times_cover_unit_interval():
  t = np.sort(np.asarray(diffusion.antithetic_times(jax.random.PRNGKey(3), 8)))
  u = (t - 1e-3) / (1 - 1e-3)
  np.testing.assert_allclose(np.diff(u), 1 / 8, atol=1e-6)


def test_subs_excludes_mask_and_carries_revealed():
  V, m = 6, 5
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, V))
  z = jnp.array([[m, 1, m, 3], [0, m, m, m]])
  lp = np.asarray(diffusion.subs_logprobs(logits, z, m))
  p = np.exp(lp)
  assert np.all(p[..., m] == 0)                      # [MASK] never predicted
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  for b in range(2):
    for i in range(4):
      if int(z[b, i]) != m:
        assert p[b, i, int(z[b, i])] == 1.0            # carry-over
  ref = np.asarray(logits[0, 0, :m]) - np.log(np.exp(np.asarray(logits[0, 0, :m])).sum())
  np.testing.assert_allclose(lp[0, 0, :m], ref, rtol=1e-5)


def test_nelbo_matches_numpy_on_tiny_model():
  cfg = tiny_cfg()
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  m = cfg.vocab_size - 1
  key = jax.random.PRNGKey(1)
  x = jax.random.randint(key, (3, 8), 0, m)
  t = jnp.array([0.2, 0.5, 0.9])
  z = diffusion.forward_mask(jax.random.PRNGKey(2), x, t, m)
  logits = model(z, jnp.zeros(3))
  got = np.asarray(diffusion.nelbo_per_token(logits, z, x, t, m))
  lg = np.asarray(logits, np.float64)
  lg[..., m] = -np.inf
  logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      lg.max(-1, keepdims=True)
  xn, zn, tn = np.asarray(x), np.asarray(z), np.asarray(t)
  want = np.zeros(xn.shape)
  for b in range(3):
    for i in range(8):
      if zn[b, i] == m:
        want[b, i] = -(1.0 / tn[b]) * logp[b, i, xn[b, i]]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fresh_dit_outputs_zero_logits():
  cfg = tiny_cfg()
  model = DiT(cfg, rngs=nnx.Rngs(0))
  out = model(jnp.zeros((2, 8), jnp.int32), jnp.array([0.0, 1.0]))
  assert out.shape == (2, 8, cfg.vocab_size)
  assert float(jnp.max(jnp.abs(out))) == 0.0


def test_soft_onehot_input_reproduces_id_input():
  """Official contract: a soft input is logits, so one-hot·1e9 logits (as the official RGAS feeds
  revealed tokens) reproduce the id input; the named 'probs' path reproduces it from the one-hot
  probabilities; a unit one-hot read as logits is a different (softmax-smoothed) input."""
  cfg = tiny_cfg()
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, cfg.vocab_size)
  sigma = jnp.array([0.0, 1.3])
  onehot = jax.nn.one_hot(ids, cfg.vocab_size)
  model = built(DiT, cfg, 0)
  for net in (jitted(model), jitted(built(Discriminator, cfg, 1))):
    a = net(ids, sigma)
    assert float(np.max(np.abs(a))) > 0.1
    np.testing.assert_allclose(net(1e9 * onehot, sigma), a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(net(onehot, sigma, soft_input='probs'), a)
    assert float(np.max(np.abs(net(onehot, sigma) - a))) > 1e-2
  with pytest.raises(ValueError, match="soft_input='prob' is not valid"):
    model(onehot, sigma, soft_input='prob')


SIGMAS = np.array([0.0, 1e-3, 0.37, 2.0, 6.907755], np.float32)   # 6.9078 = σ(t = 1)


def phi_numpy(sigma_B):
  """φ(σ) = [cos(σ f_k)]_{k<128} ++ [sin(σ f_k)]_{k<128}, f_k = exp(−ln(10000)·k/128) (float64)."""
  f = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  arg = np.asarray(sigma_B, np.float64)[:, None] * f[None]
  return np.concatenate([np.cos(arg), np.sin(arg)], axis=-1)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def test_sigma_conditioning_closed_form():
  """φ(σ), c = SiLU(W2·SiLU(W1·φ + b1) + b2) and the whole DiT against NumPy (docs/method.md
  §3.2 steps 2, 4, 5), at several σ including 0."""
  got_phi = np.asarray(dit_lib.timestep_features(jnp.asarray(SIGMAS)))
  want_phi = phi_numpy(SIGMAS)
  assert got_phi.shape == (len(SIGMAS), 256) and got_phi.dtype == np.float32
  np.testing.assert_allclose(got_phi, want_phi, rtol=0, atol=2e-6)
  np.testing.assert_array_equal(got_phi[0], np.r_[np.ones(128), np.zeros(128)])   # σ = 0
  assert got_phi[1, 0] == np.float32(math.cos(1e-3)) and got_phi[1, 128] > 0      # cos first

  cfg = tiny_cfg()
  model = built(DiT, cfg, 0, scale=0.5)
  sm = model.sigma_map
  w1, b1 = np.asarray(sm.mlp_0.kernel[...], np.float64), np.asarray(sm.mlp_0.bias[...], np.float64)
  w2, b2 = np.asarray(sm.mlp_2.kernel[...], np.float64), np.asarray(sm.mlp_2.bias[...], np.float64)
  assert w1.shape == (256, cfg.cond_dim)                # kernel (in, out) = W1ᵀ
  want_c = _silu(_silu(want_phi @ w1 + b1) @ w2 + b2)
  got_c = np.asarray(jax.nn.silu(sm(jnp.asarray(SIGMAS))))   # the DiT applies the outer SiLU
  np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-6)
  assert np.min(np.max(np.abs(want_c[1:] - want_c[:1]), axis=1)) > 1e-6       # c moves with σ
  # At σ = 0 the sin half of W1 is multiplied by 0: c(0) does not see it, c(σ > 0) does.
  c0 = np.asarray(sm(jnp.zeros(1)))
  sm.mlp_0.kernel[...] = sm.mlp_0.kernel[...].at[128:].multiply(-3.0)
  np.testing.assert_array_equal(np.asarray(sm(jnp.zeros(1))), c0)
  assert float(np.max(np.abs(np.asarray(sm(jnp.asarray(SIGMAS[3:4]))) - want_c[3:4]))) > 1e-2
  sm.mlp_0.kernel[...] = sm.mlp_0.kernel[...].at[128:].divide(-3.0)

  # The whole DiT (random adaLN weights, so σ reaches every block and the output layer) against
  # the independent NumPy forward of the official model, on ids and on soft-input logits.
  tensors = exporter.to_official(model, model_cfg=cfg)
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (len(SIGMAS), 8), 0, cfg.vocab_size))
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (len(SIGMAS), 8, cfg.vocab_size)))
  net = jitted(model)
  for x in (ids, logits):
    got = net(jnp.asarray(x), jnp.asarray(SIGMAS))
    want = ref.dit_forward(tensors, x, SIGMAS, cfg.n_heads)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
  # σ matters (the comparison above is not blind to it): same ids, different σ, different logits.
  same = np.broadcast_to(ids[:1], ids.shape)
  by_sigma = net(jnp.asarray(same), jnp.asarray(SIGMAS))
  np.testing.assert_allclose(by_sigma, ref.dit_forward(tensors, same, SIGMAS, cfg.n_heads),
                             rtol=0, atol=1e-4 * float(np.max(np.abs(by_sigma))))
  assert np.min(np.max(np.abs(by_sigma[1:] - by_sigma[:1]), axis=(1, 2))) > 1e-4


def test_sigma_conditioning_changes_output_only_when_trained():
  """A fresh DiT's adaLN weights are zero, so σ cannot reach the output (all-zero logits at any
  σ); once they are non-zero, σ changes the output."""
  cfg = tiny_cfg()
  ids = jnp.zeros((1, 8), jnp.int32)
  fresh = jitted(built(DiT, cfg, 0, scale=0.0))
  a, b = fresh(ids, jnp.array([0.0])), fresh(ids, jnp.array([2.0]))
  assert float(np.max(np.abs(a))) == 0.0 and float(np.max(np.abs(b))) == 0.0
  model = jitted(built(DiT, cfg, 0))
  a, b = model(ids, jnp.array([0.0])), model(ids, jnp.array([2.0]))
  assert float(np.max(np.abs(a - b))) > 1e-4


def test_param_counts_match_official():
  small = config_lib.model_config('small')
  dit = nnx.eval_shape(lambda: DiT(small, rngs=nnx.Rngs(0)))
  assert count_params(dit) == 169_627_218
  disc = nnx.eval_shape(lambda: Discriminator(small, rngs=nnx.Rngs(0)))
  assert count_params(disc) == 131_371_265
  params = nnx.state(disc, nnx.Param)
  mask = trainable_mask(params, 12, 4)
  n = sum(int(x.size) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if t)
  assert n == 31_302_145
  medium = config_lib.model_config('medium')
  assert count_params(nnx.eval_shape(lambda: DiT(medium, rngs=nnx.Rngs(0)))) == 424_477_010


def _config_files():
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.__doc__ or ''
    presets = ['']
    for line in doc.splitlines():
      words = line.split()
      if words and words[0].isidentifier() and words[0] not in ('python', 'Presets') and \
          line.startswith('  ') and not line.startswith('     '):
        presets.append(words[0])
    out += [(path, mod, p) for p in dict.fromkeys(presets)]
  return out


@pytest.mark.parametrize('path,mod,preset', _config_files(),
                         ids=lambda v: os.path.basename(v) if isinstance(v, str) else None)
def test_every_config_and_preset_validates(path, mod, preset):
  del path
  cfg = mod.get_config(preset)
  if cfg.teacher.checkpoint and not os.path.exists(cfg.teacher.checkpoint):
    cfg.teacher.checkpoint = ''           # shipped asset checked separately
  config_lib.validate(cfg)


def test_bad_configs_give_one_line_errors():
  cfg = config_lib.base_config()
  cfg.job = 'fly'
  with pytest.raises(config_lib.ConfigError, match=r"--config.job='fly' is not valid"):
    config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.model.vocab_size = 50257
  with pytest.raises(config_lib.ConfigError, match='model.vocab_size=50258'):
    config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.teacher.checkpoint = '/nope/teacher.ckpt'
  with pytest.raises(config_lib.ConfigError, match='does not exist'):
    config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.data.source, cfg.data.paths = 'text', ''
  with pytest.raises(config_lib.ConfigError, match='data.paths'):
    config_lib.validate(cfg)
  with pytest.raises(AttributeError):
    cfg.model.nope = 1 if cfg.is_locked else cfg.lock().model.__setattr__('nope', 1)


def test_every_config_field_is_documented():
  """Every field of base_config() / model_config() is set on a line that carries a comment
  (what it does, its unit or range, the paper's value where one exists)."""
  import inspect
  import re
  src = inspect.getsource(config_lib)
  cfg = config_lib.base_config()

  def leaves(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from leaves(v, prefix + k + '.')
      else:
        yield prefix + k
  missing = []
  for key in leaves(cfg.to_dict()):
    name = key.split('.')[-1]
    if key in ('model', 'seed', 'job'):
      continue
    lines = [ln for ln in src.splitlines()
             if re.search(rf'(^|[\s(,]){re.escape(name)}=', ln) and 'ConfigDict' not in ln]
    if not any('#' in ln for ln in lines):
      missing.append(key)
  assert not missing, f'config fields without a comment: {missing}'
  assert 'wandb' not in cfg.logging        # no field that nothing reads
