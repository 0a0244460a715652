"""Llama in Flax NNX: the offline Gen-PPL judge (SmolLM2 from a GGUF file).

Parameter paths follow GGUF (`blk.3.attn_q.weight`, stored here transposed to (in, out)); loading
is in `didi_jax.checkpoint.hub`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didi_jax.models.dit import apply_rotary
from didi_jax.models.layers import Dense, EmbeddingTable, RMSNorm, causal_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  context_length: int
  d_model: int
  n_layer: int
  n_head: int
  n_kv_head: int
  d_ff: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  compute_dtype: str = 'float32'
  attention_impl: str = 'xla'

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head


def rotary_tables(length: int, head_dim: int, theta: float):
  """HF Llama rotary: cos/sin of concat(angle, angle), angle[p, j] = p·θ^(−2j/Dh); (L, Dh)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  angle = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class LlamaBlock(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    d, dh = cfg.d_model, cfg.head_dim
    self.n_head, self.n_kv_head, self.impl = cfg.n_head, cfg.n_kv_head, cfg.attention_impl
    self.attn_norm = RMSNorm(d, cfg.rms_eps)
    self.attn_q = Dense(d, cfg.n_head * dh, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn_k = Dense(d, cfg.n_kv_head * dh, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn_v = Dense(d, cfg.n_kv_head * dh, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn_output = Dense(cfg.n_head * dh, d, use_bias=False, dtype=dtype, rngs=rngs)
    self.ffn_norm = RMSNorm(d, cfg.rms_eps)
    self.ffn_gate = Dense(d, cfg.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
    self.ffn_up = Dense(d, cfg.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
    self.ffn_down = Dense(cfg.d_ff, d, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, h_BxLxD, cos, sin):
    B, L, _ = h_BxLxD.shape
    x = self.attn_norm(h_BxLxD)
    q = apply_rotary(self.attn_q(x).reshape(B, L, self.n_head, -1), cos, sin)
    k = apply_rotary(self.attn_k(x).reshape(B, L, self.n_kv_head, -1), cos, sin)
    v = self.attn_v(x).reshape(B, L, self.n_kv_head, -1)
    a = causal_attention(q, k, v, self.impl).reshape(B, L, -1)
    h = h_BxLxD + self.attn_output(a).astype(jnp.float32)
    x = self.ffn_norm(h)
    m = self.ffn_down(jax.nn.silu(self.ffn_gate(x)) * self.ffn_up(x))
    return h + m.astype(jnp.float32)


class Llama(nnx.Module):
  """Llama: RMSNorm, SwiGLU, rotate-half rotary (HF layout), grouped-query attention."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.token_embd = EmbeddingTable(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.blk = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.output_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.output = (None if cfg.tie_embeddings else
                   EmbeddingTable(cfg.vocab_size, cfg.d_model, rngs=rngs))

  def features(self, ids_BxL: Array) -> Array:
    """Final-norm hidden states (B, L, D), the output head's input."""
    L = ids_BxL.shape[1]
    cos, sin = rotary_tables(L, self.cfg.head_dim, self.cfg.rope_theta)
    h = self.token_embd(ids_BxL)
    for block in self.blk:
      h = block(h, cos, sin)
    return self.output_norm(h)

  def __call__(self, ids_BxL: Array) -> Array:
    """Next-token logits (B, L, V) in compute dtype."""
    head = self.token_embd if self.output is None else self.output
    return head.attend(self.features(ids_BxL), self.dtype)
