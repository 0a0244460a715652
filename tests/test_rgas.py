"""Tests of reward-guided ancestral sampling (docs/method.md §8.3).

Closed forms: one tilting step and one re-ranking step, each drawn many times, against their exact
laws computed in NumPy (chi-square, with power checks that plausible wrong laws are rejected); the
scanned sampler equals the unrolled per-step functions draw for draw.
"""
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
from didi_jax.sampling import categorical
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

  # A grid entry (i, t, s, α_t, α_s): rerank_step computes σ_s = −log α_s itself.
  step = (jnp.int32(3), jnp.float32(t), jnp.float32(s), jnp.float32(a_t), jnp.float32(a_s))

  @jit
  def run(key):
    k_draw, k_select = jax.random.split(key)
    x = jnp.full((n, 1), MASK, jnp.int32)
    pp = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 1, V))
    return rgas.rerank_step(disc, k_draw, k_select, x, lambda: pp, step, MASK, num_candidates=M,
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


def _chi2_pvalue(counts, law):
  """Goodness of fit of independent categorical rows: counts and law (P, K), n draws per row."""
  counts, law = np.asarray(counts, np.float64), np.asarray(law, np.float64)
  assert counts[law == 0].sum() == 0
  n = counts.sum(-1, keepdims=True)
  keep = law > 0
  expected = law * n
  stat = np.sum(np.where(keep, (counts - expected) ** 2 / np.where(keep, expected, 1.0), 0.0))
  return float(sps.chi2.sf(stat, np.sum(keep.sum(-1) - 1)))


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_rerank_selection_frequencies_match_softmax_of_rewards():
  """Per row, the kept candidate is drawn from softmax(ρ/T) over the M candidates, ρ from D on
  ids at σ_s. The candidates are recomputed from the key layout (draw m of k_draw), identical
  candidates are merged, and the randomised PIT u = Σ_{before} π + U·π_kept must be uniform."""
  n, M, Lr = 20000, 3, 2
  regime = Regime()
  _, rerank_xs = rgas.phase_inputs(4, 0.5, 0.0, 0.0, 1e-5, regime)
  step = tuple(a[0] for a in rerank_xs)                 # grid step 2: t = 0.5 -> s = 0.25
  _, t, s, a_t, a_s = (np.float64(a) for a in step)
  assert (t, s) == (pytest.approx(0.5, abs=1e-5), pytest.approx(0.25, abs=1e-5))
  sigma_t, sigma_s = -np.log(a_t), -np.log(a_s)
  rng = np.random.default_rng(12)
  p = np.array([[0.1, 0.4, 0.2, 0.3, 0.0], [0.3, 0.2, 0.25, 0.25, 0.0]])
  beta = rng.normal(0, 1.0, (Lr, V))                    # position-dependent: few reward ties
  gamma = rng.normal(0, 3.0, (Lr, V))

  def disc(x, sigma_B):
    pos = jnp.arange(Lr)
    return (jnp.asarray(beta, jnp.float32)[pos, x]
            + sigma_B[:, None] * jnp.asarray(gamma, jnp.float32)[pos, x])

  def rewards(cands, sigma):                            # (M, n) 'sum_all' in float64
    return (beta[np.arange(Lr), cands] + sigma * gamma[np.arange(Lr), cands]).sum(-1)

  @functools.partial(jit, static_argnames='temp')
  def run(key, temp):
    k_draw, k_select = jax.random.split(key)
    x = jnp.full((n, Lr), MASK, jnp.int32)
    pp = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, Lr, V))
    out = rgas.rerank_step(disc, k_draw, k_select, x, lambda: pp, step, MASK, num_candidates=M,
                           temperature=temp, reward='sum_all', regime=regime)
    cands = jnp.stack([categorical.ancestral_step(ancestral.draw_key(k_draw, m), x, pp, step[3],
                                                  step[4], MASK, regime) for m in range(M)])
    return out, cands

  for temp, seed in ((0.5, 13), (2.0, 14)):
    out, cands = (np.asarray(a) for a in run(jax.random.key(seed), temp))
    same = np.all(cands[:, None] == cands[None], axis=-1)        # (M, M, n)
    kept = np.all(cands == out[None], axis=-1)                   # (M, n)
    assert np.all(kept.any(0))
    first = np.argmax(same, axis=1)                              # first slot of each group
    first_kept = np.argmax(kept, axis=0)
    assert 0.1 < np.mean(np.all(~same[np.triu_indices(M, 1)], axis=0)) < 0.9   # ties occur
    u_extra = np.random.default_rng(seed).random(n)

    def pit_pvalue(rho_MxN, argmax=False):
      if argmax:
        pi = (rho_MxN == rho_MxN.max(0)).astype(np.float64)
        pi /= pi.sum(0)
      else:
        pi = _softmax64(rho_MxN.T).T
      before = np.sum(pi * (~kept & (first < first_kept)), axis=0)
      u = before + u_extra * np.sum(pi * kept, axis=0)
      counts = np.histogram(u, bins=20, range=(0.0, 1.0))[0]
      return float(sps.chisquare(counts).pvalue)

    rho = rewards(cands, sigma_s)
    assert pit_pvalue(rho / temp) > P_MIN, temp
    # Power: argmax selection, no temperature, D at σ_t are each rejected.
    assert pit_pvalue(rho, argmax=True) < 1e-8
    assert pit_pvalue(rho) < 1e-8
    assert pit_pvalue(rewards(cands, sigma_t) / temp) < 1e-8


