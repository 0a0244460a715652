"""Plain ancestral sampling (docs/method.md §8.2) with DDPM-cache (§8.5) and final noise removal (§8.4).

Samplers are pure functions over a denoiser callable, so they work for any network:
`denoise_fn(x, sigma_B) -> raw logits (B, L, V)` (any float dtype; upcast here), where x is ids
(B, L). The caller closes over the parameters and wraps the call in `jax.jit`; the loop over steps
is a `lax.scan`, so one compiled program runs the whole sampler.

Key layout (shared with RGAS so that equal keys give equal draws): `key_loop, key_final =
split(key)`; step i uses `k_i = fold_in(key_loop, i)`, `k_draw, k_select = split(k_i)`; draw m of a
step (candidate m in RGAS, m = 0 otherwise) uses `fold_in(k_draw, m)`; noise removal uses
`key_final`.

DDPM-cache: when no token of the whole batch changed since the last network call, the previous
network output is reused (`lax.cond`, so the network is really skipped). The predicate is
batch-level: one changed token anywhere means a full call. Under `vmap` a `lax.cond` turns into a
select that runs both branches; don't vmap the sampler over batches, pass the batch instead.
The cache is exact only when the network ignores t, so it is off in `sigma_mode='true'`.

Sparse reveal (`sparse_ancestral_sample`, opt-in via `sampler.sparse_reveal`): decide first which
masked positions are revealed in this step, then run the output projection and the draw only at
those rows (gathered to a fixed capacity); exact in distribution, dense fallback on overflow.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from didi_jax import diffusion
from didi_jax.sampling import categorical
from didi_jax.sampling.categorical import Regime

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

SIGMA_MODES = ('zero', 'true')
OUTPUTS = ('subs', 'raw')
NOISE_REMOVALS = ('sample', 'greedy', 'none')
# Sparse reveal: rows gathered per step = this factor × B·L/N (≈ 19σ above the mean reveals at
# B·L = 65536, N = 16); a step with more reveals falls back to the dense projection.
DEFAULT_SPARSE_CAPACITY = 1.3


def check_common(batch_size: int, length: int, mask_id: int, steps: int, regime: Regime,
                 noise_removal: str, top_p: float, temperature: float, t_min: float,
                 sigma_mode: str, output: str, x_init: Optional[Array]):
  """One-line errors for impossible sampler arguments (static, before tracing)."""
  categorical.check_precision(regime.precision)
  if regime.uniform not in ('torch', 'jax'):
    raise ValueError(f"sampler.uniform={regime.uniform!r} is not valid: use 'torch' or 'jax'")
  if steps < 1:
    raise ValueError(f'sampler.steps={steps} must be >= 1')
  if sigma_mode not in SIGMA_MODES:
    raise ValueError(f'sampler.student_sigma={sigma_mode!r} is not valid: use one of {SIGMA_MODES}')
  if output not in OUTPUTS:
    raise ValueError(f'sampler.student_output={output!r} is not valid: use one of {OUTPUTS}')
  if noise_removal not in NOISE_REMOVALS:
    raise ValueError(f'sampler.noise_removal={noise_removal!r} is not valid: use one of '
                     f'{NOISE_REMOVALS}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'sampler.top_p={top_p} must lie in (0, 1]')
  if temperature <= 0.0:
    raise ValueError(f'sampler.temperature={temperature} must be positive')
  if not 0.0 < t_min < 1.0:
    raise ValueError(f'sampler.t_min={t_min} must lie in (0, 1)')
  if x_init is not None and tuple(x_init.shape) != (batch_size, length):
    raise ValueError(f'x_init has shape {tuple(x_init.shape)} but batch_size={batch_size}, '
                     f'length={length}: pass matching sizes')
  if mask_id < 0:
    raise ValueError(f'mask_id={mask_id} must be a vocabulary index (vocab_size - 1)')


def step_keys(key_loop: Array, i) -> tuple[Array, Array]:
  """(k_draw, k_select) of step i (see the module docstring)."""
  k_draw, k_select = jax.random.split(jax.random.fold_in(key_loop, i))
  return k_draw, k_select


def draw_key(k_draw: Array, m) -> Array:
  """Key of draw m within a step (candidate m in RGAS; 0 in plain ancestral sampling)."""
  return jax.random.fold_in(k_draw, m)


def step_grid(steps: int, t_min: float, regime: Regime):
  """Per step: index i, t_i, s_i = t_i − dt, α_{t_i}, α_{s_i} in the regime's dtype (§8.2)."""
  t_N1, dt = categorical.time_grid(steps, t_min, regime.dtype)
  t = t_N1[:-1]
  s = t - dt
  return (jnp.arange(steps, dtype=jnp.int32), t, s, diffusion.alpha(t), diffusion.alpha(s))


