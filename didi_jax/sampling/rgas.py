"""Reward-guided ancestral sampling (RGAS, docs/method.md §8.3).

Two `lax.scan` phases over the §8.2 grid. Steps i < K_tilt = ⌊N(1 − rerank_ratio)⌋ tilt the
student's logits by the clipped input-gradient of the discriminator's summed logits at masked
positions (soft input, σ_{t_i}); the remaining steps draw M candidates from the untilted transition
and keep one drawn from softmax(reward / temperature) of the discriminator on hard ids at σ_s.
Then the usual noise removal. Only the student call is cached (§8.5).

`disc_fn(x, sigma_B, *, soft_input='logits') -> (B, L)` float logits. Re-ranking calls it on ids
(B, L); tilting calls it on probabilities (B, L, V) with `soft_input='probs'`, the models' named
probability path (their default soft input is logits, as the official model's; docs/method.md
§3.2), so a `Discriminator` or `api.DiscriminatorFn` can be passed as is.

The scan bodies are `tilt_step` and `rerank_step` over the inputs of `phase_inputs`; both are
public so that one step can be run (and its law checked) in isolation.

Key layout: as in `ancestral` (candidate m uses draw m of the step; the tilt step uses draw 0;
the candidate choice uses `k_select`), so RGAS with h = 0 and M = 1 reproduces
`ancestral_sample` draw for draw.

ℓ below is the sampler's logits (`ancestral.sampling_logits`: SUBS-suppressed raw logits, or
raw logits). They differ from the SUBS log-probs by a per-row constant, which changes neither
softmax(ℓ), nor ∂ρ/∂ℓ, nor softmax(ℓ + h·g).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from didi_jax import diffusion
from didi_jax.sampling import ancestral
from didi_jax.sampling import categorical
from didi_jax.sampling.categorical import Regime

Array = jax.Array
DiscFn = Callable[[Array, Array], Array]

REWARDS = ('sum_all', 'sum_masked', 'mean_masked')
# ⌊N(1 − ratio)⌋ is taken with this slack so that e.g. 100·(1 − 0.42) counts as 58.
_FLOOR_SLACK = 1e-9


def num_tilt_steps(steps: int, rerank_ratio: float) -> int:
  """K_tilt = ⌊N·(1 − rerank_ratio)⌋ (N = 16, ratio 0.5 -> 8)."""
  return int(math.floor(steps * (1.0 - rerank_ratio) + _FLOOR_SLACK))


def tilt_scales(k_tilt: int, h_start: float, h_end: float) -> Array:
  """h_i = h_start + (h_end − h_start)·i / max(1, K_tilt − 1), i < K_tilt; float32 (K_tilt,)."""
  i = jnp.arange(k_tilt, dtype=jnp.float32)
  return h_start + (h_end - h_start) * i / max(1, k_tilt - 1)


def phase_inputs(steps: int, rerank_ratio: float, h_start: float, h_end: float, t_min: float,
                 regime: Regime):
  """Scan inputs of the two phases over the §8.2 grid: (tilt_xs, rerank_xs).

  tilt_xs = (grid[:K_tilt], h_0..h_{K_tilt−1}) and rerank_xs = grid[K_tilt:], where a grid entry is
  (i, t_i, s_i, α_{t_i}, α_{s_i}) (`ancestral.step_grid`). Index both with `[i]` (e.g.
  `jax.tree.map(lambda a: a[i], tilt_xs)`) for the inputs of one step.
  """
  k_tilt = num_tilt_steps(steps, rerank_ratio)
  grid = ancestral.step_grid(steps, t_min, regime)
  tilt_xs = (tuple(a[:k_tilt] for a in grid), tilt_scales(k_tilt, h_start, h_end))
  return tilt_xs, tuple(a[k_tilt:] for a in grid)


def tilt_gradient(disc_fn: DiscFn, logits_BxLxV: Array, x_BxL: Array, sigma_B: Array,
                  mask_id: int, *, clip: float, output: str) -> Array:
  """g = clip(∂ρ/∂ℓ) with ρ = Σ_{masked} D(soft input, σ) (all rows of the batch; rows do not
  interact), soft input = softmax(ℓ) at masked rows and the exact one-hot at revealed rows, passed
  to D as probabilities (`soft_input='probs'`).

  g is zeroed at revealed rows (and at the [MASK] column in 'subs' mode) and clipped to
  [−clip, clip]; float32 (B, L, V).
  """
  vocab = logits_BxLxV.shape[-1]
  masked = x_BxL == mask_id
  onehot = jax.nn.one_hot(x_BxL, vocab, dtype=jnp.float32)

  def rho(ell):
    q = jnp.where(masked[..., None], jax.nn.softmax(ell, axis=-1), onehot)
    d_BxL = disc_fn(q, sigma_B, soft_input='probs').astype(jnp.float32)
    return jnp.sum(jnp.where(masked, d_BxL, 0.0))

  g = jax.grad(rho)(logits_BxLxV.astype(jnp.float32))
  keep = masked[..., None]
  if output == 'subs':
    keep = keep & (jnp.arange(vocab) != mask_id)
  return jnp.clip(jnp.where(keep, g, 0.0), -clip, clip)


def candidate_reward(d_BxL: Array, x_BxL: Array, mask_id: int, reward: str) -> Array:
  """ρ per row from discriminator logits on a candidate: 'sum_all' over all L positions;
  'sum_masked' / 'mean_masked' over the candidate's [MASK] positions (where D was trained, as in
  the training reward; mean with a floor of one position). float32 (B,)."""
  d = d_BxL.astype(jnp.float32)
  if reward == 'sum_all':
    return jnp.sum(d, axis=-1)
  masked = x_BxL == mask_id
  total = jnp.sum(jnp.where(masked, d, 0.0), axis=-1)
  if reward == 'sum_masked':
    return total
  return total / jnp.maximum(1.0, jnp.sum(masked, axis=-1).astype(jnp.float32))


def tilt_step(disc_fn: DiscFn, k_draw: Array, x_BxL: Array, ell_BxLxV: Array, step, h,
              mask_id: int, *, clip: float, output: str, regime: Regime,
              top_p: float = 1.0) -> Array:
  """One tilting step at grid entry `step` = (i, t_i, s_i, α_{t_i}, α_{s_i}) with scale h = h_i
  (one element of `phase_inputs`' tilt_xs): g = `tilt_gradient` with D at σ_{t_i},
  p = softmax(ℓ + h·g) (then top-p), x_s = ancestral_step(draw 0 of k_draw, p, α_{t_i}, α_{s_i}).
  ℓ: the sampler's logits at x (`ancestral.sampling_logits`)."""
  _, t, _, a_t, a_s = step
  sigma_t_B = jnp.full((x_BxL.shape[0],), diffusion.sigma(t), jnp.float32)
  g = tilt_gradient(disc_fn, ell_BxLxV, x_BxL, sigma_t_B, mask_id, clip=clip, output=output)
  p = categorical.probs_from_logits(
      ell_BxLxV + jnp.asarray(h).astype(ell_BxLxV.dtype) * g.astype(ell_BxLxV.dtype), regime,
      top_p=top_p)
  return categorical.ancestral_step(ancestral.draw_key(k_draw, 0), x_BxL, p, a_t, a_s, mask_id,
                                    regime)


def rerank_step(disc_fn: DiscFn, k_draw: Array, k_select: Array, x_BxL: Array,
                probs_fn: Callable[[], Array], step, mask_id: int, *, num_candidates: int,
                temperature: float, reward: str, regime: Regime) -> Array:
  """One re-ranking step at grid entry `step` = (i, t_i, s_i, α_{t_i}, α_{s_i}) (one element of
  `phase_inputs`' rerank_xs): M candidates x_s^(m) = ancestral_step(draw m, p = probs_fn()), one
  at a time (`lax.map`), each scored by D(x_s^(m), σ_{s_i}) on ids; per row
  m* ~ softmax(ρ/temperature) with the §8.1 draw; returns x_s^(m*).

  `probs_fn` is called inside each candidate, so the probabilities are recomputed from the
  (bf16) logits next to the draw instead of being held as a float32 (B, L, V) buffer.
  """
  _, _, s, alpha_t, alpha_s = step
  sigma_s_B = jnp.full((x_BxL.shape[0],), diffusion.sigma(s), jnp.float32)

  def candidate(m):
    x_s = categorical.ancestral_step(ancestral.draw_key(k_draw, m), x_BxL, probs_fn(), alpha_t,
                                     alpha_s, mask_id, regime)
    return x_s, candidate_reward(disc_fn(x_s, sigma_s_B), x_s, mask_id, reward)

  cands_MxBxL, rho_MxB = jax.lax.map(candidate, jnp.arange(num_candidates, dtype=jnp.int32))
  weights_BxM = jax.nn.softmax(rho_MxB.T.astype(regime.dtype) / temperature, axis=-1)
  pick_B = categorical.race(k_select, weights_BxM, regime)
  return jnp.take_along_axis(cands_MxBxL, pick_B[None, :, None], axis=0)[0]


def rgas_sample(denoise_fn: ancestral.DenoiseFn, disc_fn: DiscFn, key: Array, batch_size: int,
                length: int, mask_id: int, *, steps: int, regime: Regime = Regime(),
                num_candidates: int = 4, h_start: float = 30.0, h_end: float = 40.0,
                rerank_ratio: float = 0.5, tilt_clip: float = 1.0,
                rerank_temperature: float = 1.0, rerank_reward: str = 'sum_all',
                noise_removal: str = 'sample', cache: bool = True, top_p: float = 1.0,
                temperature: float = 1.0, t_min: float = 1e-5, sigma_mode: str = 'zero',
                output: str = 'subs', x_init: Optional[Array] = None) -> tuple[Array, dict]:
  """RGAS from all-[MASK] (or `x_init`); returns (ids (B, L) int32, stats).

  Tilt steps: p = softmax(ℓ/temperature + h_i·g) (then top-p), g from `tilt_gradient` with D at
  σ_{t_i}. Re-rank steps: `rerank_step` with the untilted p and D at σ_s. Stats as in
  `ancestral_sample` plus `disc_forwards` (K_tilt soft + M·(N − K_tilt) hard) and
  `disc_backwards` (K_tilt input-gradients).
  """
  ancestral.check_common(batch_size, length, mask_id, steps, regime, noise_removal, top_p,
                         temperature, t_min, sigma_mode, output, x_init)
  if num_candidates < 1:
    raise ValueError(f'sampler.rgas.num_candidates={num_candidates} must be >= 1')
  if not 0.0 <= rerank_ratio <= 1.0:
    raise ValueError(f'sampler.rgas.rerank_ratio={rerank_ratio} must lie in [0, 1]')
  if rerank_reward not in REWARDS:
    raise ValueError(f'sampler.rgas.rerank_reward={rerank_reward!r} is not valid: use one of '
                     f'{REWARDS}')
  if tilt_clip <= 0 or rerank_temperature <= 0:
    raise ValueError('sampler.rgas.tilt_clip and sampler.rgas.rerank_temperature must be positive')

  k_tilt = num_tilt_steps(steps, rerank_ratio)
  use_cache = bool(cache) and sigma_mode == 'zero'
  key_loop, key_final = jax.random.split(key)
  x0 = ancestral.initial_tokens(batch_size, length, mask_id, x_init)
  state = ancestral.init_state(denoise_fn, x0,
                               ancestral.network_sigma(1.0, batch_size, sigma_mode), use_cache)
  tilt_xs, rerank_xs = phase_inputs(steps, rerank_ratio, h_start, h_end, t_min, regime)

  def student_logits(state, t):
    out, state = ancestral.cached_call(denoise_fn, state,
                                       ancestral.network_sigma(t, batch_size, sigma_mode))
    return ancestral.sampling_logits(out, mask_id, output, regime, temperature), state

  def tilt_body(state, xs):
    step, h = xs
    k_draw, _ = ancestral.step_keys(key_loop, step[0])
    ell, state = student_logits(state, step[1])
    x_new = tilt_step(disc_fn, k_draw, state.x, ell, step, h, mask_id, clip=tilt_clip,
                      output=output, regime=regime, top_p=top_p)
    state = ancestral.advance(state, x_new)
    return state, jnp.sum(x_new == mask_id).astype(jnp.int32)

  def rerank_body(state, step):
    i, t = step[0], step[1]
    k_draw, k_select = ancestral.step_keys(key_loop, i)
    out, state = ancestral.cached_call(denoise_fn, state,
                                       ancestral.network_sigma(t, batch_size, sigma_mode))

    def probs_fn():
      ell = ancestral.sampling_logits(out, mask_id, output, regime, temperature)
      return categorical.probs_from_logits(ell, regime, top_p=top_p)

    x_new = rerank_step(disc_fn, k_draw, k_select, state.x, probs_fn, step, mask_id,
                        num_candidates=num_candidates, temperature=rerank_temperature,
                        reward=rerank_reward, regime=regime)
    state = ancestral.advance(state, x_new)
    return state, jnp.sum(x_new == mask_id).astype(jnp.int32)

  masked = []
  if k_tilt > 0:
    state, m_tilt = jax.lax.scan(tilt_body, state, tilt_xs)
    masked.append(m_tilt)
  if k_tilt < steps:
    state, m_rerank = jax.lax.scan(rerank_body, state, rerank_xs)
    masked.append(m_rerank)
  state = ancestral.noise_removal_step(denoise_fn, state, key_final, mask_id,
                                       noise_removal=noise_removal, regime=regime,
                                       temperature=temperature, top_p=top_p, t_min=t_min,
                                       sigma_mode=sigma_mode)
  stats = ancestral.finish_stats(state, steps, jnp.concatenate(masked), mask_id)
  stats.update(
      disc_forwards=jnp.asarray(k_tilt + num_candidates * (steps - k_tilt), jnp.int32),
      disc_backwards=jnp.asarray(k_tilt, jnp.int32))
  return state.x, stats


def kwargs_from_config(sampler_cfg) -> dict:
  """Keyword arguments of `rgas_sample` from the config's `sampler` section."""
  r = sampler_cfg.rgas
  kwargs = ancestral.kwargs_from_config(sampler_cfg)
  kwargs.update(num_candidates=int(r.num_candidates), h_start=float(r.h_start),
                h_end=float(r.h_end), rerank_ratio=float(r.rerank_ratio),
                tilt_clip=float(r.tilt_clip), rerank_temperature=float(r.rerank_temperature),
                rerank_reward=r.rerank_reward)
  return kwargs
