"""The PyTorch baseline of `python -m didi_jax.bench {train,sample} --baseline=torch`.

Our own PyTorch DiT written after the official one (docs/method.md §3: adaLN DiT blocks, rotary
on q and k, `scaled_dot_product_attention`, LayerNorm statistics in float32, the soft-input
contract h = softmax_V(logits) @ E), whose `state_dict()` names are the official ones, so it
loads the very weights the JAX side uses through `checkpoint.exporter.to_official` with
`load_state_dict(strict=True)`. The benchmark checks once that both give the same logits
(`check_parity`), then times in the same process:

  train   one MDLM step: antithetic t, forward masking, forward with dropout, SUBS NELBO
          (docs/method.md §4), backward, global-norm clip, AdamW, EMA (what
          `pretrain.Trainer.train_step` does);
  sample  the N-step ancestral loop of `sampling.ancestral.ancestral_sample` (SUBS, σ = 0,
          DDPM-cache: the network is skipped when no token changed, then noise removal): the same
          number of network calls on the same (B, L) shapes, the same exponential-race draw
          (argmax w / E, E = 1e-10 − log(U + 1e-10), float32) over w_v = p_v (α_s − α_t),
          w_[MASK] = 1 − α_s.

Each runs eagerly and under `torch.compile` (the network compiled; where compilation fails, the
row says why). torch is optional (the `bench` extra): `bench.py` imports this module only for
`--baseline=torch`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from didi_jax.checkpoint import exporter

NEG_INF = -1e6          # SUBS "probability 0" (diffusion.NEG_INF)
SCHEDULE_EPS = 1e-3     # α_t = 1 − (1 − ε) t (diffusion.EPS)
EXP_FLOOR = 1e-10       # the race's offsets (categorical.EXP_FLOOR)


# ============================================================================ the network


class LayerNorm(nn.Module):
  """Official `LayerNorm`: float32 statistics, weight, no bias."""

  def __init__(self, dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.dim = dim

  def forward(self, x):
    return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


class EmbeddingLayer(nn.Module):
  """ids -> E[ids]; a float soft input (B, L, V) is logits: softmax_V(x) @ E (official contract)."""

  def __init__(self, vocab: int, dim: int):
    super().__init__()
    self.embedding = nn.Parameter(torch.zeros(vocab, dim))

  def forward(self, x):
    if not torch.is_floating_point(x):
      return self.embedding[x]
    return torch.softmax(x.float(), dim=-1) @ self.embedding


class TimestepEmbedder(nn.Module):
  """σ -> MLP([cos(σ f), sin(σ f)]) (frequency dim 256)."""

  def __init__(self, cond_dim: int, freq_dim: int = 256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
    self.freq_dim = freq_dim

  def forward(self, sigma):
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):

  def __init__(self, head_dim: int):
    super().__init__()
    self.register_buffer(
        'inv_freq', 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

  def forward(self, length: int):
    t = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
    emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, dim=-1)
    return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
  half = x.shape[-1] // 2
  xf = x.float()
  rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
  return (xf * cos + rot * sin).to(x.dtype)


class DDiTBlock(nn.Module):

  def __init__(self, dim: int, n_heads: int, mlp_dim: int, cond_dim: int, dropout: float):
    super().__init__()
    self.n_heads, self.dropout = n_heads, dropout
    self.norm1 = LayerNorm(dim)
    self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.attn_out = nn.Linear(dim, dim, bias=False)
    self.norm2 = LayerNorm(dim)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(approximate='tanh'),
                             nn.Linear(mlp_dim, dim))
    self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

  def forward(self, x, cos, sin, c):
    B, L, D = x.shape
    H = self.n_heads
    (shift_a, scale_a, gate_a, shift_m, scale_m,
     gate_m) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
    u = self.norm1(x) * (1 + scale_a) + shift_a
    qkv = self.attn_qkv(u).view(B, L, 3, H, D // H)
    q = apply_rotary(qkv[:, :, 0], cos, sin).transpose(1, 2)
    k = apply_rotary(qkv[:, :, 1], cos, sin).transpose(1, 2)
    v = qkv[:, :, 2].transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
    x = x + gate_a * F.dropout(self.attn_out(a), self.dropout, self.training)
    u2 = self.norm2(x) * (1 + scale_m) + shift_m
    return x + gate_m * F.dropout(self.mlp(u2), self.dropout, self.training)


class FinalLayer(nn.Module):

  def __init__(self, dim: int, vocab: int, cond_dim: int):
    super().__init__()
    self.norm_final = LayerNorm(dim)
    self.linear = nn.Linear(dim, vocab)
    self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiT(nn.Module):
  """(ids (B, L) or soft logits (B, L, V), σ (B,)) -> raw logits (B, L, V), official names."""

  def __init__(self, model_cfg):
    super().__init__()
    d, v, c = int(model_cfg.hidden_size), int(model_cfg.vocab_size), int(model_cfg.cond_dim)
    self.vocab_embed = EmbeddingLayer(v, d)
    self.sigma_map = TimestepEmbedder(c)
    self.rotary_emb = Rotary(d // int(model_cfg.n_heads))
    self.blocks = nn.ModuleList([
        DDiTBlock(d, int(model_cfg.n_heads), int(model_cfg.mlp_dim), c,
                  float(model_cfg.dropout)) for _ in range(int(model_cfg.n_blocks))])
    self.output_layer = FinalLayer(d, v, c)

  def forward(self, x, sigma):
    h = self.vocab_embed(x)
    c = F.silu(self.sigma_map(sigma))
    cos, sin = self.rotary_emb(h.shape[1])
    for block in self.blocks:
      h = block(h, cos, sin, c)
    return self.output_layer(h, c)


def from_jax(model_cfg, params, device: str = 'cpu') -> DiT:
  """Our DiT with the JAX `params` (an nnx Param state or pure dict), via the official layout."""
  tensors = exporter.to_official(params, role='dit', model_cfg=model_cfg)
  model = DiT(model_cfg)
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in
                         tensors.items()}, strict=True)
  return model.to(device)


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
  """max |got − want| / max |want| (0 when both are zero)."""
  scale = float(np.max(np.abs(want)))
  return float(np.max(np.abs(got - want))) / scale if scale else float(np.max(np.abs(got)))


def check_parity(model: DiT, jax_logits_fn: Callable, ids: np.ndarray, sigma: np.ndarray,
                 tol: float = 1e-4) -> float:
  """Raises if the torch and JAX logits differ by more than `tol` (relative); returns the error.

  `jax_logits_fn(ids, sigma) -> (B, L, V)`. Run in float32 (the benchmark's CPU default).
  """
  dev = next(model.parameters()).device
  model.eval()
  with torch.no_grad():
    got = model(torch.from_numpy(ids).long().to(dev),
                torch.from_numpy(sigma).float().to(dev)).float().cpu().numpy()
  want = np.asarray(jax_logits_fn(ids, sigma), np.float32)
  err = max_rel_error(got, want)
  if not err <= tol:
    raise AssertionError(f'torch baseline logits differ from ours: max relative error {err:.3g} '
                         f'> {tol:g}')
  return err


# ============================================================================ the timed programs


def _alpha(t: float) -> float:
  return 1.0 - (1.0 - SCHEDULE_EPS) * t


def _race(w, generator=None):
  """argmax_v w_v / E_v, E = 1e-10 − log(U + 1e-10) (float32), as `categorical.race`."""
  u = torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
  return torch.argmax(w / (EXP_FLOOR - torch.log(u + EXP_FLOOR)), dim=-1)


def _subs_probs(logits, mask_id: int):
  z = logits.float()
  z[..., mask_id] += NEG_INF
  return torch.softmax(z, dim=-1)


class Counted:
  """Wraps a network callable; records the input shape of every call (equal-work checks)."""

  def __init__(self, fn: Callable):
    self.fn, self.shapes = fn, []

  def __call__(self, x, sigma):
    self.shapes.append(tuple(x.shape))
    return self.fn(x, sigma)


def ancestral_sample(net: Callable, batch: int, length: int, mask_id: int, steps: int, *,
                     t_min: float = 1e-5, device: str = 'cpu', generator=None,
                     autocast: Optional[torch.dtype] = None):
  """`ancestral_sample` (SUBS, σ = 0, DDPM-cache, noise removal 'sample') in PyTorch.

  Returns (ids (B, L), network calls made).
  """
  x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
  sigma = torch.zeros(batch, device=device)
  ts = np.linspace(1.0, t_min, steps + 1)
  dt = (1.0 - t_min) / steps
  probs, calls = None, 0

  def forward():
    with torch.autocast(device.split(':')[0], dtype=autocast, enabled=autocast is not None):
      return _subs_probs(net(x, sigma), mask_id)
  with torch.no_grad():
    for i in range(steps):
      if probs is None:
        probs, calls = forward(), calls + 1
      a_t, a_s = _alpha(float(ts[i])), _alpha(float(ts[i]) - dt)
      w = probs * (a_s - a_t)
      w[..., mask_id] = 1.0 - a_s
      x_new = torch.where(x == mask_id, _race(w, generator), x)
      if not torch.equal(x_new, x):
        probs = None          # the cache is stale
      x = x_new
    if probs is None:
      probs, calls = forward(), calls + 1
    x = torch.where(x == mask_id, _race(probs, generator), x)
  return x, calls


def mdlm_loss(logits, z, x, t, mask_id: int):
  """Mean over (B, L) of the MDLM NELBO per token: −log p_SUBS(x | z) / t at masked positions."""
  logits = logits.float().clone()
  logits[..., mask_id] += NEG_INF
  lp = torch.log_softmax(logits, dim=-1).gather(-1, x[..., None])[..., 0]
  return torch.where(z == mask_id, -lp / t[:, None], 0.0).mean()


def make_train_step(model: DiT, pcfg, mask_id: int, *, autocast: Optional[torch.dtype] = None,
                    forward: Optional[Callable] = None):
  """One MDLM pre-training step on a (B, L) batch (what `pretrain.make_train_step` computes)."""
  forward = forward or model
  opt = torch.optim.AdamW(model.parameters(), lr=float(pcfg.lr), betas=(pcfg.b1, pcfg.b2),
                          eps=float(pcfg.eps), weight_decay=float(pcfg.weight_decay))
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  state = {'step': 0}
  model.train()

  def step(x):
    B = x.shape[0]
    dev = x.device
    u0 = torch.rand((), device=dev)
    t = (1 - SCHEDULE_EPS) * torch.remainder(u0 / B + torch.arange(B, device=dev) / B, 1.0) \
        + SCHEDULE_EPS
    z = torch.where(torch.rand(x.shape, device=dev) < ((1 - SCHEDULE_EPS) * t)[:, None],
                    mask_id, x)   # each token masked with probability 1 − α_t
    with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
      logits = forward(z, torch.zeros(B, device=dev))
    loss = mdlm_loss(logits, z, x, t, mask_id)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, float(pcfg.clip_norm))
    opt.step()
    decay = min(float(pcfg.ema_decay), (1.0 + state['step']) / (10.0 + state['step']))
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
    state['step'] += 1
    return loss
  return step


def _sync(device: str):
  if device.startswith('cuda'):
    torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, warmup: int, iters: int, device: str) -> dict:
  """Runs `fn` warm-up + timed times (the first call's seconds reported as compile/warm-up)."""
  t0 = time.perf_counter()
  fn()
  _sync(device)
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    fn()
    _sync(device)
  seconds = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds.append(time.perf_counter() - t0)
  return {'seconds': seconds, 'first_s': first}


def compiled(model: DiT) -> Callable:
  """`torch.compile(model)` (static shapes); raises what compilation raises, on first call."""
  return torch.compile(model, dynamic=False)


def default_device() -> str:
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def autocast_dtype(dtype: str) -> Optional[torch.dtype]:
  """bfloat16 runs under autocast (as the official code), float32 without."""
  return torch.bfloat16 if dtype == 'bfloat16' else None


def tokens(batch: int, length: int, vocab: int, device: str, rng: int = 1) -> torch.Tensor:
  g = torch.Generator().manual_seed(rng)
  return torch.randint(0, vocab - 1, (batch, length), generator=g).to(device)
