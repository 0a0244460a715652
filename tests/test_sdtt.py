"""SDTT (didi_jax/distill/sdtt.py, train/sdtt_loop.py; docs/method.md §14).

The time grid and round schedule in closed form, the divergences' direction against NumPy, one
jitted iteration against the independent NumPy reference (tests/reference_sdtt_numpy.py: target,
loss, gradient along a direction, EMA), the round hand-off bit for bit, a run stopped in the middle
of a round that resumes to the same losses, the round-end checkpoint and the teacher that follows
it, and the one loader on the run directory.
"""
from __future__ import annotations

import copy
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import didi_jax
from didi_jax import config as config_lib
from didi_jax import errors
from didi_jax import main as cli
from didi_jax import parallel
from didi_jax.checkpoint import loader
from didi_jax.checkpoint.manager import Manager
from didi_jax.distill import sdtt
from didi_jax.models.dit import DiT
from didi_jax.train import common, distill_loop, sdtt_loop
from tests import reference_sdtt_numpy as ref
from tests.reference_distill_numpy import to_official
from tests.test_cli import read_metrics, smoke_cfg
from tests.test_distill import distill_cfg, set_dotted
from tests.test_distill_reference import flat_np, randomised

VOCAB, LENGTH, BATCH = 10, 8, 4
MASK = VOCAB - 1
DIMS = (8, 2, 2, 16, 4)


def sdtt_cfg(**over):
  cfg = distill_cfg(VOCAB, LENGTH, DIMS)
  cfg.distill.method = 'sdtt'
  set_dotted(cfg.distill.sdtt, {'rounds': 2, 'round_iterations': 2, 'teacher_steps': 8,
                                'batch_size': BATCH, 'lr': 1e-2, 'warmup_steps': 1,
                                'ema_decay': 0.9, **over})
  return cfg


# ------------------------------------------------------------------------------- schedule


