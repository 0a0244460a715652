"""DiDi-Instruct objective and training iteration (docs/method.md §6-§7) on a tiny DiT.

Every loss term is checked against an independent NumPy computation; the policy-gradient estimator
against the exact gradient of a tractable toy; the step against its invariants (frozen weights,
EMA arithmetic, spectral power iteration, determinism) and, in a subprocess with 8 fake CPU
devices, against itself sharded over a (data=4, fsdp=2) mesh.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import diffusion
from didi_jax.distill import didi as distill
from didi_jax.config import base_config, model_config
from didi_jax.models.dit import DiT
from didi_jax.train import distill_state as ds

VOCAB = 20          # 19 real tokens + [MASK] = 19
MASK = VOCAB - 1
LENGTH = 8
# Compile fast on small shared CPUs (tests check values, not speed).
JIT_OPTS = {'xla_backend_optimization_level': 0}


def set_dotted(node, overrides):
  """node['a']['b'] = v for every 'a.b' -> v."""
  for k, v in overrides.items():
    *parents, leaf = k.split('.')
    target = node
    for p in parents:
      target = target[p]
    target[leaf] = v


def distill_cfg(vocab, length, dims, **distill_overrides):
  """A float32 DiT of `dims` = (hidden, blocks, heads, mlp, cond) and a small distillation
  (B = 2 rows × G = 4, one unfrozen discriminator block, 20 iterations, warm-up 4)."""
  cfg = base_config()
  m = model_config('tiny', vocab, length)
  m.hidden_size, m.n_blocks, m.n_heads, m.mlp_dim, m.cond_dim = dims
  m.compute_dtype = 'float32'
  cfg.model = m
  d = cfg.distill
  d.batch_size, d.group_size, d.disc_unfreeze_blocks = 2, 4, 1
  d.num_iterations = 20
  d.optim.student.warmup_steps = d.optim.disc.warmup_steps = 4
  set_dotted(d, distill_overrides)
  return cfg


def tiny_cfg(**distill_overrides):
  return distill_cfg(VOCAB, LENGTH, (32, 2, 2, 64, 16), **distill_overrides)


def teacher_params(cfg, seed=0):
  """A teacher with non-trivial outputs (a fresh DiT has zero output layer and adaLN)."""
  params = nnx.state(DiT(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param)
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tdef, leaves)


def np_tree(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def flat(state):
  """{path: Variable} of an nnx.State."""
  return dict(nnx.to_flat_state(state))


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ============================================================================ loss pieces


def test_bce_and_disc_loss_match_numpy():
  rng = np.random.default_rng(0)
  d_real, d_fake = rng.normal(size=(3, 5)) * 3, rng.normal(size=(3, 5)) * 3
  mk_real, mk_fake = rng.random((3, 5)) < 0.5, rng.random((3, 5)) < 0.4
  s = 0.1

  def bce(d, y):   # −[y log σ(d) + (1−y) log(1−σ(d))]
    sig = 1 / (1 + np.exp(-d))
    return -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
  want = 0.5 * (bce(d_real, 0.9)[mk_real].mean() + bce(d_fake, 0.1)[mk_fake].mean())
  got = distill.disc_loss(jnp.asarray(d_real), jnp.asarray(d_fake), jnp.asarray(mk_real),
                          jnp.asarray(mk_fake), s)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(distill.bce_smoothed(jnp.asarray(d_real), 0.9)),
                             bce(d_real, 0.9), rtol=1e-5)
  # A side with no masked position contributes 0 (no NaN).
  zero = distill.disc_loss(jnp.asarray(d_real), jnp.asarray(d_fake), jnp.zeros((3, 5), bool),
                           jnp.asarray(mk_fake), s)
  np.testing.assert_allclose(float(zero), 0.5 * bce(d_fake, 0.1)[mk_fake].mean(), rtol=1e-5)


def test_reward_log_odds_clip_and_empty_rows():
  d = np.array([[0.5, -2.0, 30.0, -30.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, -1.0, 2.0]],
               np.float32)
  mk = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
  sig = 1 / (1 + np.exp(-d.astype(np.float64)))
  lo = np.clip(np.log(sig + 1e-6) - np.log(1 - sig + 1e-6), -8, 8)
  want = np.array([lo[0].mean(), 0.0, (lo[2, 0] + lo[2, 2]) / 2])
  got = distill.reward_from_logits(jnp.asarray(d), jnp.asarray(mk), 8.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # |d| = 30 hits the clip (the eps alone would give ±13.8).
  assert abs(lo[0, 2] - 8.0) < 1e-9 and abs(lo[0, 3] + 8.0) < 1e-9


def np_group_advantages(r, G, clip, floor_rel=1e-4, floor_abs=1e-4):
  """docs/method.md §7.2: z = (r − mean_G) / max(std_G(ddof=1), max(1e-4, floor·mean_G|r|))."""
  g = np.asarray(r, np.float64).reshape(-1, G)
  std = g.std(1, ddof=1, keepdims=True)
  floor = np.maximum(floor_abs, floor_rel * np.abs(g).mean(1, keepdims=True))
  z = (g - g.mean(1, keepdims=True)) / np.maximum(std, floor)
  return np.clip(z, -clip, clip).ravel(), np.abs(z).ravel(), (std < floor).ravel()  # per group


def test_group_advantages_normalise_and_clip():
  r = np.array([1.0, 2.0, 3.0, 10.0, 5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 100.0], np.float32)
  want, _, _ = np_group_advantages(r, 4, 3.0)
  for clip in (3.0, 1.0):
    got = distill.group_advantages(jnp.asarray(r), 4, clip, True)
    np.testing.assert_allclose(np.asarray(got), np.clip(want, -clip, clip), rtol=1e-5,
                               atol=1e-6)
  # A constant group gets advantage 0; disabled normalisation returns raw rewards.
  np.testing.assert_allclose(np.asarray(distill.group_advantages(jnp.asarray(r), 4, 3.0))[4:8],
                             0.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(distill.group_advantages(jnp.asarray(r), 4, 3.0,
                                                                    False)), r)
  assert distill.advantage_metrics(jnp.asarray(r), 4, 3.0, False) == {}


def test_group_zscore_bound_and_clip_metric():
  """|z| ≤ (G−1)/√G with the unbiased std, reached when one reward differs from G−1 equal ones:
  at G = 4 the ±3 clip can never bind (no clip metric); at G = 16 it does."""
  assert distill.max_group_zscore(4) == 1.5
  rng = np.random.default_rng(0)
  for G in (2, 4, 8):
    r = rng.normal(size=(4000, G)).astype(np.float32)
    r[:, 0] *= 50.0                       # heavy tails push towards the bound
    z = np.asarray(distill.group_zscores(jnp.asarray(r.ravel()), G, 1e-4))
    assert np.abs(z).max() <= distill.max_group_zscore(G) * (1 + 1e-4)
  one_out = np.array([0, 0, 0, 1] * 2, np.float32)
  met = distill.advantage_metrics(jnp.asarray(one_out), 4, 3.0)
  np.testing.assert_allclose(float(met['adv_zmax']), 1.5, rtol=1e-6)
  assert 'adv_clip_frac' not in met and float(met['adv_floor_frac']) == 0.0
  r16 = np.zeros(32, np.float32)
  r16[0] = 1.0                            # group 0: z = 15/4 = 3.75 at row 0
  r16[16:] = rng.normal(size=16)
  met16 = distill.advantage_metrics(jnp.asarray(r16), 16, 3.0)
  _, absz, _ = np_group_advantages(r16, 16, 3.0)
  np.testing.assert_allclose(float(met16['adv_clip_frac']), (absz > 3.0).mean(), atol=1e-7)
  assert float(met16['adv_clip_frac']) == 1 / 32
  np.testing.assert_allclose(np.asarray(distill.group_advantages(jnp.asarray(r16), 16, 3.0))[0],
                             3.0)


def test_near_tied_group_gets_no_advantage_from_rounding():
  """Rewards equal up to float32 rounding — around e, and around 0 as a discriminator that
  outputs 0 everywhere gives — get |A| ≪ 1 from the spread floor (the official std + 1e-8 gives
  ±0.87, full-size advantages from noise); a real spread is untouched."""
  base = np.float32(2.7182817)
  ulp = np.spacing(base)
  tied = np.array([base, base + ulp, base - ulp, base], np.float32)
  real = np.array([2.0, 2.5, 3.0, 2.2], np.float32)
  zero = np.array([1.2e-7, 0.0, 5e-8, -1.2e-7], np.float32)
  r = jnp.asarray(np.concatenate([tied, real, zero]))
  adv = np.asarray(distill.group_advantages(r, 4, 3.0))
  for g in (tied, zero):
    old = (g - g.mean()) / (g.astype(np.float64).std(ddof=1) + 1e-8)
    assert np.abs(old).max() > 0.5          # what the unfloored formula does
  assert np.abs(adv[:4]).max() < 1e-2 and np.abs(adv[8:]).max() < 1e-2
  want, _, floored = np_group_advantages(np.asarray(r), 4, 3.0)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(floored, [True, False, True])
  met = distill.advantage_metrics(r, 4, 3.0)
  np.testing.assert_allclose(float(met['adv_floor_frac']), 2 / 3)
  # Zero floor reproduces plain z-scores of the real group.
  z = (real - real.mean()) / real.astype(np.float64).std(ddof=1)
  np.testing.assert_allclose(np.asarray(distill.group_advantages(r, 4, 3.0, True, 0.0))[4:8], z,
                             rtol=1e-5)


def _subs_like(rng, shape):
  """Random SUBS-style log-probs: [MASK] column and some zero-probability entries at −1e6."""
  logits = rng.normal(size=shape) * 2
  lp = np_log_softmax(np.where(np.arange(shape[-1]) == shape[-1] - 1, -np.inf, logits))
  lp = np.where(np.isneginf(lp), -1e6, lp)
  return lp.astype(np.float32)


def test_jeffrey_divergences_with_zero_probabilities():
  rng = np.random.default_rng(1)
  lt, ls = _subs_like(rng, (2, 3, 6)), _subs_like(rng, (2, 3, 6))
  # A revealed position: one-hot on both sides (−1e6 elsewhere) -> all divergences 0.
  onehot = np.full(6, -1e6, np.float32)
  onehot[2] = 0.0
  lt[1, 0] = ls[1, 0] = onehot
  pt, ps = np.exp(lt.astype(np.float64)), np.exp(ls.astype(np.float64))
  real = slice(0, 5)                   # [MASK] (last) has probability 0 on both sides
  kl_ts = (pt[..., real] * (lt[..., real] - ls[..., real])).sum(-1)
  kl_st = (ps[..., real] * (ls[..., real] - lt[..., real])).sum(-1)
  kl_ts[1, 0] = kl_st[1, 0] = 0.0
  beta = 0.3
  cases = {'jeffrey': (1 - beta) * kl_ts + beta * kl_st, 'forward': kl_ts, 'reverse': kl_st}
  for kind, want in cases.items():
    got = distill.jeffrey(jnp.asarray(lt), jnp.asarray(ls), beta, kind)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(distill.jeffrey(jnp.asarray(lt), jnp.asarray(ls), beta)) >= -1e-6)
  grad = jax.grad(lambda x: distill.jeffrey(jnp.asarray(lt), x, 0.5).sum())(jnp.asarray(ls))
  assert np.all(np.isfinite(np.asarray(grad)))
  # −inf entries (true zeros) are also handled without NaN.
  lt_inf = jnp.where(jnp.asarray(lt) < -1e5, -jnp.inf, jnp.asarray(lt))
  got_inf = distill.jeffrey(lt_inf, jnp.asarray(ls), 0.0, 'forward')
  np.testing.assert_allclose(np.asarray(got_inf), kl_ts, rtol=1e-4, atol=1e-6)


def test_entropy_and_maskmean():
  rng = np.random.default_rng(2)
  lp = _subs_like(rng, (3, 4, 6))
  p = np.exp(lp.astype(np.float64))
  ent = -(p[..., :5] * lp[..., :5]).sum(-1)
  np.testing.assert_allclose(np.asarray(distill.entropy(jnp.asarray(lp))), ent, rtol=1e-5)
  mk = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  want = (ent[0, :2].mean() + ent[2].mean()) / 2     # the empty row is left out
  np.testing.assert_allclose(float(distill.masked_entropy(jnp.asarray(lp), jnp.asarray(mk))),
                             want, rtol=1e-5)
  x = rng.normal(size=(3, 4))
  np.testing.assert_allclose(float(distill.maskmean(jnp.asarray(x), jnp.asarray(mk))),
                             (x[0, :2].mean() + x[2].mean()) / 2, rtol=1e-5)
  assert float(distill.maskmean(jnp.asarray(x), jnp.zeros((3, 4), bool))) == 0.0


def test_trajectory_logprob_counts_newly_revealed_only():
  x_prev = np.array([[MASK, MASK, 3, MASK]])
  x_next = np.array([[5, MASK, 3, 7]])
  lp_at = np.array([[-1.5, -1e6, 0.0, -0.25]], np.float32)
  got = distill.trajectory_logprob(jnp.asarray(lp_at), jnp.asarray(x_prev), jnp.asarray(x_next),
                                   MASK)
  np.testing.assert_allclose(np.asarray(got), [-1.75])


def test_student_loss_and_its_cotangents():
  d = tiny_cfg(entropy_coef=0.02, **{'kl.coef_hi': 0.3, 'kl.coef_lo': 0.2,
                                     'kl.scale': 0.5}).distill
  terms = {'logp_N': jnp.asarray([-3.0, -1.0, -2.0, -5.0]), 'kl_hi': jnp.asarray(0.7),
           'kl_lo': jnp.asarray(1.1), 'ent': jnp.asarray(2.5)}
  wa = jnp.asarray([1.0, -2.0, 0.5, 3.0])
  want = (-np.mean(np.asarray(wa) * np.asarray(terms['logp_N'])) + 0.3 * 0.5 * 0.7
          + 0.2 * 0.5 * 1.1 - 0.02 * 2.5)
  got, cot = jax.value_and_grad(lambda t: distill.student_loss_from_terms(t, wa, d))(terms)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # The cotangents the step feeds into the rollout's vjp (descent lowers −w·A·logp).
  np.testing.assert_allclose(np.asarray(cot['logp_N']), -np.asarray(wa) / 4, rtol=1e-6)
  np.testing.assert_allclose([float(cot['kl_hi']), float(cot['kl_lo']), float(cot['ent'])],
                             [0.15, 0.1, -0.02], rtol=1e-6)
  assert [distill.chunk_size(1024, c) for c in (0, 128, 100, 2048)] == [1024, 128, 64, 1024]


def test_omega_tau_and_importance_weight():
  from scipy import stats
  d = tiny_cfg().distill
  t = jnp.asarray([0.02, 0.05, 0.5, 0.98, 20.0])
  np.testing.assert_allclose(np.asarray(distill.omega(t, d)),
                             np.clip(1 / np.asarray(t), 0.1, 10.0), rtol=1e-6)
  d2 = tiny_cfg(importance_weight=True, **{'tau.a': 2.0, 'tau.b': 3.0}).distill
  t2 = jnp.asarray([0.1, 0.3, 0.7])
  want = np.clip(1 / np.asarray(t2), 0.1, 10) / stats.beta.pdf(np.asarray(t2), 2, 3)
  np.testing.assert_allclose(np.asarray(distill.omega(t2, d2)), want, rtol=1e-5)
  d3 = tiny_cfg(**{'omega.mode': 'constant'}).distill
  np.testing.assert_allclose(np.asarray(distill.omega(t2, d3)), 1.0)
  tau = np.asarray(distill.sample_tau(jax.random.key(0), 20000, d2.tau))
  assert tau.min() >= d2.tau.min and tau.max() <= d2.tau.max
  assert abs(tau.mean() - 2 / 5) < 0.01            # Beta(2, 3) mean (clamping is negligible)
  tau1 = np.asarray(distill.sample_tau(jax.random.key(1), 20000, d.tau))
  np.testing.assert_allclose(np.mean(tau1 == 0.02), 0.02, atol=0.005)   # clamped mass
  # tau.per='group': one τ per run of G rows, same Beta(2, 3) marginal; 'row' ignores G.
  d4 = tiny_cfg(**{'tau.a': 2.0, 'tau.b': 3.0, 'tau.per': 'group'}).distill
  tg = np.asarray(distill.sample_tau(jax.random.key(2), 20000, d4.tau, 4)).reshape(5000, 4)
  assert (tg == tg[:, :1]).all() and len(np.unique(tg[:, 0])) > 4900
  assert abs(tg.mean() - 2 / 5) < 0.01
  tr = np.asarray(distill.sample_tau(jax.random.key(2), 20000, d2.tau, 4)).reshape(5000, 4)
  assert (tr != tr[:, :1]).any(axis=1).all()


def test_lr_schedule_values_and_optimizer_chain():
  cfg = tiny_cfg(num_iterations=100, disc_warmup_steps=10,
                 **{'optim.student.warmup_steps': 10, 'optim.disc.warmup_steps': 20})
  sched_s, sched_d = ds.schedules(cfg)
  P, W, T = cfg.distill.optim.disc.lr, 20, 100
  for k, want in [(0, P / W), (W - 1, P), (W, P), (T - 1, P / (T - W)), (T, 0.0)]:
    np.testing.assert_allclose(float(sched_d(k)), want, rtol=1e-6)
  # The student's schedule spans the iterations after the discriminator warm-up.
  Ps, Ts = cfg.distill.optim.student.lr, 90
  for k, want in [(0, Ps / 10), (9, Ps), (Ts - 1, Ps / (Ts - 10))]:
    np.testing.assert_allclose(float(sched_s(k)), want, rtol=1e-6)

  # nan_to_num -> clip_by_global_norm -> AdamW, against a hand computation (eps large so the
  # first Adam step depends on the clipped magnitude).
  cfg.distill.optim.disc.eps = 1.0
  _, tx = ds.make_optimizers(cfg)
  g = {'a': jnp.asarray([jnp.nan, 3.0, jnp.inf]), 'b': jnp.asarray([-jnp.inf, 4.0])}
  p = {'a': jnp.zeros(3), 'b': jnp.zeros(2)}
  upd, _ = tx.update(g, tx.init(p), p)
  clean = np.array([0.0, 3.0, 1e5, -1e5, 4.0])
  clipped = clean * min(1.0, 1.0 / np.linalg.norm(clean))
  lr0 = P / W
  want = -lr0 * clipped / (np.abs(clipped) + 1.0)
  got = np.concatenate([np.asarray(upd['a']), np.asarray(upd['b'])])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


# ============================================================================ fused terms


def test_fused_step_terms_match_direct_computation():
  """Chunked, rematerialised projection + SUBS + draw + terms == the model's full logits."""
  cfg = tiny_cfg()
  tp = teacher_params(cfg, seed=0)
  sp = teacher_params(cfg, seed=1)
  gd = ds.make_graphdefs(cfg)[0]
  net = distill.denoiser_net(gd)
  rng = np.random.default_rng(3)
  n = 3
  x = jnp.asarray(np.where(rng.random((n, LENGTH)) < 0.6, MASK,
                           rng.integers(0, MASK, (n, LENGTH))), jnp.int32)
  alpha_t, alpha_s = jnp.full((n,), 0.4), jnp.full((n,), 0.9)
  zeros = jnp.zeros((n,))
  regime = distill.categorical.Regime()

  def fused(params_S, x_in, chunk_len):
    r = x_in.shape[0]
    return distill.fused_step_terms(
        jax.random.key(7), net.head(params_S), net.head(tp),
        net.features(params_S, x_in, jnp.zeros((r,)), None), None,
        net.features(tp, x_in, jnp.zeros((r,)), None), x_in, alpha_t, alpha_s, n_rows=n,
        mask_id=MASK, regime=regime, kl_type='jeffrey', kl_beta=0.5, chunk_len=chunk_len)

  def loss(params_S, x_in, chunk_len):
    x_next, lp_at, ent, kl = fused(params_S, x_in, chunk_len)
    newly = (x_in == MASK) & (x_next != MASK)
    return jnp.sum(jnp.where(newly, lp_at, 0.0)) + ent.sum() + kl.sum(), (x_next, lp_at, ent, kl)

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2,
                compiler_options=JIT_OPTS)
  (val, (x_next, lp_at, ent, kl)), grad = run(sp, x, 4)

  def direct(params_S):
    logp_S = diffusion.subs_logprobs(nnx.merge(gd, params_S)(x, zeros), x, MASK)
    logp_T = diffusion.subs_logprobs(nnx.merge(gd, tp)(x, zeros), x, MASK)
    lp = jnp.take_along_axis(logp_S, x_next[..., None], -1)[..., 0]
    newly = (x == MASK) & (x_next != MASK)
    e = distill.entropy(logp_S)
    k = distill.jeffrey(logp_T, logp_S, 0.5)
    return jnp.sum(jnp.where(newly, lp, 0.0)) + e.sum() + k.sum(), (lp, e, k, logp_T)
  (val_d, (lp_d, ent_d, kl_d, logp_T)), grad_d = jax.jit(
      jax.value_and_grad(direct, has_aux=True), compiler_options=JIT_OPTS)(sp)
  np.testing.assert_allclose(np.asarray(lp_at), np.asarray(lp_d), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_d), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(kl), np.asarray(kl_d), rtol=1e-4, atol=1e-6)
  assert float(np.abs(np.asarray(kl)).max()) > 1e-3          # teacher != student here
  np.testing.assert_allclose(float(val), float(val_d), rtol=1e-5)
  for a, b in zip(np_tree(grad), np_tree(grad_d)):   # float32 noise scales with the leaf
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5 * max(1.0, np.abs(b).max()))
  # Draws: revealed positions carried over; masked ones drawn from real tokens or kept [MASK].
  xn, x0 = np.asarray(x_next), np.asarray(x)
  np.testing.assert_array_equal(xn[x0 != MASK], x0[x0 != MASK])
  assert np.any(xn[x0 == MASK] != MASK)



