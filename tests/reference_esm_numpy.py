"""An independent NumPy forward of HF `EsmForMaskedLM` (ESM-2 / DPLM), from the HF names.

Written from transformers' `modeling_esm.py` and DPLM's `EsmForDPLM.forward`, not from our Flax
code; imports nothing from didi_jax. Reads a dict of tensors under the HF names in PyTorch layout
(Linear weight (out, in), y = x Wᵀ + b) and computes in float64.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
from scipy.special import erf


def _lin(x, t, name):
  return x @ np.asarray(t[name + '.weight'], np.float64).T + np.asarray(t[name + '.bias'],
                                                                        np.float64)


def _ln(x, t, name, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return ((x - mu) / np.sqrt(var + eps) * np.asarray(t[name + '.weight'], np.float64)
          + np.asarray(t[name + '.bias'], np.float64))


def _gelu(x):
  return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def forward(t: Mapping, ids, *, n_heads: int, mask_id: int = 32, pad_id: int = 1,
            eps: float = 1e-5, token_dropout: bool = True,
            attention_mask: Optional[np.ndarray] = None, theta: float = 10000.0,
            inv_freq: Optional[np.ndarray] = None):
  """Logits (B, L, V) float64. attention_mask (B, L) of 0/1 as HF's argument (None = all ones,
  and no pad zeroing), DPLM passes ids != pad_id. inv_freq: a stored rotary table (default
  1/theta^(2j/Dh))."""
  ids = np.asarray(ids)
  B, L = ids.shape
  W = np.asarray(t['esm.embeddings.word_embeddings.weight'], np.float64)
  x = W[ids]
  if token_dropout:
    is_mask = ids == mask_id
    x = np.where(is_mask[..., None], 0.0, x)
    n = attention_mask.sum(-1) if attention_mask is not None else np.full(B, L)
    observed = is_mask.sum(-1) / n
    x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
  if attention_mask is not None:
    x = x * attention_mask[..., None]
  D = x.shape[-1]
  Dh = D // n_heads
  inv = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh) if inv_freq is None else np.asarray(inv_freq,
                                                                                      np.float64)
  ang = np.arange(L)[:, None] * inv[None]
  emb = np.concatenate([ang, ang], -1)
  cos, sin = np.cos(emb), np.sin(emb)

  def rope(z):        # z (B, H, L, Dh)
    z1, z2 = z[..., :Dh // 2], z[..., Dh // 2:]
    return z * cos + np.concatenate([-z2, z1], -1) * sin

  bias = 0.0
  if attention_mask is not None:
    bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e30)
  layer = 0
  while f'esm.encoder.layer.{layer}.attention.self.query.weight' in t:
    p = f'esm.encoder.layer.{layer}.'
    u = _ln(x, t, p + 'attention.LayerNorm', eps)
    split = lambda z: z.reshape(B, L, n_heads, Dh).transpose(0, 2, 1, 3)  # noqa: E731
    q = split(_lin(u, t, p + 'attention.self.query')) * Dh ** -0.5
    k = split(_lin(u, t, p + 'attention.self.key'))
    v = split(_lin(u, t, p + 'attention.self.value'))
    q, k = rope(q), rope(k)
    a = _softmax(q @ k.transpose(0, 1, 3, 2) + bias) @ v
    a = a.transpose(0, 2, 1, 3).reshape(B, L, D)
    x = x + _lin(a, t, p + 'attention.output.dense')
    m = _gelu(_lin(_ln(x, t, p + 'LayerNorm', eps), t, p + 'intermediate.dense'))
    x = x + _lin(m, t, p + 'output.dense')
    layer += 1
  f = _ln(x, t, 'esm.encoder.emb_layer_norm_after', eps)
  h = _ln(_gelu(_lin(f, t, 'lm_head.dense')), t, 'lm_head.layer_norm', eps)
  return h @ W.T + np.asarray(t['lm_head.bias'], np.float64)
