"""The one categorical draw every sampler uses (docs/method.md §8.1), and the ancestral transition (§7.2).

Exponential race: idx = argmax_v w_v / E_v with E_v = 1e-10 − log(U_v + 1e-10); the weights need
not be normalised. `precision='float32'` is the paper's regime (float32 weights and uniforms,
uniforms generated like PyTorch's CUDA generator when `uniform='torch'`); `'float64'` uses float64
weights and uniforms with E = −log1p(−U) (needs `jax_enable_x64`).

Everything here is elementwise up to one reduction over the vocabulary, so under `jit` XLA can
fuse softmax → weights → exponentials → ratio → argmax without a float32 (B, L, V) buffer (the CPU
backend still materialises threefry's uint32 bits; GPU fusion is not yet measured).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from didi_jax import diffusion

# PyTorch CUDA uniforms: u = f32(bits)·2^-32 + 2^-33 (docs/method.md §8.1).
_TORCH_SCALE = 2.0 ** -32
_TORCH_OFFSET = 2.0 ** -33
# The float32 race's offsets (official form): E = EXP_FLOOR − log(U + EXP_FLOOR).
EXP_FLOOR = 1e-10


@dataclasses.dataclass(frozen=True)
class Regime:
  """Everything about the draw that moves a number; stored beside every reported result."""
  precision: str = 'float32'   # 'float32' | 'float64'
  uniform: str = 'torch'       # 'torch' | 'jax'
  bf16_probs: bool = False

  def as_dict(self):
    return dataclasses.asdict(self)

  @property
  def dtype(self):
    """The dtype of probabilities, weights and uniforms in this regime."""
    return jnp.float64 if self.precision == 'float64' else jnp.float32

  @classmethod
  def from_config(cls, sampler_cfg):
    return cls(precision=sampler_cfg.precision, uniform=sampler_cfg.uniform,
               bf16_probs=bool(sampler_cfg.bf16_probs))


def check_precision(precision: str):
  """Raises a one-line error when the requested precision cannot run here."""
  if precision not in ('float32', 'float64'):
    raise ValueError(f"sampler.precision={precision!r} is not valid: use 'float32' or 'float64'")
  if precision == 'float64':
    if not jax.config.jax_enable_x64:
      raise ValueError("sampler.precision='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 "
                       "(or jax.config.update('jax_enable_x64', True)) before running")
    if jax.default_backend() == 'tpu':
      raise ValueError("sampler.precision='float64' is not supported on TPU: use "
                       "--config.sampler.precision=float32")


def torch_uniform_from_bits(bits_u32: jax.Array) -> jax.Array:
  """PyTorch CUDA's float32 uniform from uint32 bits: f32(b)·2^-32 + 2^-33, and u == 1 -> 0.

  Resolution 2^-24 just below 1 (so E ≥ ≈5.96e-8), finer near 0.
  """
  u = bits_u32.astype(jnp.float32) * jnp.float32(_TORCH_SCALE) + jnp.float32(_TORCH_OFFSET)
  return jnp.where(u >= 1.0, jnp.float32(0.0), u)


def uniform(key: jax.Array, shape, regime: Regime) -> jax.Array:
  """Uniforms in [0, 1) with the regime's resolution."""
  if regime.precision == 'float64':
    return jax.random.uniform(key, shape, jnp.float64)
  if regime.uniform == 'jax':
    return jax.random.uniform(key, shape, jnp.float32)
  return torch_uniform_from_bits(jax.random.bits(key, shape, jnp.uint32))


def exponentials_from_uniform(u: jax.Array, regime: Regime) -> jax.Array:
  """Exp(1) variates: −log1p(−U) in float64, 1e-10 − log(U + 1e-10) in float32 (official)."""
  if regime.precision == 'float64':
    return -jnp.log1p(-u)
  return EXP_FLOOR - jnp.log(u + EXP_FLOOR)


def exponentials(key: jax.Array, shape, regime: Regime) -> jax.Array:
  return exponentials_from_uniform(uniform(key, shape, regime), regime)


def race(key: jax.Array, weights: jax.Array, regime: Regime, axis: int = -1) -> jax.Array:
  """argmax_v w_v / E_v: a draw from Categorical(w / Σw) along `axis` (int32 indices)."""
  dtype = regime.dtype
  w = weights.astype(dtype)
  e = exponentials(key, w.shape, regime).astype(dtype)
  return jnp.argmax(w / e, axis=axis).astype(jnp.int32)


def probs_from_logits(logits: jax.Array, regime: Regime, temperature: float = 1.0,
                      top_p: float = 1.0) -> jax.Array:
  """Softmax over the last axis in the regime's dtype, then optional bf16 rounding and top-p.

  `logits` may be unnormalised (raw, SUBS-suppressed, or tilted); a −1e6 entry gets probability
  exactly 0. Temperature divides the logits first.
  """
  z = logits.astype(regime.dtype)
  if temperature != 1.0:
    z = z / temperature
  p = jax.nn.softmax(z, axis=-1)
  return _finish_probs(p, regime, top_p)


def probs_from_logprobs(logp: jax.Array, regime: Regime, temperature: float = 1.0,
                        top_p: float = 1.0) -> jax.Array:
  """Probabilities for a draw from (SUBS) log-probs: temperature, optional bf16 rounding, top-p."""
  logp = logp.astype(regime.dtype)
  if temperature != 1.0:
    logp = jax.nn.log_softmax(logp / temperature, axis=-1)
  return _finish_probs(jnp.exp(logp), regime, top_p)


def _finish_probs(p, regime: Regime, top_p: float):
  if regime.bf16_probs:
    p = p.astype(jnp.bfloat16).astype(regime.dtype)
  if top_p < 1.0:
    p = top_p_filter(p, top_p)
  return p


def top_p_filter(p: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of tokens whose cumulative probability reaches top_p (always the top
  token) and renormalises. Ties in probability are ordered by index (stable sort)."""
  order = jnp.argsort(-p, axis=-1, stable=True)
  sorted_p = jnp.take_along_axis(p, order, axis=-1)
  cum_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep_sorted = cum_before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  inv = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep_sorted, inv, axis=-1)
  p = jnp.where(keep, p, 0.0)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _per_row(a, ndim):
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def ancestral_step(key: jax.Array, x_BxL: jax.Array, p_BxLxV: jax.Array, alpha_t, alpha_s,
                   mask_id: int, regime: Regime) -> jax.Array:
  """One reverse transition t -> s (docs/method.md §2, §7.2).

  At masked positions draw from unnormalised weights w_v = p_v·(α_s − α_t) (v ≠ m) and
  w_m = 1 − α_s (any [MASK] mass in p is discarded); revealed positions are copied. α may be
  scalars or per-row (B,).
  """
  dtype = regime.dtype
  p = p_BxLxV.astype(dtype)
  vocab = p.shape[-1]
  a_t = _per_row(jnp.asarray(alpha_t, dtype), 3)
  a_s = _per_row(jnp.asarray(alpha_s, dtype), 3)
  is_m = jnp.arange(vocab) == mask_id
  w = jnp.where(is_m, 1.0 - a_s, p * (a_s - a_t))
  draw = race(key, w, regime)
  return jnp.where(x_BxL == mask_id, draw, x_BxL)


def time_grid(steps: int, t_min: float = 1e-5, dtype=None):
  """t_i = linspace(1, t_min, N+1) and the step dt = (1 − t_min)/N (docs/method.md §8.2)."""
  return jnp.linspace(1.0, t_min, steps + 1, dtype=dtype), (1.0 - t_min) / steps


alpha = diffusion.alpha