# ============================================================================ estimator


@pytest.mark.parametrize('score_decomposition,rollout', [(True, 'two_pass'), (False, 'shared')])
def test_policy_gradient_matches_exact_gradient(score_decomposition, rollout):
  """MC mean of ∇ of −mean(A·logp_traj) == −∇ E_{p_ν}[R] for a factorised toy student.

  The toy student's SUBS distribution at every masked position l is softmax(ν_l) (independent of
  the input), so the sampler's output law is exact: each position is [MASK] with probability
  ρ = (1−α_t0)/(1−α_1) and otherwise ~ softmax(ν_l). R is an arbitrary table over (x_0, x_1).
  """
  V, L, N = 4, 2, 40000
  m = V - 1
  dcfg = tiny_cfg(score_decomposition=score_decomposition, rollout=rollout, t0=0.3,
                  **{'tau.min': 0.4, 'kl.coef_hi': 0.0, 'kl.coef_lo': 0.0}).distill
  rng = np.random.default_rng(4)
  nu = jnp.asarray(rng.normal(size=(L, V)), jnp.float32)
  R = jnp.asarray(rng.normal(size=(V, V)) * 2, jnp.float32)

  net = distill.Net(
      features=lambda params, ids, sigma, key: jnp.broadcast_to(
          jnp.eye(L, dtype=jnp.float32), (ids.shape[0], L, L)),
      head=lambda params: ((lambda hp, f: f @ hp), params['nu']))

  def surrogate(params, key):
    key_tau, key1, key2 = jax.random.split(key, 3)
    tau = distill.sample_tau(key_tau, N, dcfg.tau)
    keys = {'roll1': key1, 'roll2': key2, 'drop1': None, 'drop2': None, 'drop_draw1': None,
            'drop_draw2': None}
    diff, aux = distill.student_rollout(
        params, None, tau, keys, net=net, n_rows=N, length=L, mask_id=m, dcfg=dcfg,
        regime=distill.categorical.Regime())
    x = aux['x_fake_NxL']
    adv = jax.lax.stop_gradient(R[x[:, 0], x[:, 1]])
    return -jnp.mean(adv * diff['logp_N']), x

  grad_fn = jax.jit(jax.grad(surrogate, has_aux=True), compiler_options=JIT_OPTS)
  g_mc, x = grad_fn({'nu': nu}, jax.random.key(11))

  a1, a0 = float(diffusion.alpha(1.0)), float(diffusion.alpha(dcfg.t0))
  rho = (1 - a0) / (1 - a1)

  def exact_objective(nu):
    p_real = (1 - rho) * jax.nn.softmax(nu.at[:, m].set(-jnp.inf), axis=-1)
    p = p_real.at[:, m].set(rho)                       # law of each output position
    return -jnp.sum(p[0][:, None] * p[1][None, :] * R)
  g_exact = jax.grad(exact_objective)(nu)
  # Sanity of the toy: the empirical [MASK] rate is ρ; rows drawn from the one shared x_T
  # forward are independent.
  assert len({tuple(r) for r in np.asarray(x)[:50]}) > 5
  np.testing.assert_allclose(np.mean(np.asarray(x) == m), rho, atol=0.01)
  # Per-row contributions in closed form: ∇_{ν_l} log softmax(ν_l)_v = e_v − q_l at each revealed
  # position (each position is revealed once, in step 1 or 2, from the same q_l). Their mean is
  # the estimator itself; their spread gives each entry's standard error.
  xs = np.asarray(x)
  q = np.asarray(jax.nn.softmax(nu.at[:, m].set(-jnp.inf), axis=-1), np.float64)
  Rx = np.asarray(R, np.float64)[xs[:, 0], xs[:, 1]]
  onehot = np.eye(V)[xs]                                             # (N, L, V)
  revealed = (xs != m)[..., None]
  contrib = -Rx[:, None, None] * revealed * (onehot - q[None])
  np.testing.assert_allclose(np.asarray(g_mc['nu']), contrib.mean(0), rtol=1e-3, atol=1e-4)
  se = contrib.std(0, ddof=1) / np.sqrt(N)
  assert se[:, :m].max() < 0.01
  # Within 4 standard errors entrywise. A wrong estimator (double counting, a missing step,
  # mask positions counted) is off by > 0.2.
  z = np.abs(np.asarray(g_mc['nu']) - np.asarray(g_exact))[:, :m] / se[:, :m]
  assert z.max() < 4.0, z
  assert float(np.abs(np.asarray(g_exact)).max()) > 0.2     # a non-trivial gradient
  np.testing.assert_allclose(np.asarray(g_mc['nu'])[:, m], 0.0, atol=1e-6)  # [MASK]: no grad


