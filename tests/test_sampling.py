"""Tests of the categorical draw, the ancestral sampler (+cache, sparse reveal) and cost accounting.

Distribution tests compare empirical frequencies with an exact enumeration of the reverse chain
(numpy, float64) for a fake denoiser whose logits depend on the other position's token, so the
order of reveals matters and a wrong transition formula moves the final distribution.
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
from didi_jax.models import dit
from didi_jax.sampling import ancestral
from didi_jax.sampling import categorical
from didi_jax.sampling import cost
from didi_jax.sampling.categorical import Regime

P_MIN = 1e-4          # chi-square acceptance threshold (false alarm rate per test)
# Tiny programs: XLA's LLVM optimisation dominates the runtime, so skip it (same semantics).
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
V = 4                 # fake vocabulary: tokens 0..2, [MASK] = 3
MASK = V - 1
L = 2

# ---------------------------------------------------------------------------------------------
# Fake denoiser: logits_l = W_l + U_{l, x_other} + σ·C_l, written as features @ projection so
# the sparse sampler can use the same network.

_rng = np.random.default_rng(0)
W = _rng.normal(0, 1.5, (L, V))
U = _rng.normal(0, 1.5, (L, V, V))
C = _rng.normal(0, 1.0, (L, V))
D_FEAT = L + L * V + L
PROJ = np.concatenate([W, U.reshape(L * V, V), C], axis=0)     # (D_FEAT, V)


def fake_features(x_BxL, sigma_B):
  other = x_BxL[:, ::-1]
  pos = jnp.broadcast_to(jnp.eye(L), x_BxL.shape + (L,))
  inter = (jnp.eye(L)[None, :, :, None] * jax.nn.one_hot(other, V)[:, :, None, :])
  inter = inter.reshape(x_BxL.shape + (L * V,))
  sig = pos * sigma_B[:, None, None]
  return jnp.concatenate([pos, inter, sig], axis=-1).astype(jnp.float32)


def fake_project(f):
  return f @ jnp.asarray(PROJ, jnp.float32)


def fake_denoiser(x_BxL, sigma_B):
  return fake_project(fake_features(x_BxL, sigma_B))


def np_logits(x, sigma):
  return np.stack([W[i] + U[i, x[1 - i]] + sigma * C[i] for i in range(L)])


def np_top_p(p, top_p):
  out = np.zeros_like(p)
  for r in range(p.shape[0]):
    order = sorted(range(p.shape[1]), key=lambda v: (-p[r, v], v))
    total = 0.0
    for v in order:
      if total >= top_p:
        break
      out[r, v] = p[r, v]
      total += p[r, v]
  return out / out.sum(-1, keepdims=True)


def np_probs(logits, output, temperature, top_p):
  z = logits / temperature
  if output == 'subs':
    z = z.copy()
    z[:, MASK] = -np.inf
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np_top_p(p, top_p) if top_p < 1 else p


def exact_distribution(steps, *, t_min, output='subs', sigma_mode='zero', noise_removal='sample',
                       temperature=1.0, top_p=1.0):
  """Exact law of the final (x_0, x_1) of the §8.2 sampler for the fake denoiser."""
  states = list(itertools.product(range(V), repeat=L))
  dist = {s: 0.0 for s in states}
  dist[(MASK,) * L] = 1.0
  dt = (1 - t_min) / steps
  for t in np.linspace(1.0, t_min, steps + 1)[:-1]:
    s = t - dt
    a_t, a_s = diffusion.alpha(t), diffusion.alpha(s)
    new = {st: 0.0 for st in states}
    for x, px in dist.items():
      if px == 0:
        continue
      sig = -np.log(a_t) if sigma_mode == 'true' else 0.0
      p = np_probs(np_logits(x, sig), output, temperature, top_p)
      per_pos = []
      for i in range(L):
        if x[i] != MASK:
          per_pos.append(np.eye(V)[x[i]])
        else:
          w = p[i] * (a_s - a_t)
          w[MASK] = 1 - a_s
          per_pos.append(w / w.sum())
      for y in states:
        new[y] += px * np.prod([per_pos[i][y[i]] for i in range(L)])
    dist = new
  if noise_removal == 'none':
    return dist
  final = {st: 0.0 for st in states}
  sig = -np.log(diffusion.alpha(t_min)) if sigma_mode == 'true' else 0.0
  for x, px in dist.items():
    p = np_probs(np_logits(x, sig), 'subs', temperature, top_p)
    per_pos = []
    for i in range(L):
      if x[i] != MASK:
        per_pos.append(np.eye(V)[x[i]])
      elif noise_removal == 'greedy':
        per_pos.append(np.eye(V)[np.argmax(p[i])])
      else:
        per_pos.append(p[i])
    for y in states:
      final[y] += px * np.prod([per_pos[i][y[i]] for i in range(L)])
  return final


def chi2_pvalue(samples_BxL, dist):
  """Goodness of fit of joint (x_0, x_1) counts; zero-probability states must never occur."""
  samples = np.asarray(samples_BxL)
  codes = samples[:, 0] * V + samples[:, 1]
  counts = np.bincount(codes, minlength=V * V)
  expected = np.array([dist[(c // V, c % V)] for c in range(V * V)]) * len(samples)
  zero = expected < 1e-9
  assert counts[zero].sum() == 0, f'impossible states drawn: {np.nonzero(counts * zero)}'
  return sps.chisquare(counts[~zero], expected[~zero] * counts.sum() / expected[~zero].sum()).pvalue


def two_sample_pvalue(a_BxL, b_BxL):
  ca = np.bincount(np.asarray(a_BxL)[:, 0] * V + np.asarray(a_BxL)[:, 1], minlength=V * V)
  cb = np.bincount(np.asarray(b_BxL)[:, 0] * V + np.asarray(b_BxL)[:, 1], minlength=V * V)
  keep = (ca + cb) > 0
  return sps.chi2_contingency(np.stack([ca[keep], cb[keep]])).pvalue


@functools.partial(jit, static_argnames=('batch', 'kw'))
def _run_fake(key, batch, kw):
  return ancestral.ancestral_sample(fake_denoiser, key, batch, L, MASK, **dict(kw))


def run_fake(key, batch, **kw):
  return _run_fake(key, batch, tuple(sorted(kw.items())))


# ---------------------------------------------------------------------------------------------
# Categorical draw.


def test_torch_uniform_edges_and_resolution():
  bits = jnp.array([0, 1, 2 ** 31, 2 ** 32 - 129, 2 ** 32 - 128, 2 ** 32 - 1], jnp.uint32)
  u = np.asarray(categorical.torch_uniform_from_bits(bits))
  assert u[0] == np.float32(2.0 ** -33)
  assert u[2] == np.float32(0.5 + 2.0 ** -33)
  # Bits that round up to 2^32 give u == 1, which maps to 0.
  assert u[-1] == 0.0 and u[-2] == 0.0
  assert u[-3] == np.float32(1 - 2.0 ** -24)        # the largest value below 1
  assert np.all(u < 1.0)
  e = np.asarray(categorical.exponentials_from_uniform(jnp.asarray(u), Regime()))
  assert np.isclose(e[-3], 5.96e-8, rtol=1e-2)       # E ≥ ≈5.96e-8 (resolution below 1)
  assert np.isclose(e[-1], 1e-10 - np.log(1e-10))    # U = 0: the 1e-10 floor
  # All generated uniforms share the grid: min E over many draws is ≥ 5.96e-8.
  many = categorical.uniform(jax.random.key(0), (1 << 20,), Regime())
  assert float(jnp.max(many)) <= 1 - 2.0 ** -24
  assert float(jnp.min(categorical.exponentials_from_uniform(many, Regime()))) >= 5.9e-8


def test_race_frequencies_match_weights():
  w = jnp.array([0.1, 0.0, 2.0, 0.9])      # unnormalised, one zero weight
  for regime in (Regime(), Regime(uniform='jax')):
    idx = categorical.race(jax.random.key(1), jnp.broadcast_to(w, (40000, 4)), regime)
    counts = np.bincount(np.asarray(idx), minlength=4)
    assert counts[1] == 0
    keep = np.array([0, 2, 3])
    exp = np.asarray(w)[keep] / float(jnp.sum(w)) * 40000
    assert sps.chisquare(counts[keep], exp).pvalue > P_MIN


def test_top_p_filter_keeps_nucleus():
  p = jnp.array([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01], [0.4, 0.2, 0.2, 0.2]])
  got = np.asarray(categorical.top_p_filter(p, 0.7))
  np.testing.assert_allclose(got[0], [0.5 / 0.8, 0, 0.3 / 0.8, 0], rtol=1e-6)
  np.testing.assert_allclose(got[1], [1, 0, 0, 0], rtol=1e-6)        # top token always kept
  np.testing.assert_allclose(got[2], [0.5, 0.25, 0.25, 0], rtol=1e-6)   # ties by index
  np.testing.assert_allclose(got, np_top_p(np.asarray(p, np.float64), 0.7), atol=1e-6)


def test_ancestral_step_reveal_rate_and_tokens():
  """From all-[MASK]: P(stay) = (1−α_s)/(1−α_t); revealed tokens ∝ p (subs) and copied ones kept."""
  n = 50000
  p = jnp.array([0.2, 0.5, 0.3, 0.0])
  a_t, a_s = diffusion.alpha(0.9), diffusion.alpha(0.6)
  x = jnp.full((n, 1), MASK).at[:10, 0].set(1)
  out = np.asarray(categorical.ancestral_step(jax.random.key(2), x, jnp.broadcast_to(p, (n, 1, V)),
                                              a_t, a_s, MASK, Regime()))[:, 0]
  assert np.all(out[:10] == 1)
  out = out[10:]
  q_stay = (1 - a_s) / (1 - a_t)
  m = n - 10
  assert abs(np.mean(out == MASK) - q_stay) < 5 * np.sqrt(q_stay * (1 - q_stay) / m)
  counts = np.bincount(out[out != MASK], minlength=V)[:3]
  assert sps.chisquare(counts, np.asarray(p[:3]) * counts.sum()).pvalue > P_MIN


# ---------------------------------------------------------------------------------------------
# Ancestral sampler in distribution.

N_DRAWS = 20000


@pytest.mark.parametrize('kw', [
    dict(),                                                    # SUBS, σ = 0, sample
    dict(output='raw', sigma_mode='true', temperature=0.7),    # raw softmax, true σ, cache off
    dict(temperature=0.5),                                     # the entropy frontier's draw
    dict(top_p=0.75, noise_removal='greedy'),
])
def test_ancestral_matches_exact_law(kw):
  steps, t_min = 3, 0.2       # large t_min: noise removal fills many positions
  ids, st = run_fake(jax.random.key(3), N_DRAWS, steps=steps, t_min=t_min, **kw)
  assert int(st['masked_remaining']) == 0
  dist = exact_distribution(steps, t_min=t_min, **kw)
  assert chi2_pvalue(ids, dist) > P_MIN


def test_exact_law_has_power():
  """The reference separates the variants: samples of one setting fail against another's law."""
  steps, t_min = 3, 0.2
  ids, _ = run_fake(jax.random.key(3), N_DRAWS, steps=steps, t_min=t_min, output='raw')
  assert chi2_pvalue(ids, exact_distribution(steps, t_min=t_min, output='raw')) > P_MIN
  assert chi2_pvalue(ids, exact_distribution(steps, t_min=t_min, output='subs')) < 1e-8
  assert chi2_pvalue(ids, exact_distribution(steps, t_min=t_min, output='raw',
                                             temperature=0.9)) < 1e-8
  # One step reveals both positions from the all-[MASK] input: no dependence between them.
  assert chi2_pvalue(ids, exact_distribution(1, t_min=t_min, output='raw')) < 1e-8


