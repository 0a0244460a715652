"""Cost accounting for samplers (docs/method.md §9): network evaluations and FLOPs per sample.

FLOPs per sequence of length L count 2 per multiply-accumulate of the per-token matmuls (qkv,
attention output, MLP; the output layer or the discriminator head) plus 4·L²·d per layer for
attention (scores and weighted values). Per-sequence conditioning matmuls (time MLP, adaLN) are
left out (< 0.01% at the paper's sizes), as in the §9 reference numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from didi_jax.sampling import rgas

FLOPS_PER_MAC = 2
ATTENTION_FLOPS_PER_L2D = 4      # QKᵀ and AV, 2 FLOPs per MAC each
TERA = 1e12
SAMPLERS = ('ancestral', 'rgas')


def _length(model_cfg, length: Optional[int]) -> int:
  return int(model_cfg.length if length is None else length)


def block_macs_per_token(model_cfg) -> int:
  """qkv (d·3d) + attention output (d·d) + MLP (2·d·mlp) per token per block."""
  d, m = model_cfg.hidden_size, model_cfg.mlp_dim
  return 3 * d * d + d * d + 2 * d * m


def attention_flops(model_cfg, length: Optional[int] = None) -> float:
  """4·L²·d per layer."""
  L = _length(model_cfg, length)
  return float(ATTENTION_FLOPS_PER_L2D * L * L * model_cfg.hidden_size * model_cfg.n_blocks)


def trunk_dense_flops(model_cfg, length: Optional[int] = None) -> float:
  L = _length(model_cfg, length)
  return float(FLOPS_PER_MAC * L * model_cfg.n_blocks * block_macs_per_token(model_cfg))


def soft_embedding_flops(model_cfg, length: Optional[int] = None) -> float:
  """softmax·E on a soft input: 2·L·V·d."""
  L = _length(model_cfg, length)
  return float(FLOPS_PER_MAC * L * model_cfg.vocab_size * model_cfg.hidden_size)


def output_layer_flops(model_cfg, length: Optional[int] = None,
                       projected_fraction: float = 1.0) -> float:
  """The d -> V output projection on a fraction of the L rows (1 = dense; sparse reveal < 1)."""
  L = _length(model_cfg, length)
  return float(FLOPS_PER_MAC * L * projected_fraction * model_cfg.hidden_size
               * model_cfg.vocab_size)


def disc_head_flops(model_cfg, length: Optional[int] = None) -> float:
  """The discriminator head: d -> d -> 1 per token."""
  L = _length(model_cfg, length)
  d = model_cfg.hidden_size
  return float(FLOPS_PER_MAC * L * (d * d + d))


def student_forward_flops(model_cfg, length: Optional[int] = None,
                          projected_fraction: float = 1.0) -> float:
  """Teacher/student forward on ids (small, L = 1024: 291.65 G)."""
  return (trunk_dense_flops(model_cfg, length) + attention_flops(model_cfg, length)
          + output_layer_flops(model_cfg, length, projected_fraction))


def disc_forward_flops(model_cfg, length: Optional[int] = None, soft_input: bool = False) -> float:
  """Discriminator forward: trunk + head, plus softmax·E on a soft input (213.81 / 292.86 G)."""
  flops = (trunk_dense_flops(model_cfg, length) + attention_flops(model_cfg, length)
           + disc_head_flops(model_cfg, length))
  if soft_input:
    flops += soft_embedding_flops(model_cfg, length)
  return flops


def disc_backward_flops(model_cfg, length: Optional[int] = None) -> float:
  """Input-gradient backward of the discriminator on a soft input: dense ×1 (no weight
  gradients), attention ×2, soft embedding ×1 (331.51 G)."""
  dense = trunk_dense_flops(model_cfg, length) + disc_head_flops(model_cfg, length)
  return (dense + 2 * attention_flops(model_cfg, length)
          + soft_embedding_flops(model_cfg, length))


@dataclasses.dataclass(frozen=True)
class SamplerCost:
  """Per-sample cost of one sampler setting (docs/method.md §9)."""
  nfe: int                    # the paper's count: N sampler steps (student calls)
  student_forwards: int       # N + noise removal − cache hits
  disc_forwards: int          # RGAS: K_tilt soft + M·(N − K_tilt) hard
  disc_backwards: int         # RGAS: K_tilt input-gradients
  network_evaluations: int    # student + discriminator forwards
  flops: float                # per sample

  @property
  def tflops(self) -> float:
    return self.flops / TERA

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out['tflops_per_sample'] = self.tflops
    return out


def sampler_cost(model_cfg, sampler: str, steps: int, *, length: Optional[int] = None,
                 num_candidates: int = 4, rerank_ratio: float = 0.5, cache_hits: int = 0,
                 noise_removal: bool = True, disc_cfg=None,
                 projected_fraction: float = 1.0) -> SamplerCost:
  """Cost of `sampler` ('ancestral' | 'rgas') with N = `steps` on `model_cfg` (the student or
  teacher); `disc_cfg` defaults to the same trunk. `cache_hits` are subtracted from the student
  forwards (measured, e.g. `stats['cache_hits']`); `projected_fraction` < 1 models sparse reveal.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler={sampler!r} is not valid: use one of {SAMPLERS}')
  disc_cfg = model_cfg if disc_cfg is None else disc_cfg
  student = steps + int(bool(noise_removal)) - int(cache_hits)
  flops = student * student_forward_flops(model_cfg, length, projected_fraction)
  d_fwd = d_bwd = 0
  if sampler == 'rgas':
    k_tilt = rgas.num_tilt_steps(steps, rerank_ratio)
    hard = num_candidates * (steps - k_tilt)
    d_fwd, d_bwd = k_tilt + hard, k_tilt
    flops += (k_tilt * disc_forward_flops(disc_cfg, length, soft_input=True)
              + hard * disc_forward_flops(disc_cfg, length)
              + k_tilt * disc_backward_flops(disc_cfg, length))
  return SamplerCost(nfe=steps, student_forwards=student, disc_forwards=d_fwd,
                     disc_backwards=d_bwd, network_evaluations=student + d_fwd, flops=flops)


def cost_from_config(cfg, cache_hits: int = 0) -> SamplerCost:
  """`sampler_cost` for `cfg.sampler` on `cfg.model`."""
  s = cfg.sampler
  return sampler_cost(cfg.model, s.kind, int(s.steps), num_candidates=int(s.rgas.num_candidates),
                      rerank_ratio=float(s.rgas.rerank_ratio), cache_hits=cache_hits,
                      noise_removal=s.noise_removal != 'none')