# ============================================================================ the iteration


@pytest.fixture(scope='module')
def default_run():
  cfg = tiny_cfg(batch_size=8)        # B = 8 data rows × G = 4 (also the sharded reference)
  tp = teacher_params(cfg)
  state0 = ds.init_distill_state(cfg, tp, jax.random.key(1))
  sgd, dgd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd), compiler_options=JIT_OPTS)
  x_data = jax.random.randint(jax.random.key(2), (cfg.distill.batch_size, LENGTH), 0, MASK)
  snap = {'teacher': np_tree(tp), 'state0': np_tree(state0)}
  state1, metrics = step(state0, tp, x_data, jax.random.key(5))
  return dict(cfg=cfg, tp=tp, state0=state0, state1=state1, metrics=metrics, step=step,
              x_data=x_data, snap=snap)


def test_init_copies_teacher(default_run):
  cfg, tp, s0 = default_run['cfg'], default_run['tp'], default_run['state0']
  for tree in (s0.student, s0.ema):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(tp)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()   # no aliasing (donation)
  # Discriminator trunk == teacher trunk; head present and not from the teacher.
  teacher_flat = flat(tp)
  disc_flat = flat(s0.disc_frozen) | flat(s0.disc_train)
  trunk = [p for p in disc_flat if p[0] != 'output_layer']
  assert len(trunk) == len([p for p in teacher_flat if p[0] != 'output_layer'])
  for path in trunk:
    np.testing.assert_array_equal(np.asarray(disc_flat[path][...]),
                                  np.asarray(teacher_flat[path][...]))
  train_paths = set(flat(s0.disc_train))
  assert {p[0] for p in train_paths} == {'blocks', 'output_layer'}
  assert {p[1] for p in train_paths if p[0] == 'blocks'} == {cfg.model.n_blocks - 1}
  assert ('output_layer', 'main_0', 'kernel') in train_paths
  # Optimiser state only for the trainable subset.
  n_train = sum(x.size for x in jax.tree.leaves(s0.disc_train))
  n_opt = sum(x.size for x in jax.tree.leaves(s0.opt_disc))
  assert n_opt < 2 * n_train + 10