def network_sigma(t, batch_size: int, sigma_mode: str) -> Array:
  """σ fed to the sampler's network: zeros in 'zero' mode, σ_t in 'true' mode; (B,) float32."""
  if sigma_mode == 'zero':
    return jnp.zeros((batch_size,), jnp.float32)
  return jnp.full((batch_size,), diffusion.sigma(t), jnp.float32)


def sampling_logits(raw_BxLxV: Array, mask_id: int, output: str, regime: Regime,
                    temperature: float = 1.0) -> Array:
  """Logits whose softmax the sampler draws from, in the regime's dtype.

  'subs': the [MASK] logit gets −1e6 (SUBS, docs/method.md §4), so the softmax equals the SUBS distribution
  at masked rows; revealed rows need no carry-over because every transition copies them.
  'raw': raw logits, [MASK] column included (§8.3). Temperature divides before the suppression.
  """
  z = raw_BxLxV.astype(regime.dtype)
  if temperature != 1.0:
    z = z / temperature
  if output == 'subs':
    is_m = jnp.arange(z.shape[-1]) == mask_id
    z = z + jnp.where(is_m, diffusion.NEG_INF, 0.0).astype(z.dtype)
  return z


class State(NamedTuple):
  """Scan carry: tokens, cached network output (None when off), cache bookkeeping."""
  x: Array
  cache: Any
  dirty: Array       # bool: some token changed since the last network call
  forwards: Array    # int32: network calls made
  hits: Array        # int32: calls skipped by the cache


def init_state(fn: DenoiseFn, x_BxL: Array, sigma_B: Array, use_cache: bool) -> State:
  cache = None
  if use_cache:
    shape = jax.eval_shape(fn, x_BxL, sigma_B)
    cache = jnp.zeros(shape.shape, shape.dtype)
  zero = jnp.zeros((), jnp.int32)
  return State(x=x_BxL, cache=cache, dirty=jnp.ones((), jnp.bool_), forwards=zero, hits=zero)


def cached_call(fn: DenoiseFn, state: State, sigma_B: Array) -> tuple[Array, State]:
  """fn(x, σ), or the cached output when caching is on and no token changed since the last call."""
  if state.cache is None:
    return fn(state.x, sigma_B), state._replace(forwards=state.forwards + 1)
  out = jax.lax.cond(state.dirty, lambda: fn(state.x, sigma_B), lambda: state.cache)
  called = state.dirty.astype(jnp.int32)
  return out, state._replace(cache=out, forwards=state.forwards + called,
                             hits=state.hits + 1 - called, dirty=jnp.zeros((), jnp.bool_))


def advance(state: State, x_new: Array) -> State:
  """Carries the new tokens; marks the cache stale if any token of the batch changed."""
  dirty = jnp.logical_or(state.dirty, jnp.any(x_new != state.x))
  return state._replace(x=x_new, dirty=dirty)


def initial_tokens(batch_size: int, length: int, mask_id: int, x_init: Optional[Array]) -> Array:
  if x_init is None:
    return jnp.full((batch_size, length), mask_id, jnp.int32)
  return jnp.asarray(x_init, jnp.int32)


def choose_tokens(key: Array, raw_logits: Array, mask_id: int, mode: str, regime: Regime,
                  temperature: float, top_p: float) -> Array:
  """A token at every row from the SUBS distribution ([MASK] never chosen): sample or argmax."""
  z = sampling_logits(raw_logits, mask_id, 'subs', regime, temperature)
  p = categorical.probs_from_logits(z, regime, top_p=top_p)
  if mode == 'greedy':
    return jnp.argmax(p, axis=-1).astype(jnp.int32)
  return categorical.race(key, p, regime)


def noise_removal_step(denoise_fn: DenoiseFn, state: State, key_final: Array, mask_id: int, *,
                       noise_removal: str, regime: Regime, temperature: float, top_p: float,
                       t_min: float, sigma_mode: str) -> State:
  """One extra (cached) call at t_min; every still-masked position is filled from the SUBS
  distribution (§8.4), in every output mode (so [MASK] is never drawn). Revealed tokens are kept."""
  if noise_removal == 'none':
    return state
  sigma_B = network_sigma(jnp.asarray(t_min, regime.dtype), state.x.shape[0], sigma_mode)
  out, state = cached_call(denoise_fn, state, sigma_B)
  fill = choose_tokens(key_final, out, mask_id, noise_removal, regime, temperature, top_p)
  return advance(state, jnp.where(state.x == mask_id, fill, state.x))