# ---------------------------------------------------------------------------------------------
# One tilting step in closed form: a σ-dependent discriminator, linear in the soft input, with
# cross-position terms d_i = a(σ)·Σ_j W_ij·(q_j·β). Then ρ = Σ_{i masked} d_i, so
# ∂ρ/∂ℓ_jv = a(σ)·c_j·q_jv·(β_v − q_j·β) with c_j = Σ_{i masked} W_ij (softmax Jacobian).

TILT_X = np.array([MASK, 1, MASK, MASK, 3, MASK])       # masked {0, 2, 3, 5}, revealed {1, 4}
_trng = np.random.default_rng(11)
TILT_RAW = _trng.normal(0, 1.0, (len(TILT_X), V))
TILT_W = _trng.normal(0, 0.7, (len(TILT_X), len(TILT_X)))
TILT_BETA = np.array([1.0, -0.8, 0.6, -0.4, 0.0])
# N = 4, K_tilt = ⌊4·0.75⌋ = 3: h = 2, 4, 6; t_0 = 1 -> 0.75, t_1 = 0.75 -> 0.5.
TILT_KW = dict(steps=4, rerank_ratio=0.25, h_start=2.0, h_end=6.0, t_min=1e-5)


def tilt_a(sigma):
  return 0.4 + 0.3 * sigma


def linear_disc(q, sigma_B, soft_input='logits'):
  assert soft_input == 'probs', soft_input
  d = (q @ jnp.asarray(TILT_BETA, jnp.float32)) @ jnp.asarray(TILT_W.T, jnp.float32)
  return tilt_a(sigma_B)[:, None] * d


def exact_tilt_law(ell, sigma, h, a_t, a_s, rho_rows='masked', clip=1.0):
  """(L, V) law of x_s after one tilting step from TILT_X (float64; revealed rows: their token)."""
  masked = TILT_X == MASK
  q = _softmax64(ell)                                   # the [MASK] column (−1e6) gets 0
  rows = masked if rho_rows == 'masked' else np.ones_like(masked)
  c = TILT_W[rows].sum(0)
  g = tilt_a(sigma) * c[:, None] * q * (TILT_BETA[None, :] - (q @ TILT_BETA)[:, None])
  g = np.where(masked[:, None], np.clip(g, -clip, clip), 0.0)
  g[:, MASK] = 0.0
  p = _softmax64(np.asarray(ell, np.float64) + h * g)
  law = (a_s - a_t) / (1 - a_t) * p
  law[:, MASK] = (1 - a_s) / (1 - a_t)
  law[~masked] = np.eye(V)[TILT_X[~masked]]
  return law, g


