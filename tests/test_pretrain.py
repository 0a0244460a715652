"""Pre-training step: sharded equals single-device; kill/resume equals uninterrupted."""
import numpy as np
import jax
import pytest

from didi_jax import config as config_lib
from didi_jax import parallel
from didi_jax.train import pretrain


def small_cfg(kind='dit'):
  cfg = config_lib.base_config()
  cfg.data.tokenizer = 'byte'
  cfg.data.source = 'shakespeare'
  cfg.model = config_lib.model_config('tiny', vocab_size=258, length=16)
  cfg.model.compute_dtype = 'float32'
  cfg.model.dropout = 0.1
  cfg.pretrain.batch_size = 8
  cfg.pretrain.warmup_steps = 2
  cfg.pretrain.lr = 0.1
  cfg.pretrain.eps = 1.0      # Adam's sign-like first steps would amplify float noise: keep updates smooth
  return cfg


def run_steps(cfg, devices, mesh, n=3):
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  tr = pretrain.Trainer(cfg, '/tmp/unused', devices=devices)
  state = tr.fresh_state()
  # Zero-initialised adaLN/output weights give exactly-zero or float-noise gradients at first,
  # which Adam normalises into noise; start from a perturbed (identical) point instead.
  leaves, treedef = jax.tree.flatten(state['params'])
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  leaves = [jax.device_put(np.asarray(x) + 0.05 * np.asarray(jax.random.normal(k, x.shape)),
                           x.sharding) for x, k in zip(leaves, keys)]
  state['params'] = jax.tree.unflatten(treedef, leaves)
  rng = np.random.RandomState(0)
  losses = []
  for _ in range(n):
    x = rng.randint(0, 257, (8, 16)).astype(np.int32)
    state, m = tr.train_step(state, parallel.global_batch(tr.mesh, x), tr.run_key)
    losses.append(float(m['loss']))
  return losses, jax.device_get(state['params'])


def test_sharded_step_equals_single_device():
  devices = jax.devices()
  assert len(devices) == 8, 'tests expect 8 fake CPU devices (see tests/conftest.py)'
  l1, p1 = run_steps(small_cfg(), devices[:1], (1, 1, 1))
  l8, p8 = run_steps(small_cfg(), devices, (2, 2, 2))
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  assert l1[0] != l1[2]


def test_params_are_born_sharded():
  cfg = small_cfg()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  tr = pretrain.Trainer(cfg, '/tmp/unused')
  state = tr.fresh_state()
  qkv = state['params']['blocks'][0]['attn_qkv']['kernel'][...]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert len(qkv.addressable_shards) == 8
  assert qkv.addressable_shards[0].data.shape == (32, 96)


def test_ema_warmup_and_lr_closed_form():
  """EMA with MDLM's warm-up: ema_{n+1} = ema_n + (1 − d_n)(θ_{n+1} − ema_n),
  d_n = min(decay, (1 + n)/(10 + n)) for 0-based step n; lr_n = P·min(1, (n + 1)/W)
  (docs/method.md §4)."""
  cfg = small_cfg()
  cfg.pretrain.ema_decay = 0.2         # the cap binds from n = 2 on: (1+2)/(10+2) = 0.25 > 0.2
  tr = pretrain.Trainer(cfg, '/tmp/unused', devices=jax.devices()[:1])
  state = tr.fresh_state()
  rng = np.random.RandomState(0)
  ema = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state['ema']))]
  for n in range(4):
    x = rng.randint(0, 257, (8, 16)).astype(np.int32)
    state, m = tr.train_step(state, parallel.global_batch(tr.mesh, x), tr.run_key)
    theta = [np.asarray(p, np.float64) for p in jax.tree.leaves(jax.device_get(state['params']))]
    d = min(0.2, (1 + n) / (10 + n))
    ema = [e + (1 - d) * (t - e) for e, t in zip(ema, theta)]
    got = [np.asarray(e) for e in jax.tree.leaves(jax.device_get(state['ema']))]
    for a, b in zip(got, ema):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m['lr']), 0.1 * min(1.0, (n + 1) / 2), rtol=1e-6)
  # The EMA differs from the parameters (the warm-up did not collapse it onto θ).
  assert max(float(np.abs(a - b).max()) for a, b in zip(ema, theta)) > 1e-4
