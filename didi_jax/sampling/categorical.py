"""The one categorical draw every sampler uses (SPEC §8.1), and the ancestral transition (§7.2).

Exponential race: idx = argmax_v w_v / E_v with E_v = 1e-10 − log(U_v + 1e-10); the weights need
not be normalised. `precision='float32'` is the paper's regime (float32 weights and uniforms,
uniforms generated like PyTorch's CUDA generator when `uniform='torch'`); `'float64'` uses float64
weights and uniforms with E = −log1p(−U) (needs `jax_enable_x64`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from didi_jax import diffusion


@dataclasses.dataclass(frozen=True)
class Regime:
  """Everything about the draw that moves a number; stored beside every reported result."""
  precision: str = 'float32'   # 'float32' | 'float64'
  uniform: str = 'torch'       # 'torch' | 'jax'
  bf16_probs: bool = False

  def as_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, sampler_cfg):
    return cls(precision=sampler_cfg.precision, uniform=sampler_cfg.uniform,
               bf16_probs=bool(sampler_cfg.bf16_probs))


def check_precision(precision: str):
  if precision == 'float64':
    if not jax.config.jax_enable_x64:
      raise ValueError("sampler.precision='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 "
                       "(or jax.config.update('jax_enable_x64', True)) before running")
    if jax.default_backend() == 'tpu':
      raise ValueError("sampler.precision='float64' is not supported on TPU: use "
                       "--config.sampler.precision=float32")


def uniform(key, shape, regime: Regime):
  """Uniforms in [0, 1) with the regime's resolution."""
  if regime.precision == 'float64':
    return jax.random.uniform(key, shape, jnp.float64)
  if regime.uniform == 'jax':
    return jax.random.uniform(key, shape, jnp.float32)
  # PyTorch CUDA: u = f32(b)·2^-32 + 2^-33 from a uint32 b, in float32; u == 1 maps to 0.
  bits = jax.random.bits(key, shape, jnp.uint32)
  u = bits.astype(jnp.float32) * jnp.float32(2.0 ** -32) + jnp.float32(2.0 ** -33)
  return jnp.where(u >= 1.0, jnp.float32(0.0), u)


def exponentials(key, shape, regime: Regime):
  u = uniform(key, shape, regime)
  if regime.precision == 'float64':
    return -jnp.log1p(-u)
  return 1e-10 - jnp.log(u + 1e-10)


def race(key, weights, regime: Regime, axis: int = -1):
  """argmax_v w_v / E_v: a draw from Categorical(w / Σw) along `axis`."""
  dtype = jnp.float64 if regime.precision == 'float64' else jnp.float32
  w = weights.astype(dtype)
  e = exponentials(key, w.shape, regime).astype(dtype)
  return jnp.argmax(w / e, axis=axis).astype(jnp.int32)


def probs_from_logprobs(logp, regime: Regime, temperature: float = 1.0, top_p: float = 1.0):
  """Probabilities for a draw from (SUBS) log-probs: temperature, optional bf16 rounding, top-p."""
  dtype = jnp.float64 if regime.precision == 'float64' else jnp.float32
  logp = logp.astype(dtype)
  if temperature != 1.0:
    logp = jax.nn.log_softmax(logp / temperature, axis=-1)
  p = jnp.exp(logp)
  if regime.bf16_probs:
    p = p.astype(jnp.bfloat16).astype(dtype)
  if top_p < 1.0:
    p = top_p_filter(p, top_p)
  return p


def top_p_filter(p, top_p: float):
  """Keeps the smallest set of tokens whose cumulative probability reaches top_p (always the top
  token) and renormalises."""
  order = jnp.argsort(-p, axis=-1)
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


def ancestral_step(key, x_BxL, p_BxLxV, alpha_t, alpha_s, mask_id: int, regime: Regime):
  """One reverse transition t -> s (SPEC §2, §7.2).

  At masked positions draw from unnormalised weights w_v = p_v·(α_s − α_t) (v ≠ m) and
  w_m = 1 − α_s; revealed positions are copied. α may be scalars or per-row (B,).
  """
  dtype = jnp.float64 if regime.precision == 'float64' else jnp.float32
  p = p_BxLxV.astype(dtype)
  vocab = p.shape[-1]
  a_t = _per_row(jnp.asarray(alpha_t, dtype), 3)
  a_s = _per_row(jnp.asarray(alpha_s, dtype), 3)
  is_m = jnp.arange(vocab) == mask_id
  w = jnp.where(is_m, 1.0 - a_s, p * (a_s - a_t))
  draw = race(key, w, regime)
  return jnp.where(x_BxL == mask_id, draw, x_BxL)


def time_grid(steps: int, t_min: float = 1e-5):
  """t_i = linspace(1, t_min, N+1) and the step dt (SPEC §8.2)."""
  return jnp.linspace(1.0, t_min, steps + 1), (1.0 - t_min) / steps


alpha = diffusion.alpha