@pytest.mark.parametrize('i', [0, 1])
def test_tilt_step_matches_exact_law(i):
  """Tilting step i (σ_{t_i} and h_i from the sampler's own schedule), drawn n times, against
  the exact law; power: σ_{s_i} instead of σ_{t_i}, h_end (or h_start) instead of h_i, ρ over all
  positions, and no tilt are each rejected."""
  n = 40000
  regime = Regime()
  tilt_xs, _ = rgas.phase_inputs(regime=regime, **TILT_KW)
  step, h = jax.tree.map(lambda a: a[i], tilt_xs)
  _, t, s, a_t, a_s = (np.float64(a) for a in step)
  h_i = 2.0 + (6.0 - 2.0) * i / (3 - 1)
  assert float(h) == h_i and t == pytest.approx(1 - 0.25 * i, abs=1e-5)
  sigma_t, sigma_s = -np.log(a_t), -np.log(a_s)
  ell = ancestral.sampling_logits(jnp.asarray(TILT_RAW, jnp.float32), MASK, 'subs', regime)
  x = jnp.broadcast_to(jnp.asarray(TILT_X, jnp.int32), (n, len(TILT_X)))

  @jit
  def run(key):
    return rgas.tilt_step(linear_disc, key, x, jnp.broadcast_to(ell, x.shape + (V,)), step, h,
                          MASK, clip=1.0, output='subs', regime=regime)

  out = np.asarray(run(jax.random.key(20 + i)))
  counts = np.stack([np.bincount(out[:, j], minlength=V) for j in range(len(TILT_X))])
  ell = np.asarray(ell, np.float64)
  law, g = exact_tilt_law(ell, sigma_t, h_i, a_t, a_s)
  masked = TILT_X == MASK
  assert np.mean(np.abs(g[masked, :MASK]) < 1.0) > 0.5
  assert np.any(np.abs(g) == 1.0) == (i == 0)          # the clip acts at σ_{t_0} = 6.9 only
  np.testing.assert_array_equal(counts[~masked], n * law[~masked])   # revealed rows kept
  pval = lambda lw: _chi2_pvalue(counts[masked], lw[masked])      # noqa: E731
  assert pval(law) > P_MIN
  wrong = {
      'sigma_s': exact_tilt_law(ell, sigma_s, h_i, a_t, a_s)[0],
      'h_end': exact_tilt_law(ell, sigma_t, 6.0, a_t, a_s)[0],
      'rho over all positions': exact_tilt_law(ell, sigma_t, h_i, a_t, a_s, 'all')[0],
      'no tilt': exact_tilt_law(ell, sigma_t, 0.0, a_t, a_s)[0],
  }
  if i > 0:
    wrong['h_start'] = exact_tilt_law(ell, sigma_t, 2.0, a_t, a_s)[0]
  for name, lw in wrong.items():
    assert pval(lw) < 1e-8, name