def test_time_grid_and_round_schedule():
  s = sdtt_cfg(rounds=3, round_iterations=5, teacher_steps=64).distill.sdtt
  assert sdtt.total_iterations(s) == 15
  # Round r: Δ = 2^r / 64 and the teacher takes 64 / 2^r steps.
  for k, (r, delta) in {0: (0, 1 / 64), 4: (0, 1 / 64), 5: (1, 2 / 64), 14: (2, 4 / 64)}.items():
    assert int(sdtt.round_of(k, s)) == r
    assert float(sdtt.step_size(k, s)) == pytest.approx(delta, rel=1e-7)
  assert [sdtt.teacher_steps(r, s) for r in range(3)] == [64, 32, 16]
  assert [k for k in range(16) if sdtt.is_round_start(k, s)] == [5, 10, 15]
  # τ_i = max(t − iΔ, t_min) -> max(τ_i − Δ, 0): [t, t − Δ], not the released code's
  # [0.749, 0.249] at t = 0.5.
  t = jnp.array([0.5, 0.3, 0.1, 1.0])
  (tau0, s0), (tau1, s1) = sdtt.teacher_times(t, 0.25, 1e-5)
  np.testing.assert_allclose(tau0, [0.5, 0.3, 0.1, 1.0], rtol=1e-6)
  np.testing.assert_allclose(s0, [0.25, 0.05, 0.0, 0.75], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(tau1, [0.25, 0.05, 1e-5, 0.75], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s1, [0.0, 0.0, 0.0, 0.5], rtol=1e-6, atol=1e-7)


def test_sdtt_settings_are_checked_in_one_line():
  def cfg_with(**over):
    cfg = config_lib.base_config()
    cfg.distill.method = 'sdtt'
    set_dotted(cfg.distill.sdtt, over)
    return cfg
  config_lib.validate(cfg_with())                          # the defaults: the paper's recipe
  with pytest.raises(errors.ConfigError, match='teacher_steps=12 must be divisible by 2.rounds=8'):
    config_lib.validate(cfg_with(rounds=3, teacher_steps=12))  # 12 cannot halve three times
  for key, value, fragment in (('divergence', 'kl', 'is not valid'), ('lr', -1.0, '>= 0'),
                               ('ema_decay', 1.5, r'in \[0, 1\]'),
                               ('batch_size', 0, 'positive')):
    with pytest.raises(errors.ConfigError, match=f'distill.sdtt.{key}=.*{fragment}'):
      config_lib.validate(cfg_with(**{key: value}))


def _subs_like(rng, shape):
  lp = np.log(rng.dirichlet(np.ones(shape[-1]) * 0.7, size=shape[:-1]))
  lp[..., -1] = -1e6                      # the [MASK] column: probability 0
  lp[0, 0, 2] = -1e6                      # another zero in one distribution only
  return jnp.asarray(lp, jnp.float32), np.where(lp < -1e5, 0.0, np.exp(lp))


def test_divergences_direction_and_values():
  rng = np.random.default_rng(0)
  lp_s, p_s = _subs_like(rng, (2, 3, 6))
  lp_t, p_t = _subs_like(rng, (2, 3, 6))
  lp_t = lp_t.at[0, 0, 2].set(jnp.log(0.05))          # the target keeps mass where S has none
  p_t[0, 0, 2] = 0.05

  def kl(p, q, lq):
    return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - lq), 0).sum(-1)
  want_rev = kl(p_s, p_t, np.asarray(lp_t, np.float64))
  want_fwd = kl(p_t, p_s, np.asarray(lp_s, np.float64))
  np.testing.assert_allclose(sdtt.divergence(lp_s, lp_t, 'reverse_kl'), want_rev, rtol=1e-5)
  np.testing.assert_allclose(sdtt.divergence(lp_s, lp_t, 'forward_kl'), want_fwd, rtol=1e-4)
  assert np.abs(want_rev - want_fwd).max() > 0.05      # the two directions differ here
  both = (p_s > 0) & (p_t > 0)
  want_mse = np.where(both, (np.asarray(lp_s) - np.asarray(lp_t)) ** 2, 0).mean(-1)
  np.testing.assert_allclose(sdtt.divergence(lp_s, lp_t, 'mse'), want_mse, rtol=1e-5)
  np.testing.assert_allclose(sdtt.divergence(lp_s, lp_t, 'tvd'),
                             0.5 * np.abs(p_s - p_t).sum(-1), rtol=1e-5)


# ------------------------------------------------------------------------------- one iteration


@pytest.fixture(scope='module')
def iteration():
  cfg = sdtt_cfg(t_min=0.02)                 # the default divergence: reverse KL
  teacher = randomised(nnx.state(DiT(cfg.model, rngs=nnx.Rngs(0)), nnx.Param),
                       jax.random.key(100), 0.3)
  state = sdtt.init_state(cfg, teacher)
  # In round 1 (Δ = 2/8) with a student away from its teacher and an EMA away from both.
  state = state.replace(step=jnp.asarray(2, jnp.int32),
                        student=randomised(state.student, jax.random.key(7), 0.05),
                        ema=randomised(state.ema, jax.random.key(8), 0.05))
  x = jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, MASK)
  step = jax.jit(sdtt.make_sdtt_step(cfg, sdtt.graphdef(cfg), with_aux=True),
                 compiler_options={'xla_backend_optimization_level': 0})
  run_key = jax.random.key(5)
  old = jax.device_get(state)
  new, metrics, aux = step(state, x, run_key)
  return cfg, old, np.asarray(x), run_key, jax.device_get(new), metrics, aux