def test_noise_removal_none_keeps_masks():
  ids, st = run_fake(jax.random.key(4), N_DRAWS, steps=3, t_min=0.2, noise_removal='none')
  dist = exact_distribution(3, t_min=0.2, noise_removal='none')
  assert int(st['masked_remaining']) == int(np.sum(np.asarray(ids) == MASK)) > 0
  assert int(st['student_forwards']) + int(st['cache_hits']) == 3
  assert chi2_pvalue(ids, dist) > P_MIN


def test_float64_and_float32_agree_in_distribution():
  steps, t_min = 3, 0.2
  dist = exact_distribution(steps, t_min=t_min)
  ids32, _ = run_fake(jax.random.key(5), N_DRAWS, steps=steps, t_min=t_min)
  with pytest.raises(ValueError, match='64-bit'):
    run_fake(jax.random.key(5), 8, steps=steps, t_min=t_min, regime=Regime(precision='float64'))
  with jax.enable_x64(True):
    ids64, _ = jit(lambda key: ancestral.ancestral_sample(
        fake_denoiser, key, N_DRAWS, L, MASK, steps=steps, t_min=t_min,
        regime=Regime(precision='float64')))(jax.random.key(5))
  assert chi2_pvalue(ids32, dist) > P_MIN
  assert chi2_pvalue(ids64, dist) > P_MIN
  assert two_sample_pvalue(ids32, ids64) > P_MIN