def test_one_iteration_invariants(default_run):
  cfg, s0, s1, met = (default_run[k] for k in ('cfg', 'state0', 'state1', 'metrics'))
  snap = default_run['snap']
  # The teacher is untouched and the input state was not modified.
  for a, b in zip(np_tree(default_run['tp']), snap['teacher']):
    np.testing.assert_array_equal(a, b)
  assert int(s1.step) == 1
  for name, v in met.items():
    assert v.dtype == jnp.float32 and v.shape == () and np.isfinite(float(v)), name
  # Frozen discriminator bit-identical; each trainable block and the head moved.
  for a, b in zip(np_tree(s1.disc_frozen), np_tree(s0.disc_frozen)):
    np.testing.assert_array_equal(a, b)
  moved = {}
  for path, var in flat(s1.disc_train).items():
    old = flat(s0.disc_train)[path][...]
    moved.setdefault(path[:2], []).append(float(np.abs(np.asarray(var[...]) - old).max()))
  assert moved and all(max(v) > 0 for v in moved.values()), moved
  # Student moved; EMA moved by exactly (1 − 0.999) of the difference.
  s_new, e_old, e_new = np_tree(s1.student), np_tree(s0.ema), np_tree(s1.ema)
  assert max(float(np.abs(a - b).max()) for a, b in zip(s_new, np_tree(s0.student))) > 0
  for th, eo, en in zip(s_new, e_old, e_new):
    np.testing.assert_allclose(en, eo + np.float32(0.001) * (th - eo), rtol=0, atol=1e-7)
  # Spectral u/v: one power iteration on the pre-update head kernels (docs/method.md §5.3).
  for layer in ('main_0', 'main_2'):
    k0 = np.asarray(s0.disc_train['output_layer'][layer]['kernel'][...], np.float64)
    u0 = np.asarray(s0.spectral['output_layer'][layer]['u'][...], np.float64)
    v = k0 @ u0
    v /= np.linalg.norm(v)
    u = v @ k0
    u /= np.linalg.norm(u)
    np.testing.assert_allclose(np.asarray(s1.spectral['output_layer'][layer]['v'][...]), v,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1.spectral['output_layer'][layer]['u'][...]), u,
                               atol=1e-5)
  # Student = teacher at iteration 0 (σ = 0 on both): both KL terms vanish.
  assert abs(float(met['kl_hi'])) < 1e-6 and abs(float(met['kl_lo'])) < 1e-6
  d = cfg.distill
  np.testing.assert_allclose(float(met['lr_disc']), d.optim.disc.lr / d.optim.disc.warmup_steps,
                             rtol=1e-6)
  np.testing.assert_allclose(float(met['lr_student']),
                             d.optim.student.lr / d.optim.student.warmup_steps, rtol=1e-6)
  assert 0.0 < float(met['masked_frac']) < 1.0 and float(met['entropy']) > 0


