"""Layers shared by the causal LMs (GPT-2 and Llama, `gpt2.py` and `llama.py`).

Weights are (in, out) (HF Conv1D layout); parameters float32, LayerNorm/RMSNorm statistics and
softmaxes float32, matmuls in the layer's `dtype`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

GPT2_INIT_STD = 0.02            # HF GPT-2 `initializer_range`


def normal_init(std: float):
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)
  return init


class Dense(nnx.Module):
  """y = x @ weight + bias in `dtype`; weight (in, out) (HF Conv1D layout)."""

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool = True, std: float = GPT2_INIT_STD,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.weight = nnx.Param(normal_init(std)(rngs.params(), (d_in, d_out)))
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.dot(x.astype(self.dtype), self.weight[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias; float32 statistics (biased variance)."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class RMSNorm(nnx.Module):
  """x · rsqrt(mean(x²) + eps) · weight, float32."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * (
        self.weight[...])


class EmbeddingTable(nnx.Module):
  """(vocab, d) table; `attend` projects hidden states back onto it (tied output head)."""

  def __init__(self, vocab: int, dim: int, *, std: float = GPT2_INIT_STD, rngs: nnx.Rngs):
    self.weight = nnx.Param(normal_init(std)(rngs.params(), (vocab, dim)))

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.weight[...], ids, axis=0)

  def attend(self, h: Array, dtype) -> Array:
    return jnp.einsum('...d,vd->...v', h.astype(dtype), self.weight[...].astype(dtype))


def causal_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, impl: str) -> Array:
  impl = None if impl == 'auto' else impl
  return jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, is_causal=True,
                                      implementation=impl)


def cached_attention(q_BxHxD, k_BxTxKxD, v_BxTxKxD, pos) -> Array:
  """One query position against a KV cache; keys at positions > pos are masked. float32 softmax."""
  B, H, D = q_BxHxD.shape
  K = k_BxTxKxD.shape[2]
  q = q_BxHxD.reshape(B, K, H // K, D)
  s = jnp.einsum('bkgd,btkd->bkgt', q, k_BxTxKxD).astype(jnp.float32) / math.sqrt(D)
  valid_T = jnp.arange(k_BxTxKxD.shape[1]) <= pos
  s = jnp.where(valid_T, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v_BxTxKxD.dtype)
  return jnp.einsum('bkgt,btkd->bkgd', p, v_BxTxKxD).reshape(B, H, D)
