"""The DiT denoiser of MDLM / DiDi-Instruct (docs/method.md §3), in Flax NNX.

Parameter paths mirror the official PyTorch names one-to-one (`blocks.3.mlp.0.weight` <->
`('blocks', 3, 'mlp_0', 'kernel')`); Linear kernels are stored (in, out).

Precision (docs/method.md §3.2): parameters float32; embedding, time MLP, rotary tables and
LayerNorm statistics float32; the residual stream float32; every matmul runs in `compute_dtype` and
returns it (bf16 by default), so logits are bf16 — consumers upcast them before any softmax.

Soft input (B, L, V): logits by default, as the official model (h = softmax_V(logits) @ E in
float32); `soft_input='probs'` is the explicitly named probability path (h = probs @ E) that RGAS
uses. Integer ids ignore it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didi_jax.models import interface

Array = jax.Array


def torch_uniform_init(fan_in: int):
  """PyTorch's default Linear init: U(±1/sqrt(fan_in)) (kaiming_uniform with a=√5)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def matmul(x_NxI: Array, kernel_IxO: Array, precision=None) -> Array:
  """x @ kernel over the last axis of x (any leading shape), as ONE 2-D matrix product.

  Same values as `jnp.dot(x, kernel)`; written over (prod(leading), in) so that the backward
  pass's kernel gradient is a plain (in, rows) x (rows, out) product: for a 3-D x, XLA's CPU
  backend first transposes the whole output gradient, which made the backward ~2x slower there
  (BENCHMARKS.md).
  """
  lead = x_NxI.shape[:-1]
  y = jnp.dot(x_NxI.reshape((-1, x_NxI.shape[-1])), kernel_IxO, precision=precision)
  return y.reshape(lead + (kernel_IxO.shape[-1],))