def test_iteration_matches_the_numpy_reference(iteration):
  cfg, old, x, run_key, new, metrics, aux = iteration
  s = cfg.distill.sdtt
  keys = ref.iteration_keys(run_key, 2)
  t = ref.antithetic_times(keys['t'], BATCH, s.t_min)
  np.testing.assert_allclose(aux['t_B'], t, rtol=1e-6)
  delta = ref.step_size(2, s.round_iterations, s.teacher_steps)
  assert delta == 0.25 and float(aux['delta']) == delta
  z_t = ref.forward_mask(keys['mask'], x, t, MASK)
  np.testing.assert_array_equal(aux['z_t_BxL'], z_t)
  heads = cfg.model.n_heads
  teacher, student = to_official(flat_np(old.teacher)), to_official(flat_np(old.student))
  tgt, z1, z2, cat = ref.target(teacher, z_t, t, delta, keys, n_heads=heads, mask_id=MASK,
                                t_min=s.t_min)
  # The tiny case covers positions revealed in the first step, the second, and never.
  assert {0, 1, 2} <= set(np.unique(cat)), np.unique(cat)
  np.testing.assert_array_equal(aux['z1_BxL'], z1)
  np.testing.assert_array_equal(aux['z2_BxL'], z2)
  got = np.asarray(aux['logp_BxLxV'], np.float64)
  zero = tgt < -1e5
  np.testing.assert_array_equal(got < -1e5, zero)
  np.testing.assert_allclose(got[~zero], tgt[~zero], rtol=1e-4, atol=1e-5)
  assert s.divergence == 'reverse_kl'
  want = ref.loss(student, z_t, tgt, 'reverse_kl', n_heads=heads, mask_id=MASK)
  assert want > 1e-3
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-4)
  # KL(student‖target), not KL(target‖student): the two differ by 100x the tolerance above.
  other = ref.loss(student, z_t, tgt, 'forward_kl', n_heads=heads, mask_id=MASK)
  assert abs(other - want) > 1e-2 * want, (other, want)
  # The gradient along a random direction v against a central difference of the reference.
  v = randomised(jax.tree.map(jnp.zeros_like, old.student), jax.random.key(9), 1.0)
  v_off = to_official(flat_np(v))
  eps = 1e-4

  def moved(sign):
    return ref.loss({k: student[k] + sign * eps * v_off[k] for k in student}, z_t, tgt,
                    s.divergence, n_heads=heads, mask_id=MASK)
  fd = (moved(1) - moved(-1)) / (2 * eps)
  dot = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(aux['grad']),
                                                   jax.tree.leaves(v)))
  np.testing.assert_allclose(dot, fd, rtol=2e-3)
  # EMA of the updated student; the teacher is untouched within a round.
  for e_old, e_new, p_new in zip(jax.tree.leaves(old.ema), jax.tree.leaves(new.ema),
                                 jax.tree.leaves(new.student)):
    np.testing.assert_allclose(e_new, e_old + (1 - s.ema_decay) * (p_new - e_old), rtol=1e-5,
                               atol=1e-7)
  for a, b in zip(jax.tree.leaves(old.teacher), jax.tree.leaves(new.teacher)):
    np.testing.assert_array_equal(a, b)
  assert int(new.step) == 3


def test_hand_off_teacher_is_the_raw_student_bit_for_bit(iteration):
  cfg, _, _, _, new, _, _ = iteration
  state = jax.device_put(new)
  handed = jax.device_get(sdtt.hand_off(cfg, state))
  for a, b in zip(jax.tree.leaves(handed.teacher), jax.tree.leaves(new.student)):
    np.testing.assert_array_equal(a, b)                  # the raw student, not its EMA
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.student),
                                            jax.tree.leaves(new.ema)))
  for a, b in zip(jax.tree.leaves(handed.ema), jax.tree.leaves(new.ema)):
    np.testing.assert_array_equal(a, b)                  # EMA carried
  for a, b in zip(jax.tree.leaves(handed.student), jax.tree.leaves(new.student)):
    np.testing.assert_array_equal(a, b)
  fresh = sdtt.make_optimizer(cfg).init(new.student)     # the optimiser starts afresh
  for a, b in zip(jax.tree.leaves(handed.opt_student), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  assert int(handed.step) == int(new.step)


def test_sharded_step_equals_the_single_device_step(iteration):
  """The loop's jitted step on a (data=2, fsdp=2) mesh of fake CPU devices, with its
  shardings and donation, gives the single-device iteration's numbers."""
  cfg, old, x, run_key, new, metrics, _ = iteration
  cfg = copy.deepcopy(cfg)
  cfg.mesh.data, cfg.mesh.fsdp = 2, 2
  runner = sdtt_loop.SdttDistiller(cfg, types.SimpleNamespace(params=old.teacher),
                                   devices=jax.devices()[:4])
  state = jax.device_put(old, runner.state_sh)
  got, got_metrics = runner.step(state, parallel.global_batch(runner.mesh, x), run_key)
  for k in ('loss', 'grad_norm', 'revealed_frac', 'delta'):
    np.testing.assert_allclose(got_metrics[k], metrics[k], rtol=1e-5, err_msg=k)
  # Parameters to 0.1% of an AdamW step (lr 1e-2): Adam's g/(|g|+ε) amplifies the float32
  # reduction-order differences of tiny gradients.
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(new)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3 * cfg.distill.sdtt.lr)


