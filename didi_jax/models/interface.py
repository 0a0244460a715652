"""The denoiser interface: what samplers, the distillation objective and the loaders ask of a
network, so any architecture that provides it can be a teacher or a student.

    logits_BxLxV = model(x, sigma_B, soft_input='logits', dropout_key=None)
    feats_BxLxD = model.features(x, sigma_B, soft_input='logits', dropout_key=None)
    logits_BxLxV = model.projection(feats_BxLxD)      # == model(x, sigma_B) row by row

`x` is ids (B, L) int32 or a soft input (B, L, V) float: logits (softmax inside, as the official
DiT; the default) or, with soft_input='probs', probabilities (what RGAS feeds). `sigma_B` is the
noise level per row (architectures without time conditioning ignore it). `projection` maps
features to logits position by position, so the sparse samplers and the fused losses can project
only the rows they need. `trunk_modules` names the attributes a discriminator copies from its
teacher (docs/method.md D2).
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import chex
import jax

Array = jax.Array


def check_inputs(x: Array, sigma_B: Array, vocab_size: int) -> None:
  """The interface's input contract, asserted where a network is entered (trace time, free
  under jit): ids (B, L) of an integer type, or a float soft input (B, L, V); σ of shape (B,)."""
  if x.ndim == 2:
    chex.assert_type(x, int)
  else:
    chex.assert_rank(x, 3)
    chex.assert_type(x, float)
    chex.assert_axis_dimension(x, 2, vocab_size)
  chex.assert_shape(sigma_B, (x.shape[0],))


@runtime_checkable
class Denoiser(Protocol):
  trunk_modules: tuple[str, ...]

  def __call__(self, x: Array, sigma_B: Array, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None) -> Array: ...

  def features(self, x: Array, sigma_B: Array, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None) -> Array: ...

  @property
  def projection(self): ...