def test_rgas_scan_equals_unrolled_steps():
  """rgas_sample == the per-step functions unrolled over an independently built schedule (t_i,
  h_i, student at σ_{t_i}, keys per step), draw for draw: with the per-step laws above this pins
  the sampler's law."""
  B, Lx, steps, M, temp = 64, 6, 6, 3, 0.8
  h_start, h_end, ratio = 2.0, 5.0, 0.5
  regime = Regime()
  rng = np.random.default_rng(13)
  C = jnp.asarray(rng.normal(0, 1.0, (V,)), jnp.float32)
  Wd = jnp.asarray(rng.normal(0, 0.7, (Lx, Lx)), jnp.float32)

  def denoise(x, sigma_B):                              # σ-dependent student
    return fake_denoiser(x, sigma_B) + 0.5 * sigma_B[:, None, None] * C

  def disc(x, sigma_B, soft_input='logits'):
    if jnp.issubdtype(x.dtype, jnp.integer):
      q = jax.nn.one_hot(x, V)
    else:
      assert soft_input == 'probs', soft_input
      q = x
    return tilt_a(sigma_B)[:, None] * ((q @ jnp.asarray(TILT_BETA, jnp.float32)) @ Wd.T)

  @jit
  def scanned(key):
    return rgas.rgas_sample(denoise, disc, key, B, Lx, MASK, steps=steps, num_candidates=M,
                            h_start=h_start, h_end=h_end, rerank_ratio=ratio,
                            rerank_temperature=temp, noise_removal='none', cache=False,
                            sigma_mode='true', t_min=1e-5)[0]

  @jit
  def unrolled(key):
    key_loop, _ = jax.random.split(key)
    x = jnp.full((B, Lx), MASK, jnp.int32)
    k_tilt = int(np.floor(steps * (1 - ratio)))
    idx, t, s, a_t, a_s = ancestral.step_grid(steps, 1e-5, regime)
    for i in range(steps):
      step = (idx[i], t[i], s[i], a_t[i], a_s[i])
      k_draw, k_select = ancestral.step_keys(key_loop, i)
      out = denoise(x, jnp.full((B,), diffusion.sigma(t[i]), jnp.float32))
      ell = ancestral.sampling_logits(out, MASK, 'subs', regime)
      if i < k_tilt:
        h = np.float32(h_start) + np.float32(h_end - h_start) * np.float32(i) / np.float32(
            max(1, k_tilt - 1))
        x = rgas.tilt_step(disc, k_draw, x, ell, step, jnp.float32(h), MASK, clip=1.0,
                           output='subs', regime=regime)
      else:
        x = rgas.rerank_step(disc, k_draw, k_select, x,
                             lambda ell=ell: categorical.probs_from_logits(ell, regime), step,
                             MASK, num_candidates=M, temperature=temp, reward='sum_all',
                             regime=regime)
    return x

  key = jax.random.key(30)
  a, b = np.asarray(scanned(key)), np.asarray(unrolled(key))
  np.testing.assert_array_equal(a, b)


def test_tilt_gradient_through_a_discriminator_is_the_official_logits_form():
  """RGAS feeds D probabilities through the named 'probs' path; the official code feeds logits
  (ℓ at masked rows, one-hot·1e9 at revealed rows) to the default path: same gradient."""
  cfg = tiny_model_config()
  g_disc, p_disc = build(disc_lib.Discriminator, cfg, 2)
  mask_id = cfg.vocab_size - 1
  key = jax.random.key(40)
  raw = jax.random.normal(key, (2, 8, cfg.vocab_size)) * 2
  x = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (2, 8)), mask_id,
                jax.random.randint(jax.random.fold_in(key, 2), (2, 8), 0, mask_id))
  masked = x == mask_id
  sigma = jnp.array([0.3, 2.0])

  @jit
  def run(p_disc):
    disc = nnx.merge(g_disc, p_disc)
    ell = ancestral.sampling_logits(raw, mask_id, 'subs', Regime())
    ours = rgas.tilt_gradient(disc, ell, x, sigma, mask_id, clip=1e6, output='subs')

    def rho_official(e):
      soft = jnp.where(masked[..., None], e, 1e9 * jax.nn.one_hot(x, cfg.vocab_size))
      return jnp.sum(jnp.where(masked, disc(soft, sigma), 0.0))
    keep = masked[..., None] & (jnp.arange(cfg.vocab_size) != mask_id)
    return ours, jnp.where(keep, jax.grad(rho_official)(ell), 0.0)

  ours, official = (np.asarray(a) for a in run(p_disc))
  assert np.max(np.abs(official)) > 1e-2 and np.all(ours[~np.asarray(masked)] == 0)
  np.testing.assert_allclose(ours, official, rtol=0, atol=1e-5 * np.max(np.abs(official)))


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