def test_step_is_deterministic(default_run):
  step, s0, tp, x = (default_run[k] for k in ('step', 'state0', 'tp', 'x_data'))
  again, met = step(s0, tp, x, jax.random.key(5))
  for a, b in zip(np_tree(again), np_tree(default_run['state1'])):
    np.testing.assert_array_equal(a, b)
  other, _ = step(s0, tp, x, jax.random.key(6))
  assert any(not np.array_equal(a, b) for a, b in
             zip(np_tree(other.student), np_tree(default_run['state1'].student)))
  # The next iteration continues from the returned state (fold_in of the new step).
  s2, met2 = step(default_run['state1'], tp, x, jax.random.key(5))
  assert int(s2.step) == 2 and all(np.isfinite(float(v)) for v in met2.values())


def test_step_variants_run():
  """All non-default branches in one compile: score_decomposition=False, coupled_time=False,
  teacher-sample real rows, a one-iteration D warm-up, two-pass rollouts, chunked fused terms,
  dropout, teacher σ = true, the importance weight and one τ per group."""
  cfg = tiny_cfg(score_decomposition=False, coupled_time=False, real_source='teacher_samples',
                 disc_warmup_steps=1, rollout='two_pass', loss_chunk_len=4, memory_saving='on',
                 dropout=0.1,
                 teacher_sigma='true', importance_weight=True,
                 **{'teacher_buffer.size': 16, 'tau.per': 'group'})
  cfg.model.n_blocks = 1                     # halves compile time; same code paths
  tp = teacher_params(cfg)
  state = ds.init_distill_state(cfg, tp, jax.random.key(1))
  sgd, dgd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd), compiler_options=JIT_OPTS)
  samples = jax.random.randint(jax.random.key(3), (16, LENGTH), 0, MASK)
  state = ds.refresh_teacher_buffer(state, samples, jax.random.key(4))
  np.testing.assert_array_equal(np.sort(np.asarray(state.teacher_buffer), 0),
                                np.sort(np.asarray(samples), 0))
  s1, met1 = step(state, tp, None, jax.random.key(5))
  s2, met2 = step(s1, tp, None, jax.random.key(5))
  for met in (met1, met2):
    assert all(np.isfinite(float(v)) for v in met.values()), met
    assert float(met['kl_lo']) == 0.0                     # one-step generator: no KL at x_τ
  moved = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(np_tree(a), np_tree(b)))
  assert moved(s1.disc_train, state.disc_train) and moved(s2.disc_train, s1.disc_train)
  # Iteration 0 is D-only; the student schedule starts at iteration 1 with lr P/W.
  assert not moved(s1.student, state.student) and not moved(s1.ema, state.ema)
  assert float(met1['lr_student']) == 0.0 and float(met1['grad_norm_student']) == 0.0
  assert moved(s2.student, s1.student) and moved(s2.ema, s1.ema)
  np.testing.assert_allclose(float(met2['lr_student']), cfg.distill.optim.student.lr
                             / cfg.distill.optim.student.warmup_steps, rtol=1e-6)
  # Student (with dropout) and teacher (at the true σ) differ although θ = teacher.
  assert float(met1['kl_hi']) > 0
  np.testing.assert_array_equal(np.asarray(s2.teacher_buffer), np.asarray(state.teacher_buffer))