class Linear(nnx.Module):
  """y = x @ kernel + bias, computed in `dtype` (inputs and kernel cast), kernel (in, out)."""

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool = True, zero: bool = False,
               dtype=jnp.bfloat16, rngs: nnx.Rngs):
    init = zeros_init if zero else torch_uniform_init(d_in)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out)))
    self.bias = nnx.Param(init(rngs.params(), (d_out,))) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    # float32 mode means float32 matmuls (no TF32 on GPUs): parity runs rely on it.
    precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNormNoBias(nnx.Module):
  """LN without affine shift: float32 statistics (biased variance, eps 1e-5) times a weight."""

  def __init__(self, dim: int):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    return standardize(x) * self.weight[...]

  def modulated(self, x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation of the LayerNorm, (x̂·w)·(1 + scale) + shift, computed with the weight
    folded into the (B, 1, D) scale: x̂·(w·(1 + scale)) + shift, the same math (float32 results
    differ in the last bits). A per-feature weight applied over (B, L, D) was materialised as a
    (B, L, D) array for the backward's library fusions on XLA's CPU backend."""
    return standardize(x) * (self.weight[...] * (1.0 + scale)) + shift


def standardize(x: Array) -> Array:
  """(x − mean) / sqrt(var + 1e-5) over the last axis, float32, biased variance."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5)


SOFT_INPUTS = ('logits', 'probs')


def check_soft_input(soft_input: str) -> None:
  if soft_input not in SOFT_INPUTS:
    raise ValueError(f'soft_input={soft_input!r} is not valid: use one of {SOFT_INPUTS} '
                     "('logits' = the official contract, softmax inside)")


class Embedding(nnx.Module):
  """Token embedding E (V, D), float32, for ids or a soft input (B, L, V) (docs/method.md §3.2).

  soft_input='logits' (the official contract, and the default of every model call): the soft
  input is logits, h = softmax_V(logits in float32) @ E. soft_input='probs' (internal, named at
  each call site, e.g. RGAS): the soft input is already probabilities, h = probs @ E. Both
  matmuls are float32 at HIGHEST precision and h is float32 whatever the input dtype (the
  official code casts h back to the input dtype, which only matters for non-float32 input).
  Integer ids ignore `soft_input`.
  """

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(torch_uniform_init(dim)(rngs.params(), (vocab, dim)))

  def __call__(self, x: Array, soft_input: str = 'logits') -> Array:
    check_soft_input(soft_input)
    table = self.embedding[...]
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.take(table, x, axis=0)
    q = x.astype(jnp.float32)
    if soft_input == 'logits':
      q = jax.nn.softmax(q, axis=-1)
    return jnp.einsum('blv,vd->bld', q, table, precision=jax.lax.Precision.HIGHEST)


def timestep_features(sigma_B: Array, dim: int = 256) -> Array:
  """φ(σ) = [cos(σ f_k)] ++ [sin(σ f_k)], f_k = exp(−ln(10000) k / (dim/2)); cos block first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = sigma_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class SigmaMap(nnx.Module):
  """Time MLP 256 -> C -> C in float32 (the outer SiLU is applied by the DiT)."""

  def __init__(self, cond_dim: int, *, rngs: nnx.Rngs):
    self.mlp_0 = Linear(256, cond_dim, dtype=jnp.float32, rngs=rngs)
    self.mlp_2 = Linear(cond_dim, cond_dim, dtype=jnp.float32, rngs=rngs)

  def __call__(self, sigma_B: Array) -> Array:
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_features(sigma_B))))


def rotary_tables(length: int, head_dim: int):
  """cos/sin of concat(angle, angle), angle[p, j] = p·10000^(−2j/Dh); float32, (L, Dh)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angle = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
  emb = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


@functools.lru_cache(maxsize=None)
def _rotary_host(length: int, head_dim: int):
  with jax.ensure_compile_time_eval():
    cos, sin = rotary_tables(length, head_dim)
    return np.asarray(cos), np.asarray(sin)


def rotary_constants(length: int, head_dim: int):
  """`rotary_tables` evaluated once, outside any trace, as constants of the program.

  Traced tables would be fused into the q/k rotary fusions, where XLA's CPU backend evaluates cos
  and sin again for every (batch, head) element: a quarter of the forward's elementwise time there
  (BENCHMARKS.md). Same values: the tables are computed by the same jnp code, eagerly.
  """
  cos, sin = _rotary_host(int(length), int(head_dim))
  return jnp.asarray(cos), jnp.asarray(sin)


def apply_rotary(x_BxLxHxD: Array, cos_LxD: Array, sin_LxD: Array) -> Array:
  """Non-interleaved rotate-half rotary, computed in float32 and rounded to x's dtype.

  x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁], written per half so that no
  rotated copy of x is materialised (same floating-point operations, bit-identical)."""
  half = x_BxLxHxD.shape[-1] // 2
  x = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  cos = cos_LxD[None, :, None, :]
  sin = sin_LxD[None, :, None, :]
  out = jnp.concatenate([x1 * cos[..., :half] - x2 * sin[..., :half],
                         x2 * cos[..., half:] + x1 * sin[..., half:]], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


@jax.custom_vjp
def split_qkv(qkv_BxLx3xHxD: Array, cos_LxD: Array, sin_LxD: Array):
  """(q, k, v) = (rotary(qkv[:, :, 0]), rotary(qkv[:, :, 1]), qkv[:, :, 2]).

  Its gradient is written out (the same math): ∂qkv is one stack of the three cotangents, q's and
  k's through the transposed rotation (x₁c − x₂s, x₂c + x₁s)ᵀ: d₁c + d₂s, d₂c − d₁s. Autodiff
  padded each slice's cotangent to the whole (B, L, 3, H, Dh) and added them, which XLA's CPU
  backend ran as one slow fusion per block (BENCHMARKS.md). cos/sin get their exact cotangents.
  """
  return (apply_rotary(qkv_BxLx3xHxD[:, :, 0], cos_LxD, sin_LxD),
          apply_rotary(qkv_BxLx3xHxD[:, :, 1], cos_LxD, sin_LxD), qkv_BxLx3xHxD[:, :, 2])


def _split_qkv_fwd(qkv, cos, sin):
  return split_qkv(qkv, cos, sin), (qkv, cos, sin)


def _split_qkv_bwd(res, g):
  qkv, cos_LxD, sin_LxD = res
  half = qkv.shape[-1] // 2
  # The transposed rotation is the rotation with sin' = −(sin's halves swapped):
  # d₁c₁ − d₂s₁' = d₁c₁ + d₂s₂ and d₂c₂ + d₁s₂' = d₂c₂ − d₁s₁.
  sin_t = -jnp.roll(sin_LxD, half, axis=-1)
  dq, dk, dv = g
  d_qkv = jnp.stack([apply_rotary(dq, cos_LxD, sin_t).astype(qkv.dtype),
                     apply_rotary(dk, cos_LxD, sin_t).astype(qkv.dtype), dv.astype(qkv.dtype)],
                    axis=2)
  # ∂cos, ∂sin: out₁ = x₁c₁ − x₂s₁, out₂ = x₂c₂ + x₁s₂ summed over batch, heads, and q and k.
  x = qkv[:, :, :2].astype(jnp.float32)                               # (B, L, 2, H, Dh)
  d = jnp.stack([dq, dk], axis=2).astype(jnp.float32)
  x1, x2, d1, d2 = x[..., :half], x[..., half:], d[..., :half], d[..., half:]
  total = lambda a: jnp.sum(a, axis=(0, 2, 3))                        # noqa: E731  -> (L, Dh/2)
  d_cos = jnp.concatenate([total(d1 * x1), total(d2 * x2)], axis=-1)
  d_sin = jnp.concatenate([total(-d1 * x2), total(d2 * x1)], axis=-1)
  return d_qkv, d_cos.astype(cos_LxD.dtype), d_sin.astype(sin_LxD.dtype)


split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


def attention(q_BxLxHxD: Array, k_BxLxHxD: Array, v_BxLxHxD: Array, impl: str) -> Array:
  """Bidirectional softmax(q kᵀ / √Dh) v per head; (B, L, H, Dh) in and out, in q's dtype.

  `jax.nn.dot_product_attention` with `impl` ('auto': JAX picks; 'xla'; 'cudnn'), except where
  the program is compiled for a CPU ('auto' and 'xla'): there `cpu_attention`, the same math
  measured faster on that backend (BENCHMARKS.md). Chosen per compile target
  (`lax.platform_dependent`), so an ahead-of-time compile for a TPU gets the TPU path.
  """
  def library(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation=None if impl == 'auto' else impl)
  if impl == 'cudnn':
    return library(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  return jax.lax.platform_dependent(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, cpu=cpu_attention,
                                    default=library)


def row_max(x: Array) -> Array:
  """max over the last axis (keepdims) as elementwise maxima of halves down to ≤ 32 lanes and one
  short reduction: the same value (a max is exact in any order, NaN propagates either way); XLA's
  CPU backend runs a long row max as a windowed reduction 5x slower (BENCHMARKS.md)."""
  while x.shape[-1] > 32 and x.shape[-1] % 2 == 0:
    half = x.shape[-1] // 2
    x = jnp.maximum(x[..., :half], x[..., half:])
  return jnp.max(x, axis=-1, keepdims=True)


# How `cpu_attention` takes the scores' row max: False = `jnp.max`, which XLA's CPU library
# reductions fuse with the score product and the exponential (its default compile options);
# True = `row_max`, for programs compiled without those reductions (the sampler's options,
# `sampling.runner.forward_compiler_options`), where a long row max runs as a slow windowed
# reduction. Read at trace time.
_ROW_MAX_BY_HALVING = contextvars.ContextVar('didi_jax_row_max_by_halving', default=False)


@contextlib.contextmanager
def row_max_by_halving(enabled: bool = True):
  """Programs traced inside take `cpu_attention`'s row max by halving (`row_max`); the same value
  either way (a max is exact), only the speed differs with the program's compile options."""
  token = _ROW_MAX_BY_HALVING.set(bool(enabled))
  try:
    yield
  finally:
    _ROW_MAX_BY_HALVING.reset(token)


def cpu_attention(q_BxLxHxD: Array, k_BxLxHxD: Array, v_BxLxHxD: Array) -> Array:
  """`jax.nn.dot_product_attention`'s math in (B, H, L, Dh) layout, arranged for XLA's CPU backend.

  softmax(q kᵀ / √Dh) v with float32 scores and softmax, rearranged (float32 results differ in
  the last bits): q is scaled before the product (over (L, Dh), not (L, L): the backend
  materialised the scale as a (B, H, L, L) array for its library fusion); the softmax's
  normalisation is applied after the product with v, o = (e v) / Σe with e = exp(s − max s), so
  the (L, L) probabilities are never divided; the max is `jnp.max`, or `row_max` inside
  `row_max_by_halving()`. The unnormalised e (≤ 1) is cast to v's dtype for the product.

  The gradient is written out (a custom VJP of the same math, float32): every (L, L) product has
  its contracted axis last in the left operand, the form XLA's CPU backend runs fast; autodiff
  gave two of the four backward products a transposed left operand, which ran at a third of that
  speed (BENCHMARKS.md). Under differentiation the products that would stand alone in XLA's
  library fusions (e·v, ∂q, ∂kᵀ, ∂vᵀ) go through `library_threaded`: same values, both cores.
  """
  return _cpu_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, _ROW_MAX_BY_HALVING.get())


def library_threaded(x: Array) -> Array:
  """x's values, arranged so that XLA's CPU library splits the product that makes x over the cores.

  max(row min, x) with the min over the last axis: every entry is at least its row's minimum, so
  the value is x's, bit for bit, in every row without a NaN; a NaN never disappears (XLA's
  library maximum returns its second operand x when either is NaN; XLA's own maximum propagates
  the NaN to the row). Why: XLA's CPU library (YNNPACK) runs a (B·H)-batched product of
  (256, 256) and (256, 48) matrices that sits alone in its fusion on one thread (it splits the
  work within one matrix, and these are below its threshold), but splits a fusion that also
  reduces over both cores. Attention forward + backward at B=32, L=256, 4 heads of 48: 36.0 →
  24.9 ms on 2 cores (BENCHMARKS.md). Used on the attention products that would stand alone:
  the forward's e·v when its residuals are kept for the gradient (under the primal, XLA fuses
  e·v with the scores already), and the three backward products that make ∂q, ∂kᵀ, ∂vᵀ.
  """
  return jnp.maximum(jnp.min(x, axis=-1, keepdims=True), x)


def _cpu_attention_impl(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, halving, threaded):
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  q_BxLxHxD = (q_BxLxHxD.astype(jnp.float32) * jnp.float32(scale)).astype(q_BxLxHxD.dtype)
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  s = jnp.einsum('bhld,bhmd->bhlm', q, k, preferred_element_type=jnp.float32)
  m = row_max(s) if halving else jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum('bhlm,bhmd->bhld', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (library_threaded(o) if threaded else o) / denom
  return jnp.swapaxes(o.astype(v.dtype), 1, 2), (q, k, v, e, denom, o)


def _cpu_attention_fwd(q, k, v, halving):
  return _cpu_attention_impl(q, k, v, halving, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_attention(q, k, v, halving):
  return _cpu_attention_impl(q, k, v, halving, False)[0]


def _cpu_attention_bwd(halving, res, g_BxLxHxD):
  """o = (e v)/Σe, e = exp(s − m), s = (q/√Dh) kᵀ (m a constant: softmax is shift-invariant):
  ∂e = (g/Σe) vᵀ − rowsum(g·o)/Σe, ∂s = e ∂e, ∂q = ∂s k/√Dh, ∂k = ∂sᵀ q/√Dh, ∂v = eᵀ (g/Σe)."""
  del halving
  q, k, v, e, denom, o = res            # (B, H, L, Dh) in the input dtypes; e, Σe, o float32
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  scale = 1.0 / math.sqrt(q.shape[-1])
  g = jnp.swapaxes(f32(g_BxLxHxD), 1, 2)
  g_n = g / denom                                                   # ∂(e v)
  de = jnp.einsum('bhld,bhmd->bhlm', g_n, f32(v)) - jnp.sum(g_n * o, axis=-1, keepdims=True)
  ds = e * de
  dq = library_threaded(jnp.einsum('bhlm,bhmd->bhld', ds, f32(k))) * jnp.float32(scale)
  # ∂kᵀ = qᵀ ∂s and ∂vᵀ = (g/Σe)ᵀ e with the (Dh, L) left operands made explicitly: products of
  # the (L, L) arrays as right operands, never transposed. (g/Σe)ᵀ is divided in the transposed
  # layout: a transpose of g_n would be folded back into the product by XLA.
  dk_t = library_threaded(jnp.einsum('bhdl,bhlm->bhdm', jnp.swapaxes(f32(q), 2, 3), ds))
  dv_t = library_threaded(
      jnp.einsum('bhdl,bhlm->bhdm', jnp.swapaxes(g, 2, 3) / jnp.swapaxes(denom, 2, 3), e))
  return (jnp.swapaxes(dq, 1, 2).astype(q.dtype),
          jnp.transpose(dk_t, (0, 3, 1, 2)).astype(k.dtype),
          jnp.transpose(dv_t, (0, 3, 1, 2)).astype(v.dtype))


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


def dropout(x: Array, rate: float, key: Optional[Array]) -> Array:
  """Inverted dropout: keep each element with probability 1 − rate and scale it by 1/(1 − rate).

  The keep mask is `dropout_keep_mask(key, x.shape, rate)` (docs/method.md §3.2)."""
  if key is None or rate == 0.0:
    return x
  keep = dropout_keep_mask(key, x.shape, rate)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dropout_keep_mask(key: Array, shape: tuple, rate: float) -> Array:
  """Bernoulli(1 − rate) keep mask of `shape`, a deterministic function of `key`.

  Accelerators: `jax.random.bernoulli(key, 1 − rate, shape)` (JAX's partitionable threefry).
  CPUs: 32 random bits per element from XLA's RngBitGenerator (threefry algorithm, state from
  `key`), kept where bits < round((1 − rate)·2³²): the same Bernoulli law, generated about 3.5x
  faster than JAX's threefry lowering on XLA's CPU backend (BENCHMARKS.md), so masks differ from
  an accelerator's for the same key. Chosen per compile target (`lax.platform_dependent`).
  """
  threshold = min(int(round((1.0 - rate) * 2.0 ** 32)), 2 ** 32 - 1)

  def cpu(k):
    state = jax.random.bits(k, (4,), jnp.uint32)
    _, bits = jax.lax.rng_bit_generator(state, shape, dtype=jnp.uint32,
                                        algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
    return bits < jnp.uint32(threshold)

  def default(k):
    return jax.random.bernoulli(k, 1.0 - rate, shape)
  return jax.lax.platform_dependent(key, cpu=cpu, default=default)


class DiTBlock(nnx.Module):

  def __init__(self, dim: int, n_heads: int, mlp_dim: int, cond_dim: int, *, dtype,
               attention_impl: str, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.attention_impl = attention_impl
    self.norm1 = LayerNormNoBias(dim)
    self.attn_qkv = Linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn_out = Linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNormNoBias(dim)
    self.mlp_0 = Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_2 = Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = Linear(cond_dim, 6 * dim, zero=True, dtype=dtype, rngs=rngs)

  def __call__(self, h_BxLxD, c_BxC, cos, sin, rate: float, key: Optional[Array]):
    B, L, D = h_BxLxD.shape
    H = self.n_heads
    mod = self.adaLN_modulation(c_BxC)[:, None, :]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)

    u = self.norm1.modulated(h_BxLxD, shift_a, scale_a)
    qkv = self.attn_qkv(u).reshape(B, L, 3, H, D // H)
    q, k, v = split_qkv(qkv, cos, sin)
    a = attention(q, k, v, self.attention_impl).reshape(B, L, D)
    h = h_BxLxD + gate_a * dropout(self.attn_out(a), rate, k1)

    u2 = self.norm2.modulated(h, shift_m, scale_m)
    m = self.mlp_2(jax.nn.gelu(self.mlp_0(u2), approximate=True))
    return h + gate_m * dropout(m, rate, k2)


class OutputLayer(nnx.Module):

  def __init__(self, dim: int, vocab: int, cond_dim: int, *, dtype, rngs: nnx.Rngs):
    self.norm_final = LayerNormNoBias(dim)
    self.linear = Linear(dim, vocab, zero=True, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = Linear(cond_dim, 2 * dim, zero=True, dtype=dtype, rngs=rngs)

  def modulated(self, h_BxLxD, c_BxC):
    shift, scale = jnp.split(self.adaLN_modulation(c_BxC)[:, None, :], 2, axis=-1)
    return self.norm_final.modulated(h_BxLxD, shift, scale)

  def __call__(self, h_BxLxD, c_BxC):
    return self.linear(self.modulated(h_BxLxD, c_BxC))


class DiTTrunk(nnx.Module):
  """Embedding, time MLP and blocks: everything but the output layer."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    self.cfg_length = cfg.length
    self.head_dim = cfg.hidden_size // cfg.n_heads
    self.dropout_rate = float(cfg.dropout)
    self.remat = bool(cfg.get('remat', False))
    self.vocab_embed = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.sigma_map = SigmaMap(cfg.cond_dim, rngs=rngs)
    self.blocks = nnx.List([
        DiTBlock(cfg.hidden_size, cfg.n_heads, cfg.mlp_dim, cfg.cond_dim, dtype=dtype,
                 attention_impl=cfg.attention_impl, rngs=rngs)
        for _ in range(cfg.n_blocks)])

  def trunk(self, x, sigma_B, *, soft_input: str = 'logits',
            dropout_key: Optional[Array] = None, num_blocks=None):
    """Returns (hidden_BxLxD float32, c_BxC float32) after the first `num_blocks` blocks (all by
    default). x: ids (B, L), or a soft input (B, L, V) read as `soft_input` ('logits': softmax
    inside, the official contract; 'probs')."""
    carry = self.trunk_carry(x, sigma_B, soft_input=soft_input)
    return self.trunk_output(self.run_blocks(carry, 0, num_blocks, dropout_key))

  def trunk_carry(self, x, sigma_B, *, soft_input: str = 'logits'):
    """The first block's inputs: (embeddings (B, L, D), conditioning c (B, C)), float32."""
    interface.check_inputs(x, sigma_B, self.vocab_embed.embedding.shape[0])
    return self.vocab_embed(x, soft_input), jax.nn.silu(self.sigma_map(sigma_B))

  def run_blocks(self, carry, start: int = 0, stop: Optional[int] = None,
                 dropout_key: Optional[Array] = None):
    """Blocks [start, stop) applied to `carry` = (h, c); returns (h, c). Block i's dropout key is
    `split(dropout_key, stop)[i]`."""
    h, c = carry
    stop = len(self.blocks) if stop is None else stop
    cos, sin = rotary_constants(h.shape[1], self.head_dim)
    keys = [None] * stop
    if dropout_key is not None and self.dropout_rate > 0:
      keys = list(jax.random.split(dropout_key, stop))
    for i in range(start, stop):
      block, key = self.blocks[i], keys[i]
      if self.remat:
        h = nnx.remat(lambda b, h_, c_, k_: b(h_, c_, cos, sin, self.dropout_rate, k_))(
            block, h, c, key)
      else:
        h = block(h, c, cos, sin, self.dropout_rate, key)
    return h, c

  def trunk_output(self, carry):
    """(hidden, c) of a `run_blocks` carry."""
    return carry


class DiT(DiTTrunk):
  """Teacher / student denoiser: (ids or soft input, σ) -> raw logits (B, L, V).

  A soft input (B, L, V) is logits by default, as in the official model (softmax inside);
  soft_input='probs' reads it as probabilities. Implements `models.interface.Denoiser`.
  """
  trunk_modules = ('vocab_embed', 'sigma_map', 'blocks')

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.output_layer = OutputLayer(cfg.hidden_size, cfg.vocab_size, cfg.cond_dim,
                                    dtype=jnp.dtype(cfg.compute_dtype), rngs=rngs)

  def __call__(self, x, sigma_B, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None):
    h, c = self.trunk(x, sigma_B, soft_input=soft_input, dropout_key=dropout_key)
    return self.output_layer(h, c)

  def features(self, x, sigma_B, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None):
    """The output layer's input after final LN + adaLN (B, L, D), for row-sparse projections."""
    h, c = self.trunk(x, sigma_B, soft_input=soft_input, dropout_key=dropout_key)
    return self.output_layer.modulated(h, c)

  @property
  def projection(self) -> Linear:
    """features (B, L, D) -> logits (B, L, V), position by position."""
    return self.output_layer.linear


def count_params(module: nnx.Module) -> int:
  state = nnx.state(module, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