def test_masked_count_per_step_matches_schedule():
  """From all-[MASK], position i is still masked after step k w.p. (1−α_{s_k})/(1−α_1);
  in 'raw' mode the [MASK] mass p_m is discarded, which lowers the reveal rate (§8.3)."""
  B, Lx, steps, t_min = 400, 64, 8, 1e-5

  def const_logits(x, sigma):
    del sigma
    row = jnp.array([0.3, -0.2, 0.5, 1.0])     # [MASK] logit 1.0: p_m ≈ 0.37 in 'raw'
    return jnp.broadcast_to(row, x.shape + (V,))

  n = B * Lx
  t = np.linspace(1, t_min, steps + 1)[:-1]
  s = t - (1 - t_min) / steps
  a_t, a_s = diffusion.alpha(t), diffusion.alpha(s)
  for output in ('subs', 'raw'):
    run = jit(functools.partial(ancestral.ancestral_sample, const_logits, batch_size=B,
                                length=Lx, mask_id=MASK, steps=steps, output=output,
                                noise_removal='none'))
    _, st = run(jax.random.key(6))
    counts = np.asarray(st['masked_per_step'])
    if output == 'subs':
      q = np.cumprod((1 - a_s) / (1 - a_t))
    else:
      pm = np.exp(1.0) / np.exp([0.3, -0.2, 0.5, 1.0]).sum()
      q = np.cumprod((1 - a_s) / ((1 - a_s) + (1 - pm) * (a_s - a_t)))
    sd = np.sqrt(n * q * (1 - q)) + 1
    assert np.all(np.abs(counts - n * q) < 5 * sd), (output, counts, n * q)
  # The two laws differ by far more than the noise at step 1.
  assert abs(q[0] - (1 - a_s[0]) / (1 - a_t[0])) * n > 20 * sd[0]