def finish_stats(state: State, steps: int, masked_per_step: Array, mask_id: int) -> dict:
  return dict(
      nfe=jnp.asarray(steps, jnp.int32),             # the paper's count: sampler steps
      student_forwards=state.forwards,               # calls made, noise removal included
      cache_hits=state.hits,
      masked_per_step=masked_per_step,               # (N,): [MASK] count after each step
      masked_remaining=jnp.sum(state.x == mask_id).astype(jnp.int32),
  )


def ancestral_sample(denoise_fn: DenoiseFn, key: Array, batch_size: int, length: int,
                     mask_id: int, *, steps: int, regime: Regime = Regime(),
                     noise_removal: str = 'sample', cache: bool = True, top_p: float = 1.0,
                     temperature: float = 1.0, t_min: float = 1e-5, sigma_mode: str = 'zero',
                     output: str = 'subs',
                     x_init: Optional[Array] = None) -> tuple[Array, dict]:
  """Ancestral sampling from all-[MASK] (or `x_init`) over t_i = linspace(1, t_min, N+1).

  Per step t_i -> s = t_i − dt: the network's probabilities (SUBS or raw softmax, σ per
  `sigma_mode`), temperature and top-p, then `ancestral_step`; then noise removal.
  Returns (ids (B, L) int32, stats) with stats `nfe` (= N), `student_forwards` (calls made,
  noise removal included), `cache_hits`, `masked_per_step` (N,), `masked_remaining`.
  """
  check_common(batch_size, length, mask_id, steps, regime, noise_removal, top_p, temperature,
               t_min, sigma_mode, output, x_init)
  use_cache = bool(cache) and sigma_mode == 'zero'
  key_loop, key_final = jax.random.split(key)
  x0 = initial_tokens(batch_size, length, mask_id, x_init)
  state = init_state(denoise_fn, x0, network_sigma(1.0, batch_size, sigma_mode), use_cache)

  def body(state: State, xs):
    i, t, s, a_t, a_s = xs
    k_draw, _ = step_keys(key_loop, i)
    out, state = cached_call(denoise_fn, state, network_sigma(t, batch_size, sigma_mode))
    z = sampling_logits(out, mask_id, output, regime, temperature)
    p = categorical.probs_from_logits(z, regime, top_p=top_p)
    x_new = categorical.ancestral_step(draw_key(k_draw, 0), state.x, p, a_t, a_s, mask_id,
                                       regime)
    state = advance(state, x_new)
    return state, jnp.sum(x_new == mask_id).astype(jnp.int32)

  state, masked_per_step = jax.lax.scan(body, state, step_grid(steps, t_min, regime))
  state = noise_removal_step(denoise_fn, state, key_final, mask_id, noise_removal=noise_removal,
                             regime=regime, temperature=temperature, top_p=top_p, t_min=t_min,
                             sigma_mode=sigma_mode)
  return state.x, finish_stats(state, steps, masked_per_step, mask_id)


# ---------------------------------------------------------------------------------------------
# Sparse reveal: project only the rows revealed in this step.


def sparse_capacity(batch_size: int, length: int, steps: int, capacity_factor: float) -> int:
  """Rows gathered per step: ceil(factor · B·L / N) (≈ factor × the expected reveals from
  all-[MASK]), at least 1 and at most B·L."""
  n = batch_size * length
  return int(min(n, max(1, math.ceil(capacity_factor * n / steps))))


def fill_rows(key: Array, x_BxL: Array, fill_BxL: Array, feats_BxLxD: Array,
              project_fn: Callable[[Array], Array], capacity: int,
              choose: Callable[[Array, Array], Array]) -> tuple[Array, Array, Array]:
  """Replaces x at `fill` positions by `choose(key, project_fn(features))` computed only there.

  Up to `capacity` rows are gathered with `jnp.nonzero(size=capacity)`; if more rows are due, the
  whole (B, L) is projected instead (`lax.cond`). Returns (x_new, fell_back, rows_projected).
  """
  B, L = x_BxL.shape
  n = B * L
  flat = fill_BxL.reshape(n)

  def dense():
    tok = choose(key, project_fn(feats_BxLxD))
    return jnp.where(fill_BxL, tok, x_BxL)

  if capacity >= n:
    return dense(), jnp.zeros((), jnp.bool_), jnp.asarray(n, jnp.int32)

  def sparse():
    idx = jnp.nonzero(flat, size=capacity, fill_value=n)[0]
    rows = feats_BxLxD.reshape(n, -1)[jnp.minimum(idx, n - 1)]
    tok = choose(key, project_fn(rows))
    return x_BxL.reshape(n).at[idx].set(tok, mode='drop').reshape(B, L)

  overflow = jnp.sum(flat) > capacity
  x_new = jax.lax.cond(overflow, dense, sparse)
  rows = jnp.where(overflow, n, capacity).astype(jnp.int32)
  return x_new, overflow, rows


