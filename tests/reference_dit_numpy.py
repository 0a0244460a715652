"""An independent NumPy forward of the official DiT and discriminator (docs/method.md §3.2, §5.3).

Written from the specification, not from our Flax code: it reads a dict of tensors under the
OFFICIAL names in PyTorch layout (Linear weight = (out, in), y = x Wᵀ + b) and computes in float64
(or the dtype given). Used by the checkpoint tests as the parity oracle.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def _linear(x, t: Mapping, name: str, dtype, bias: bool = True):
  y = x @ np.asarray(t[name + '.weight'], dtype).T
  if bias:
    y = y + np.asarray(t[name + '.bias'], dtype)
  return y


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, weight, dtype):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)          # biased variance
  return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(weight, dtype)


def _softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def timestep_embedding(sigma_B, dtype, dim: int = 256):
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=dtype) / half)
  args = np.asarray(sigma_B, dtype)[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)   # cos block first


def _rotary(x_BxLxHxD, dtype):
  L, Dh = x_BxLxHxD.shape[1], x_BxLxHxD.shape[-1]
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, Dh, 2, dtype=dtype) / Dh))
  angle = np.arange(L, dtype=dtype)[:, None] * inv_freq[None]
  emb = np.concatenate([angle, angle], -1)
  cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
  half = Dh // 2
  rot = np.concatenate([-x_BxLxHxD[..., half:], x_BxLxHxD[..., :half]], -1)
  return x_BxLxHxD * cos + rot * sin


def trunk(t: Mapping, x, sigma_B, n_heads: int, dtype=np.float64):
  """Embedding, conditioning and all blocks: returns (h_BxLxD, c_BxC).

  x: ids (B, L), or a soft input (B, L, V) read as the official model reads it: logits,
  h = softmax_V(logits) @ E (softmax in `dtype`).
  """
  E = np.asarray(t['vocab_embed.embedding'], dtype)
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer):
    h = E[x]
  else:                                       # soft input: logits (B, L, V), softmax inside
    h = _softmax(np.asarray(x, dtype)) @ E
  phi = timestep_embedding(sigma_B, dtype)
  c = _silu(_linear(_silu(_linear(phi, t, 'sigma_map.mlp.0', dtype)), t, 'sigma_map.mlp.2', dtype))
  B, L, D = h.shape
  H, Dh = n_heads, D // n_heads
  n_blocks = len({k.split('.')[1] for k in t if k.startswith('blocks.')})
  for i in range(n_blocks):
    p = f'blocks.{i}.'
    mod = _linear(c, t, p + 'adaLN_modulation', dtype)[:, None, :]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = np.split(mod, 6, axis=-1)
    u = _layer_norm(h, t[p + 'norm1.weight'], dtype) * (1 + scale_a) + shift_a
    qkv = _linear(u, t, p + 'attn_qkv', dtype, bias=False).reshape(B, L, 3, H, Dh)
    q, k, v = _rotary(qkv[:, :, 0], dtype), _rotary(qkv[:, :, 1], dtype), qkv[:, :, 2]
    scores = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(Dh)
    a = np.einsum('bhqk,bkhd->bqhd', _softmax(scores), v).reshape(B, L, D)
    h = h + gate_a * _linear(a, t, p + 'attn_out', dtype, bias=False)
    u2 = _layer_norm(h, t[p + 'norm2.weight'], dtype) * (1 + scale_m) + shift_m
    m = _linear(_gelu_tanh(_linear(u2, t, p + 'mlp.0', dtype)), t, p + 'mlp.2', dtype)
    h = h + gate_m * m
  return h, c


def dit_forward(t: Mapping, x, sigma_B, n_heads: int, dtype=np.float64):
  """Raw logits (B, L, V) of the official DiT (teacher / student)."""
  h, c = trunk(t, x, sigma_B, n_heads, dtype)
  shift, scale = np.split(_linear(c, t, 'output_layer.adaLN_modulation', dtype)[:, None, :], 2, -1)
  u = _layer_norm(h, t['output_layer.norm_final.weight'], dtype) * (1 + scale) + shift
  return _linear(u, t, 'output_layer.linear', dtype)


def spectral_weight(t: Mapping, name: str, dtype=np.float64):
  """Eval-mode spectral norm: W / (uᵀ W v) with the stored u, v (PyTorch layout, (out, in))."""
  W = np.asarray(t[name + '.weight_orig'], dtype)
  u = np.asarray(t[name + '.weight_u'], dtype)
  v = np.asarray(t[name + '.weight_v'], dtype)
  return W / (u @ W @ v)


def discriminator_forward(t: Mapping, x, sigma_B, n_heads: int, dtype=np.float64):
  """Per-token logits (B, L): main.2(SiLU(main.0(h))) on the last block's residual stream."""
  h, _ = trunk(t, x, sigma_B, n_heads, dtype)
  w0 = spectral_weight(t, 'output_layer.main.0', dtype)
  w2 = spectral_weight(t, 'output_layer.main.2', dtype)
  z = _silu(h @ w0.T + np.asarray(t['output_layer.main.0.bias'], dtype))
  return (z @ w2.T + np.asarray(t['output_layer.main.2.bias'], dtype))[..., 0]