# ---------------------------------------------------------------------------------------------
# Scan vs an unrolled reference, and the cache, on a tiny random DiT.


def tiny_model_config(vocab=16, length=8):
  cfg = config_lib.model_config('tiny', vocab_size=vocab, length=length)
  cfg.update(hidden_size=32, n_blocks=1, n_heads=2, mlp_dim=64, cond_dim=16,
             compute_dtype='float32')
  return cfg


@functools.cache
def tiny_dit():
  """A tiny DiT (vocab 16, L 8) with a random output layer (a fresh one outputs zeros)."""
  cfg = tiny_model_config()

  def build():
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(7))
    lin, ada = model.output_layer.linear, model.output_layer.adaLN_modulation
    lin.kernel[...] = jax.random.normal(k1, lin.kernel[...].shape)
    ada.kernel[...] = jax.random.normal(k2, ada.kernel[...].shape) * 0.1
    return nnx.split(model)[1]

  graphdef = nnx.split(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))[0]
  return nnx.merge(graphdef, jit(build)())


def reference_sampler(denoise, key, B, Lx, mask_id, steps, t_min):
  """Python loop over steps (each step jitted), SUBS via diffusion.subs_logprobs, the same key
  layout, no cache."""
  zeros = jnp.zeros((B,), jnp.float32)
  dt = (1 - t_min) / steps
  grid = np.linspace(1.0, t_min, steps + 1, dtype=np.float32)
  probs = jit(lambda x: jnp.exp(diffusion.subs_logprobs(denoise(x, zeros), x, mask_id)))

  @jit
  def step(x, p, key_loop, i, t):
    k_draw, _ = jax.random.split(jax.random.fold_in(key_loop, i))
    return categorical.ancestral_step(jax.random.fold_in(k_draw, 0), x, p, diffusion.alpha(t),
                                      diffusion.alpha(t - dt), mask_id, Regime())

  @jit
  def final(x, p, key_final):
    return jnp.where(x == mask_id, categorical.race(key_final, p, Regime()), x)

  key_loop, key_final = jax.random.split(key)
  x = jnp.full((B, Lx), mask_id, jnp.int32)
  for i in range(steps):
    x = step(x, probs(x), key_loop, i, grid[i])
  return final(x, probs(x), key_final)