# ------------------------------------------------------------------------------- the run


def _restore(cfg, run, step):
  mngr = Manager(os.path.join(run, 'checkpoints'))
  try:
    runner = sdtt_loop.SdttDistiller(cfg, None)
    state, _, _ = mngr.restore(runner.abstract_sharded(), step)
    return jax.device_get(state)
  finally:
    mngr.close()


def test_run_stopped_mid_round_resumes_exactly_and_hands_off(tmp_path, monkeypatch):
  teacher = str(tmp_path / 'teacher')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 2}), teacher)
  over = {'job': 'distill', 'teacher.checkpoint': teacher, 'distill.method': 'sdtt',
          'distill.log_every': 1, 'distill.sample_every': 0, 'checkpoint.every': 100,
          'checkpoint.keep': 10, 'distill.sdtt.rounds': 2, 'distill.sdtt.round_iterations': 2,
          'distill.sdtt.teacher_steps': 8, 'distill.sdtt.batch_size': 2,
          'distill.sdtt.lr': 1e-3, 'distill.sdtt.warmup_steps': 2, 'distill.sdtt.ema_decay': 0.5}
  full = str(tmp_path / 'full')
  cli.run_job(smoke_cfg(tmp_path, **over), full)
  part = str(tmp_path / 'part')

  class StopAtOne(common.StopFlag):      # as if SIGTERM arrived during iteration 1 of round 0
    def should_stop(self, step=0, sync_every=10):
      return True
  monkeypatch.setattr(common, 'StopFlag', StopAtOne)
  out = cli.run_job(smoke_cfg(tmp_path, **over), part)
  assert out['step'] == 1 and not out['complete']
  monkeypatch.undo()
  out = cli.run_job(smoke_cfg(tmp_path, **over), part)
  assert out['complete'] and out['step'] == 4
  for key in ('loss', 'lr', 'round', 'revealed_frac', 'grad_norm'):
    a, b = read_metrics(full, key), read_metrics(part, key)
    assert sorted(a) == [1, 2, 3, 4], key
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)], key
  assert [read_metrics(full, 'round')[s] for s in range(1, 5)] == [0, 0, 1, 1]
  assert read_metrics(full, 'loss')[4] > 0
  # Each round ends in its own checkpoint; the next round's teacher is its raw student.
  assert os.path.isdir(os.path.join(part, 'checkpoints', '2'))
  cfg = smoke_cfg(tmp_path, **over)
  cfg = distill_loop.teacher_config(cfg, distill_loop.load_teacher(cfg))
  end0, end1 = _restore(cfg, part, 2), _restore(cfg, part, 4)
  for a, b in zip(jax.tree.leaves(end1.teacher), jax.tree.leaves(end0.student)):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(end0.teacher),
                                            jax.tree.leaves(end0.student)))
  # The one loader: the run's student EMA (default) and raw student.
  den = didi_jax.load_denoiser(part)
  for a, b in zip(jax.tree.leaves(nnx.state(den.model, nnx.Param)),
                  jax.tree.leaves(end1.ema)):
    np.testing.assert_array_equal(a, b)
  raw = loader.load(part, 'student')
  for a, b in zip(jax.tree.leaves(raw.params), jax.tree.leaves(end1.student)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(errors.CheckpointError, match='SDTT run: it trains no discriminator'):
    loader.load(part, 'discriminator')
