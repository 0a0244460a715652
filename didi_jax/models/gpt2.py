"""GPT-2 in Flax NNX: the AR baseline (`model.kind='ar'`) and the Gen-PPL judge.

Parameter paths equal HF's names one-to-one (`h.3.attn.c_attn.weight`; Conv1D weights are
already (in, out)), so loading (`didi_jax.checkpoint.hub`) is a name-by-name check. Precision as
in `dit.py`: parameters float32, LayerNorm statistics, the residual stream and softmaxes float32,
matmuls in `compute_dtype`. Sampling with a KV cache: `didi_jax.sampling.ar`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from didi_jax.models.dit import dropout
from didi_jax.models.layers import (GPT2_INIT_STD, Dense, EmbeddingTable, LayerNorm,
                                    cached_attention, causal_attention)

Array = jax.Array

GPT2_EOS = 50256


def next_token_nll(logits_BxLxV: Array, ids_BxL: Array) -> Array:
  """−log p(ids[:, l+1] | ids[:, ≤l]) from a causal LM's logits, float32 (B, L−1)."""
  logits = logits_BxLxV[:, :-1].astype(jnp.float32)
  target = jnp.take_along_axis(logits, ids_BxL[:, 1:, None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target

@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 sizes. Defaults are GPT-2 small (124M)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  d_model: int = 768
  n_layer: int = 12
  n_head: int = 12
  d_mlp: int = 3072
  dropout: float = 0.0            # embedding and residual-branch dropout (training only)
  layer_norm_eps: float = 1e-5
  tie_embeddings: bool = True     # HF GPT-2 ties lm_head to wte
  compute_dtype: str = 'float32'
  attention_impl: str = 'xla'     # 'xla' | 'cudnn' | 'auto'

  @classmethod
  def from_hf(cls, hf: dict, compute_dtype: str = 'float32') -> 'GPT2Config':
    """From an HF GPT-2 `config.json` dict."""
    act = hf.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
      raise ValueError(f'GPT-2 config has activation_function={act!r}; only the tanh GELU '
                       "('gelu_new') is implemented: use a standard GPT-2 checkpoint")
    d = int(hf['n_embd'])
    return cls(vocab_size=int(hf['vocab_size']), n_positions=int(hf['n_positions']), d_model=d,
               n_layer=int(hf['n_layer']), n_head=int(hf['n_head']),
               d_mlp=int(hf.get('n_inner') or 4 * d),
               layer_norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
               tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
               compute_dtype=compute_dtype)

  @classmethod
  def from_model_config(cls, model_cfg) -> 'GPT2Config':
    """From the `model` section of our config (model.kind='ar')."""
    return cls(vocab_size=int(model_cfg.vocab_size), n_positions=int(model_cfg.length),
               d_model=int(model_cfg.hidden_size), n_layer=int(model_cfg.n_blocks),
               n_head=int(model_cfg.n_heads), d_mlp=int(model_cfg.mlp_dim),
               dropout=float(model_cfg.dropout), compute_dtype=str(model_cfg.compute_dtype),
               attention_impl=str(model_cfg.attention_impl))


class GPT2Attention(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    d = cfg.d_model
    self.n_head = cfg.n_head
    self.impl = cfg.attention_impl
    self.c_attn = Dense(d, 3 * d, dtype=dtype, rngs=rngs)
    self.c_proj = Dense(d, d, std=GPT2_INIT_STD / math.sqrt(2 * cfg.n_layer), dtype=dtype,
                        rngs=rngs)

  def _qkv(self, x):
    *lead, d = x.shape
    qkv = self.c_attn(x).reshape(*lead, 3, self.n_head, d // self.n_head)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

  def __call__(self, x_BxLxD: Array) -> Array:
    B, L, D = x_BxLxD.shape
    q, k, v = self._qkv(x_BxLxD)
    return self.c_proj(causal_attention(q, k, v, self.impl).reshape(B, L, D))

  def decode(self, x_BxD, pos, k_cache_BxTxHxD, v_cache_BxTxHxD):
    B, D = x_BxD.shape
    q, k, v = self._qkv(x_BxD)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache_BxTxHxD, k[:, None].astype(
        k_cache_BxTxHxD.dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache_BxTxHxD, v[:, None].astype(
        v_cache_BxTxHxD.dtype), pos, axis=1)
    a = cached_attention(q.astype(k_cache.dtype), k_cache, v_cache, pos)
    return self.c_proj(a.reshape(B, D)), k_cache, v_cache


class GPT2MLP(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    self.c_fc = Dense(cfg.d_model, cfg.d_mlp, dtype=dtype, rngs=rngs)
    self.c_proj = Dense(cfg.d_mlp, cfg.d_model,
                        std=GPT2_INIT_STD / math.sqrt(2 * cfg.n_layer), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class GPT2Block(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.attn = GPT2Attention(cfg, rngs=rngs)
    self.ln_2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.mlp = GPT2MLP(cfg, rngs=rngs)

  def __call__(self, h, rate: float, key: Optional[Array]):
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    h = h + dropout(self.attn(self.ln_1(h)), rate, k1).astype(jnp.float32)
    return h + dropout(self.mlp(self.ln_2(h)), rate, k2).astype(jnp.float32)


class GPT2(nnx.Module):
  """GPT-2: learned positions, pre-LN blocks, tanh GELU, final LN, (tied) output head."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.wte = EmbeddingTable(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.wpe = EmbeddingTable(cfg.n_positions, cfg.d_model, std=GPT2_INIT_STD / 2, rngs=rngs)
    self.h = nnx.List([GPT2Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.lm_head = (None if cfg.tie_embeddings else
                    EmbeddingTable(cfg.vocab_size, cfg.d_model, rngs=rngs))

  def features(self, ids_BxL: Array, *, dropout_key: Optional[Array] = None) -> Array:
    """Final-LN hidden states (B, L, D) float32, the output head's input."""
    L = ids_BxL.shape[1]
    if L > self.cfg.n_positions:
      raise ValueError(f'GPT-2 input has {L} tokens but n_positions={self.cfg.n_positions}: '
                       'truncate the input or build the model with a larger n_positions')
    rate = self.cfg.dropout
    keys = [None] * (len(self.h) + 1)
    if dropout_key is not None and rate > 0:
      keys = list(jax.random.split(dropout_key, len(self.h) + 1))
    h = self.wte(ids_BxL) + self.wpe(jnp.arange(L))[None]
    h = dropout(h, rate, keys[0])
    for block, key in zip(self.h, keys[1:]):
      h = block(h, rate, key)
    return self.ln_f(h)

  def logits_from_features(self, h: Array) -> Array:
    head = self.wte if self.lm_head is None else self.lm_head
    return head.attend(h, self.dtype)

  def __call__(self, ids_BxL: Array, *, dropout_key: Optional[Array] = None) -> Array:
    """Next-token logits (B, L, V) in compute dtype; logits[:, i] predicts ids[:, i + 1]."""
    return self.logits_from_features(self.features(ids_BxL, dropout_key=dropout_key))

  def init_cache(self, batch_size: int, max_len: int):
    """Zero KV cache: (k, v), each (n_layer, B, T, H, Dh) in compute dtype."""
    c = self.cfg
    shape = (c.n_layer, batch_size, max_len, c.n_head, c.d_model // c.n_head)
    return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

  def decode_step(self, ids_B: Array, pos, cache):
    """One token per row at position `pos` (scalar) -> (logits (B, V), updated cache)."""
    k_all, v_all = cache
    h = self.wte(ids_B) + self.wpe.weight[...][pos][None]
    new_k, new_v = [], []
    for i, block in enumerate(self.h):
      a, k_i, v_i = block.attn.decode(block.ln_1(h), pos, k_all[i], v_all[i])
      h = h + a.astype(jnp.float32)
      h = h + block.mlp(block.ln_2(h)).astype(jnp.float32)
      new_k.append(k_i)
      new_v.append(v_i)
    logits = self.logits_from_features(self.ln_f(h))
    return logits, (jnp.stack(new_k), jnp.stack(new_v))