def test_scan_equals_unrolled_reference_and_cache_is_exact():
  B, steps, t_min = 3, 24, 1e-5
  calls = []

  def denoise(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return fake_denoiser(x, sigma)

  @functools.partial(jit, static_argnames=('cache',))
  def run(key, cache):
    return ancestral.ancestral_sample(denoise, key, B, L, MASK, steps=steps, cache=cache,
                                      t_min=t_min)

  key = jax.random.key(8)
  ids_c, st_c = jax.block_until_ready(run(key, True))
  n_calls_cached = len(calls)
  calls.clear()
  ids_u, st_u = jax.block_until_ready(run(key, False))
  n_calls_uncached = len(calls)
  ref = reference_sampler(fake_denoiser, key, B, L, MASK, steps, t_min)
  np.testing.assert_array_equal(np.asarray(ids_u), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(ids_c), np.asarray(ids_u))
  assert not np.any(np.asarray(ids_c) == MASK)
  assert int(st_u['student_forwards']) == steps + 1 == n_calls_uncached
  assert int(st_u['cache_hits']) == 0 and int(st_u['nfe']) == steps
  hits = int(st_c['cache_hits'])
  assert hits > steps // 2                      # 6 reveals over 24 steps: many idle steps
  assert int(st_c['student_forwards']) == steps + 1 - hits == n_calls_cached
  # A cache hit happens exactly when the previous step changed nothing.
  per_step = np.concatenate([[B * L], np.asarray(st_c['masked_per_step'])])
  assert hits == int(np.sum(per_step[1:] == per_step[:-1]))


def test_dit_scan_equals_unrolled_reference():
  model = tiny_dit()
  graphdef, params = nnx.split(model)
  B, Lx, mask_id, steps, t_min = 3, 8, 15, 12, 1e-5

  @jit
  def run(params, key):
    m = nnx.merge(graphdef, params)
    return ancestral.ancestral_sample(m, key, B, Lx, mask_id, steps=steps, t_min=t_min)

  key = jax.random.key(15)
  ids, st = run(params, key)
  ref = reference_sampler(model, key, B, Lx, mask_id, steps, t_min)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref))
  assert int(st['student_forwards']) + int(st['cache_hits']) == steps + 1
  assert int(st['masked_remaining']) == 0


def test_cache_is_off_in_true_sigma_mode():
  _, st = run_fake(jax.random.key(9), 2, steps=40, sigma_mode='true', cache=True)
  assert int(st['cache_hits']) == 0 and int(st['student_forwards']) == 41


def test_argument_errors_are_one_line():
  with pytest.raises(ValueError, match='noise_removal'):
    run_fake(jax.random.key(0), 2, steps=2, noise_removal='argmax')
  with pytest.raises(ValueError, match='x_init'):
    ancestral.ancestral_sample(fake_denoiser, jax.random.key(0), 2, L, MASK, steps=2,
                               x_init=jnp.zeros((3, L), jnp.int32))


def test_x_init_revealed_tokens_are_kept():
  x0 = jnp.array([[1, MASK]] * 2000, jnp.int32)
  run = jit(lambda key, x0: ancestral.ancestral_sample(fake_denoiser, key, 2000, L, MASK,
                                                           steps=2, x_init=x0))
  ids, _ = run(jax.random.key(10), x0)
  ids = np.asarray(ids)
  assert np.all(ids[:, 0] == 1)
  p = np_probs(np_logits((1, MASK), 0.0), 'subs', 1.0, 1.0)[1]    # one step reveals from p(·|x)
  counts = np.bincount(ids[:, 1], minlength=V)
  assert counts[MASK] == 0
  # Position 1's law mixes p(·|x=(1,m)) over steps; all steps see the same input: exactly p.
  assert sps.chisquare(counts[:3], p[:3] * 2000).pvalue > P_MIN


# ---------------------------------------------------------------------------------------------
# Sparse reveal.