def sparse_ancestral_sample(features_fn: DenoiseFn, project_fn: Callable[[Array], Array],
                            key: Array, batch_size: int, length: int, mask_id: int, *,
                            steps: int, regime: Regime = Regime(),
                            capacity_factor: float = DEFAULT_SPARSE_CAPACITY,
                            noise_removal: str = 'sample', cache: bool = True,
                            top_p: float = 1.0, temperature: float = 1.0, t_min: float = 1e-5,
                            sigma_mode: str = 'zero', output: str = 'subs',
                            x_init: Optional[Array] = None) -> tuple[Array, dict]:
  """`ancestral_sample` with the output projection and the draw only at revealed rows.

  `features_fn(x, sigma_B) -> (B, L, D)` is the output layer's input (e.g. `DiT.features`) and
  `project_fn(f_...xD) -> logits (..., V)` the output linear layer, so that
  `project_fn(features_fn(x, σ))` is the denoiser. Per step a masked position is revealed with
  probability (α_s − α_t)/(1 − α_t) (a two-way §8.1 race), then its token is drawn from the SUBS
  probabilities: the same law as the dense step. Needs output='subs' (with raw outputs the
  reveal rate depends on each row's [MASK] mass). Extra stats: `dense_fallbacks` (steps whose
  reveals overflowed the capacity) and `projected_rows` (rows sent through `project_fn`).
  Different key use than the dense sampler: equal in distribution, not draw for draw.
  """
  check_common(batch_size, length, mask_id, steps, regime, noise_removal, top_p, temperature,
               t_min, sigma_mode, output, x_init)
  if output != 'subs':
    raise ValueError("sparse reveal needs sampler.student_output='subs': set it, or turn off "
                     'sampler.sparse_reveal')
  if capacity_factor <= 0:
    raise ValueError(f'sampler.sparse_capacity={capacity_factor} must be positive')
  capacity = sparse_capacity(batch_size, length, steps, capacity_factor)
  use_cache = bool(cache) and sigma_mode == 'zero'
  key_loop, key_final = jax.random.split(key)
  x0 = initial_tokens(batch_size, length, mask_id, x_init)
  state = init_state(features_fn, x0, network_sigma(1.0, batch_size, sigma_mode), use_cache)

  def choose(mode):
    return lambda k, logits: choose_tokens(k, logits, mask_id, mode, regime, temperature, top_p)

  def body(carry, xs):
    state, fallbacks, projected = carry
    i, t, s, a_t, a_s = xs
    k_draw, _ = step_keys(key_loop, i)
    k_reveal, k_token = jax.random.split(draw_key(k_draw, 0))
    feats, state = cached_call(features_fn, state, network_sigma(t, batch_size, sigma_mode))
    w_stay_reveal = jnp.stack([1.0 - a_s, a_s - a_t]).astype(regime.dtype)
    w = jnp.broadcast_to(w_stay_reveal, state.x.shape + (2,))
    reveal = (state.x == mask_id) & (categorical.race(k_reveal, w, regime) == 1)
    x_new, fb, rows = fill_rows(k_token, state.x, reveal, feats, project_fn, capacity,
                                choose('sample'))
    state = advance(state, x_new)
    carry = (state, fallbacks + fb.astype(jnp.int32), projected + rows)
    return carry, jnp.sum(x_new == mask_id).astype(jnp.int32)

  zero = jnp.zeros((), jnp.int32)
  (state, fallbacks, projected), masked_per_step = jax.lax.scan(
      body, (state, zero, zero), step_grid(steps, t_min, regime))
  if noise_removal != 'none':
    sigma_B = network_sigma(jnp.asarray(t_min, regime.dtype), batch_size, sigma_mode)
    feats, state = cached_call(features_fn, state, sigma_B)
    x_new, fb, rows = fill_rows(key_final, state.x, state.x == mask_id, feats, project_fn,
                                capacity, choose(noise_removal))
    state = advance(state, x_new)
    fallbacks, projected = fallbacks + fb.astype(jnp.int32), projected + rows
  stats = finish_stats(state, steps, masked_per_step, mask_id)
  stats.update(dense_fallbacks=fallbacks, projected_rows=projected)
  return state.x, stats


def kwargs_from_config(sampler_cfg) -> dict:
  """Keyword arguments of `ancestral_sample` from the config's `sampler` section."""
  return dict(
      steps=int(sampler_cfg.steps),
      regime=Regime.from_config(sampler_cfg),
      noise_removal=sampler_cfg.noise_removal,
      cache=bool(sampler_cfg.cache),
      top_p=float(sampler_cfg.top_p),
      temperature=float(sampler_cfg.temperature),
      t_min=float(sampler_cfg.t_min),
      sigma_mode=sampler_cfg.student_sigma,
      output=sampler_cfg.student_output,
  )