def test_refresh_teacher_buffer_replaces_k_distinct_slots():
  cfg = tiny_cfg(real_source='teacher_samples', **{'teacher_buffer.size': 10})
  state = ds.DistillState(step=jnp.zeros((), jnp.int32), student=None, ema=None,
                          disc_train=None, disc_frozen=None, spectral=None, opt_student=None,
                          opt_disc=None,
                          teacher_buffer=jnp.arange(10 * LENGTH).reshape(10, LENGTH))
  new = jnp.full((4, LENGTH), -1)
  out = np.asarray(ds.refresh_teacher_buffer(state, new, jax.random.key(0)).teacher_buffer)
  changed = np.all(out == -1, axis=1)
  assert changed.sum() == 4
  np.testing.assert_array_equal(out[~changed], np.asarray(state.teacher_buffer)[~changed])
  assert ds.teacher_buffer_due(cfg, 0) == (True, 10)
  assert ds.teacher_buffer_due(cfg, cfg.distill.teacher_buffer.refresh_every) == (True, 256)
  assert ds.teacher_buffer_due(cfg, 1) == (False, 0)


# ============================================================================ sharding


_SHARDED_SCRIPT = textwrap.dedent('''
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import jax, numpy as np
    import test_distill as T
    from didi_jax import parallel
    from didi_jax.distill import didi as distill
    from didi_jax.train import distill_state as ds
    assert jax.device_count() == 8, jax.devices()
    cfg = T.tiny_cfg(batch_size=8)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2, 1
    tp = T.teacher_params(cfg)
    state = ds.init_distill_state(cfg, tp, jax.random.key(1))
    sgd, dgd = ds.make_graphdefs(cfg)
    x = jax.random.randint(jax.random.key(2), (8, T.LENGTH), 0, T.MASK)
    mesh = parallel.make_mesh(cfg.mesh)
    sh_state = parallel.shard_params(mesh, state)
    sh_tp = parallel.shard_params(mesh, tp)
    sh_x = jax.device_put(x, parallel.batch_sharding(mesh))
    assert not sh_state.student['blocks'][0]['mlp_0']['kernel'][...].sharding.is_fully_replicated
    assert not sh_x.sharding.is_fully_replicated
    step = jax.jit(distill.make_distill_step(cfg, sgd, dgd), compiler_options=T.JIT_OPTS)
    out_state, out_met = step(sh_state, sh_tp, sh_x, jax.random.key(5))
    ref = np.load({ref!r})
    for k in out_met:
      np.testing.assert_allclose(float(out_met[k]), ref['met_' + k], rtol=1e-5, atol=1e-5,
                                 err_msg=k)
    leaves = jax.tree.leaves(out_state)
    assert len(leaves) == int(ref['n_leaves'])
    for i, a in enumerate(leaves):
      np.testing.assert_allclose(np.asarray(a), ref[f'leaf_{{i}}'], rtol=1e-5, atol=1e-5)
    print('SHARDED_OK')
''')


def test_sharded_step_equals_single_device(default_run, tmp_path):
  """One step on a (data=4, fsdp=2) mesh of 8 fake CPU devices == the single-device step."""
  pytest.importorskip('didi_jax.parallel')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  leaves = jax.tree.leaves(default_run['state1'])
  ref = {f'leaf_{i}': np.asarray(a) for i, a in enumerate(leaves)}
  ref |= {'met_' + k: np.asarray(v) for k, v in default_run['metrics'].items()}
  ref['n_leaves'] = np.asarray(len(leaves))
  np.savez(tmp_path / 'ref.npz', **ref)
  script = tmp_path / 'sharded.py'
  script.write_text(_SHARDED_SCRIPT.format(root=root, tests=os.path.join(root, 'tests'),
                                           ref=str(tmp_path / 'ref.npz')))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and 'SHARDED_OK' in proc.stdout, proc.stdout + proc.stderr[-4000:]