@functools.partial(jit, static_argnames=('batch', 'kw'))
def _run_sparse(key, batch, kw):
  return ancestral.sparse_ancestral_sample(fake_features, fake_project, key, batch, L, MASK,
                                           **dict(kw))


def test_sparse_reveal_matches_dense_and_exact_law():
  steps, t_min = 3, 0.2
  dist = exact_distribution(steps, t_min=t_min)
  dense, _ = run_fake(jax.random.key(11), N_DRAWS, steps=steps, t_min=t_min)
  sparse, st = _run_sparse(jax.random.key(12), N_DRAWS,
                           (('capacity_factor', 1.3), ('steps', steps), ('t_min', t_min)))
  assert int(st['dense_fallbacks']) == 0
  cap = ancestral.sparse_capacity(N_DRAWS, L, steps, 1.3)
  assert int(st['projected_rows']) == cap * (steps + 1) < N_DRAWS * L * (steps + 1)
  assert chi2_pvalue(sparse, dist) > P_MIN
  assert two_sample_pvalue(dense, sparse) > P_MIN
  # A capacity too small for the first steps falls back to the dense projection, still exact.
  small, st = _run_sparse(jax.random.key(13), N_DRAWS,
                          (('capacity_factor', 0.6), ('sigma_mode', 'true'), ('steps', steps),
                           ('t_min', t_min), ('top_p', 0.8)))
  assert int(st['dense_fallbacks']) > 0
  assert chi2_pvalue(small, exact_distribution(steps, t_min=t_min, sigma_mode='true',
                                               top_p=0.8)) > P_MIN


def test_sparse_reveal_on_dit_features():
  model = tiny_dit()
  graphdef, params = nnx.split(model)

  @jit
  def run(params, key):
    m = nnx.merge(graphdef, params)
    return ancestral.sparse_ancestral_sample(m.features, m.output_layer.linear, key, 4, 8, 15,
                                             steps=4, capacity_factor=2.0)
  ids, st = run(params, jax.random.key(14))
  assert ids.shape == (4, 8) and not np.any(np.asarray(ids) == 15)
  assert int(st['masked_remaining']) == 0
  with pytest.raises(ValueError, match='student_output'):
    ancestral.sparse_ancestral_sample(fake_features, fake_project, jax.random.key(0), 2, L, MASK,
                                      steps=2, output='raw')


# ---------------------------------------------------------------------------------------------
# Cost accounting (docs/method.md §9 reference numbers).


def test_cost_reproduces_reference_numbers():
  m = config_lib.model_config('small')

  def g(flops):
    return f'{flops / 1e9:.2f}'
  assert g(cost.student_forward_flops(m)) == '291.65'
  assert g(cost.trunk_dense_flops(m) + cost.output_layer_flops(m)) == '253.00'
  assert g(cost.attention_flops(m)) == '38.65'
  assert g(cost.disc_forward_flops(m)) == '213.81'
  assert g(cost.disc_forward_flops(m, soft_input=True)) == '292.86'
  assert g(cost.soft_embedding_flops(m)) == '79.05'
  assert g(cost.disc_backward_flops(m)) == '331.51'
  table = {8: (9, 20, 4, 29, '2.62', '8.54'), 16: (17, 40, 8, 57, '4.96', '16.79'),
           32: (33, 80, 16, 113, '9.62', '33.30'), 64: (65, 160, 32, 225, '18.96', '66.30'),
           128: (129, 320, 64, 449, '37.62', '132.32')}
  for n, (sf, df, db, tot, t_anc, t_rgas) in table.items():
    a = cost.sampler_cost(m, 'ancestral', n)
    r = cost.sampler_cost(m, 'rgas', n)
    assert (r.nfe, r.student_forwards, r.disc_forwards, r.disc_backwards,
            r.network_evaluations) == (n, sf, df, db, tot)
    assert (f'{a.tflops:.2f}', f'{r.tflops:.2f}') == (t_anc, t_rgas)
    assert a.disc_forwards == 0 and a.network_evaluations == sf
  assert f"{cost.sampler_cost(m, 'ancestral', 1024).tflops:.2f}" == '298.94'
  assert cost.sampler_cost(m, 'ancestral', 16, cache_hits=3).student_forwards == 14
  cfg = config_lib.base_config()
  cfg.sampler.kind = 'rgas'
  assert f'{cost.cost_from_config(cfg).tflops:.2f}' == '16.79'
