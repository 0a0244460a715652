"""Tests of reward-guided ancestral sampling (SPEC §8.3)."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from didi_jax import config as config_lib
from didi_jax import diffusion
from didi_jax.models import discriminator as disc_lib
from didi_jax.models import dit
from didi_jax.sampling import ancestral
from didi_jax.sampling import rgas
from didi_jax.sampling.categorical import Regime

P_MIN = 1e-4
# Tiny programs: XLA's LLVM optimisation dominates the runtime, so skip it (same semantics).
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def tiny_model_config(vocab=16, length=8):
  cfg = config_lib.model_config('tiny', vocab_size=vocab, length=length)
  cfg.update(hidden_size=32, n_blocks=1, n_heads=2, mlp_dim=64, cond_dim=16,
             compute_dtype='float32')
  return cfg


def build(cls, cfg, seed, randomise_output=False):
  """Builds an NNX module inside one jit (fast), optionally with a random output layer."""

  def make():
    model = cls(cfg, rngs=nnx.Rngs(seed))
    if randomise_output:
      lin = model.output_layer.linear
      lin.kernel[...] = jax.random.normal(jax.random.key(seed + 1), lin.kernel[...].shape)
    return nnx.split(model)[1]

  graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))[0]
  return graphdef, jit(make)()


# ---------------------------------------------------------------------------------------------
# Fake networks: V = 5 (tokens 0..3, [MASK] = 4); the denoiser depends on the previous position.

V = 5
MASK = V - 1
FAV = 2               # the token the fake discriminator likes
_rng = np.random.default_rng(1)
W = jnp.asarray(_rng.normal(0, 0.3, (V,)), jnp.float32)
U = jnp.asarray(_rng.normal(0, 0.3, (V, V)), jnp.float32)


def fake_denoiser(x_BxL, sigma_B):
  prev = jnp.roll(x_BxL, 1, axis=1)
  return W + U[prev] + 0.0 * sigma_B[:, None, None]


def fake_disc(x, sigma_B, beta=2.0, soft_input='logits'):
  """High logit where the token is FAV: β·1[x = FAV] on ids, β·q_FAV on probabilities (RGAS
  must name the probability path: soft_input='probs')."""
  del sigma_B
  if jnp.issubdtype(x.dtype, jnp.integer):
    return beta * (x == FAV).astype(jnp.float32)
  assert soft_input == 'probs', soft_input
  return beta * x[..., FAV]


def probs_only(fn):
  """A soft-input disc_fn(q, σ) wrapped to check that RGAS passes soft_input='probs'."""

  def disc(q, sigma_B, soft_input='logits'):
    assert soft_input == 'probs', soft_input
    return fn(q, sigma_B)
  return disc


# ---------------------------------------------------------------------------------------------


def test_h0_m1_equals_ancestral_on_tiny_dit():
  cfg = tiny_model_config()
  g_dit, p_dit = build(dit.DiT, cfg, 0, randomise_output=True)
  g_disc, p_disc = build(disc_lib.Discriminator, cfg, 2)
  B, Lx, mask_id, steps = 3, 8, 15, 6

  @jit
  def run(p_dit, p_disc, key):
    student = nnx.merge(g_dit, p_dit)
    disc = nnx.merge(g_disc, p_disc)
    ids_r, st_r = rgas.rgas_sample(student, disc, key, B, Lx, mask_id, steps=steps,
                                   num_candidates=1, h_start=0.0, h_end=0.0)
    ids_a, st_a = ancestral.ancestral_sample(student, key, B, Lx, mask_id, steps=steps)
    return ids_r, st_r, ids_a, st_a

  ids_r, st_r, ids_a, st_a = run(p_dit, p_disc, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(ids_r), np.asarray(ids_a))
  assert not np.any(np.asarray(ids_r) == mask_id) and int(st_r['masked_remaining']) == 0
  np.testing.assert_array_equal(np.asarray(st_r['masked_per_step']),
                                np.asarray(st_a['masked_per_step']))
  assert int(st_r['student_forwards']) == int(st_a['student_forwards'])
  assert int(st_r['disc_forwards']) == 3 + 1 * 3 and int(st_r['disc_backwards']) == 3
  assert int(st_r['nfe']) == steps


def test_num_tilt_steps_and_scales():
  assert rgas.num_tilt_steps(16, 0.5) == 8
  assert rgas.num_tilt_steps(100, 0.42) == 58
  assert rgas.num_tilt_steps(8, 1.0) == 0 and rgas.num_tilt_steps(8, 0.0) == 8
  np.testing.assert_allclose(rgas.tilt_scales(8, 30.0, 40.0), 30 + 10 * np.arange(8) / 7,
                             rtol=1e-6)
  np.testing.assert_allclose(rgas.tilt_scales(1, 30.0, 40.0), [30.0])


@pytest.mark.parametrize('output', ['subs', 'raw'])
def test_tilt_gradient_closed_form(output):
  """Linear D(q) = (1 + σ)·q·β: ∂ρ/∂ℓ_v = (1 + σ)·q_v·(β_v − q·β) at masked rows, 0 elsewhere."""
  B, Lx = 3, 4
  key = jax.random.key(3)
  raw = jax.random.normal(key, (B, Lx, V)) * 2
  x = jnp.array([[MASK, 1, MASK, MASK], [0, MASK, MASK, 3], [MASK, MASK, MASK, MASK]])
  beta = jnp.array([3.0, -1.0, 0.5, 2.0, 1.5])
  sigma = jnp.array([0.0, 0.5, 2.0])
  disc = probs_only(lambda q, s: (1 + s)[:, None] * (q @ beta))
  ell = ancestral.sampling_logits(raw, MASK, output, Regime())
  grad = jit(lambda e: rgas.tilt_gradient(disc, e, x, sigma, MASK, clip=1.0, output=output))
  g = np.asarray(grad(ell))
  q = np.asarray(jax.nn.softmax(ell, axis=-1), np.float64)
  b = np.asarray(beta, np.float64)
  want = (1 + np.asarray(sigma))[:, None, None] * q * (b - (q @ b)[..., None])
  want = np.where(np.asarray(x == MASK)[..., None], want, 0.0)
  if output == 'subs':
    assert np.all(g[..., MASK] == 0)
  else:
    assert np.any(g[..., MASK] != 0)
  np.testing.assert_allclose(g, np.clip(want, -1, 1), atol=1e-5)
  assert np.any(np.abs(want) > 1)        # the clip is exercised


def test_tilt_gradient_uses_one_hot_at_revealed_rows():
  """Non-linear D with cross-position terms: compare with central finite differences of
  ρ(ℓ) = Σ_masked D(q) built independently (one-hot rows where revealed)."""
  B, Lx = 2, 3
  raw = jax.random.normal(jax.random.key(4), (B, Lx, V))
  x = jnp.array([[MASK, 1, MASK], [3, MASK, MASK]])
  beta = jnp.array([1.0, -2.0, 0.5, 1.0, 0.0])
  disc = probs_only(lambda q, s: jnp.tanh(q @ beta) * jnp.sum(q[..., 1], axis=-1, keepdims=True))
  ell = ancestral.sampling_logits(raw, MASK, 'subs', Regime())
  g = np.asarray(jit(lambda e: rgas.tilt_gradient(disc, e, x, jnp.zeros(B), MASK, clip=100.0,
                                                   output='subs'))(ell))

  ell64 = np.asarray(ell, np.float64)
  xn = np.asarray(x)

  def rho(e):
    q = np.exp(e - e.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    for b, pos in zip(*np.nonzero(xn != MASK), strict=True):
      q[b, pos] = np.eye(V)[xn[b, pos]]
    d = np.tanh(q @ np.asarray(beta, np.float64)) * q[..., 1].sum(-1, keepdims=True)
    return d[xn == MASK].sum()

  eps = 1e-4
  fd = np.zeros_like(ell64)
  for idx in itertools.product(range(B), range(Lx), range(V - 1)):
    if xn[idx[0], idx[1]] != MASK:
      continue
    e1, e2 = ell64.copy(), ell64.copy()
    e1[idx] += eps
    e2[idx] -= eps
    fd[idx] = (rho(e1) - rho(e2)) / (2 * eps)
  np.testing.assert_allclose(g, fd, atol=2e-4)
  assert np.abs(fd).max() > 0.05


def test_candidate_rewards():
  d = jnp.array([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]])
  x = jnp.array([[MASK, 0, MASK], [1, 2, 3]])
  np.testing.assert_allclose(rgas.candidate_reward(d, x, MASK, 'sum_all'), [6.0, 3.5])
  np.testing.assert_allclose(rgas.candidate_reward(d, x, MASK, 'sum_masked'), [4.0, 0.0])
  np.testing.assert_allclose(rgas.candidate_reward(d, x, MASK, 'mean_masked'), [2.0, 0.0])


def _exact_rerank_law(p, a_t, a_s, reward, M, temperature, argmax=False):
  """Law of the kept candidate for one position from [MASK]: candidates iid from the §7.2
  transition, the kept one drawn from softmax(reward/temperature) (or the argmax)."""
  w = np.asarray(p, np.float64) * (a_s - a_t)
  w[MASK] = 1 - a_s
  q = w / w.sum()
  law = np.zeros(V)
  for tup in itertools.product(range(V), repeat=M):
    pt = np.prod(q[list(tup)])
    if pt == 0:
      continue
    r = np.array([reward[v] for v in tup]) / temperature
    if argmax:
      sel = np.zeros(M)
      sel[np.argmax(r)] = 1
    else:
      sel = np.exp(r - r.max())
      sel /= sel.sum()
    for j, v in enumerate(tup):
      law[v] += pt * sel[j]
  return law


def test_rerank_step_matches_exact_law():
  n, M, temp = 20000, 3, 0.7
  t, s = 1.0, 0.4
  a_t, a_s = float(diffusion.alpha(t)), float(diffusion.alpha(s))
  sigma_s = -np.log(a_s)
  p = np.array([0.1, 0.4, 0.2, 0.3, 0.0])
  beta = np.array([1.0, -0.5, 0.3, 0.8, -0.2])
  gamma = np.array([0.0, 0.6, -0.4, 0.2, 0.3])

  def disc(x, sigma_B):
    return jnp.asarray(beta, jnp.float32)[x] + sigma_B[:, None] * jnp.asarray(gamma, jnp.float32)[x]

  @jit
  def run(key):
    k_draw, k_select = jax.random.split(key)
    x = jnp.full((n, 1), MASK, jnp.int32)
    pp = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 1, V))
    return rgas.rerank_step(disc, k_draw, k_select, x, lambda: pp, a_t, a_s,
                            jnp.full((n,), sigma_s, jnp.float32), MASK, num_candidates=M,
                            temperature=temp, reward='sum_all', regime=Regime())

  out = np.asarray(run(jax.random.key(5)))[:, 0]
  counts = np.bincount(out, minlength=V)
  reward = beta + sigma_s * gamma                 # D is called at σ_s
  law = _exact_rerank_law(p, a_t, a_s, reward, M, temp)
  assert counts[law == 0].sum() == 0
  pval = lambda lw: sps.chisquare(counts[lw > 0], lw[lw > 0] * n).pvalue
  assert pval(law) > P_MIN
  # Power: argmax selection, temperature 1, or D at σ_t would each be rejected.
  assert pval(_exact_rerank_law(p, a_t, a_s, reward, M, temp, argmax=True)) < 1e-8
  assert pval(_exact_rerank_law(p, a_t, a_s, reward, M, 1.0)) < 1e-8
  reward_t = beta - np.log(a_t) * gamma
  assert pval(_exact_rerank_law(p, a_t, a_s, reward_t, M, temp)) < 1e-8


@functools.partial(jit, static_argnames=('batch', 'length', 'kind', 'kw'))
def _run_fake(key, batch, length, kind, kw):
  if kind == 'ancestral':
    return ancestral.ancestral_sample(fake_denoiser, key, batch, length, MASK, **dict(kw))
  return rgas.rgas_sample(fake_denoiser, fake_disc, key, batch, length, MASK, **dict(kw))


def run_fake(key, batch, length, kind, **kw):
  return _run_fake(key, batch, length, kind, tuple(sorted(kw.items())))


def test_disc_preference_raises_token_frequency():
  B, Lx, steps = 256, 8, 8
  n = B * Lx
  anc, _ = run_fake(jax.random.key(6), B, Lx, 'ancestral', steps=steps)
  f_anc = np.mean(np.asarray(anc) == FAV)
  for ratio in (0.0, 1.0):      # tilt only, re-rank only
    ids, st = run_fake(jax.random.key(7), B, Lx, 'rgas', steps=steps, rerank_ratio=ratio)
    ids = np.asarray(ids)
    assert not np.any(ids == MASK) and int(st['masked_remaining']) == 0
    f = np.mean(ids == FAV)
    sd = np.sqrt(f_anc * (1 - f_anc) / n + f * (1 - f) / n)
    assert f - f_anc > 6 * sd, (ratio, f, f_anc)


def test_rgas_cache_is_exact_and_counts():
  B, Lx, steps = 2, 2, 16
  ids_c, st_c = run_fake(jax.random.key(8), B, Lx, 'rgas', steps=steps, cache=True)
  ids_u, st_u = run_fake(jax.random.key(8), B, Lx, 'rgas', steps=steps, cache=False)
  np.testing.assert_array_equal(np.asarray(ids_c), np.asarray(ids_u))
  hits = int(st_c['cache_hits'])
  assert hits > 0 and int(st_c['student_forwards']) == steps + 1 - hits
  assert int(st_u['student_forwards']) == steps + 1 and int(st_u['cache_hits']) == 0
  assert int(st_c['disc_forwards']) == 8 + 4 * 8 and int(st_c['disc_backwards']) == 8
  # Release-reproduction knobs: raw outputs, true σ (cache off), bf16 probabilities.
  ids_r, st_r = run_fake(jax.random.key(9), B, Lx, 'rgas', steps=steps, output='raw',
                         sigma_mode='true', regime=Regime(bf16_probs=True))
  assert int(st_r['cache_hits']) == 0 and not np.any(np.asarray(ids_r) == MASK)


def test_rgas_argument_errors():
  with pytest.raises(ValueError, match='rerank_reward'):
    run_fake(jax.random.key(0), 2, 2, 'rgas', steps=2, rerank_reward='max')
  with pytest.raises(ValueError, match='num_candidates'):
    run_fake(jax.random.key(0), 2, 2, 'rgas', steps=2, num_candidates=0)


def test_sample_from_config_dispatches():
  from didi_jax import sampling
  cfg = config_lib.base_config().sampler
  cfg.update(kind='rgas', steps=4, noise_removal='greedy')
  cfg.rgas.num_candidates = 3
  run = jit(lambda key: sampling.sample_from_config(cfg, key, 2, 3, MASK, denoise_fn=fake_denoiser,
                                                    disc_fn=fake_disc))
  ids, st = run(jax.random.key(10))
  assert ids.shape == (2, 3) and not np.any(np.asarray(ids) == MASK)
  assert int(st['nfe']) == 4 and int(st['disc_forwards']) == 2 + 3 * 2
  with pytest.raises(ValueError, match='disc_fn'):
    sampling.sample_from_config(cfg, jax.random.key(0), 2, 3, MASK, denoise_fn=fake_denoiser)
