"""Discriminator: the teacher's DiT trunk + a spectral-normalised per-token head.

Convention (docs/method.md §5.2-§5.3): one logit per token, high = "real". The head reads the
last block's residual stream directly (no final LN, no adaLN): d = main_2(SiLU(main_0(h))). Both
head layers use PyTorch's classic spectral norm with one power iteration; the power-iteration
vectors u, v live in the non-trainable `Spectral` collection and are checkpointed with the model.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from didi_jax.models.dit import DiTTrunk, torch_uniform_init

Array = jax.Array


class Spectral(nnx.Variable):
  """Power-iteration state of a spectral-normalised layer (not trained by the optimiser)."""


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x), 1e-12)


class SNLinear(nnx.Module):
  """Spectral-normalised Linear. kernel (in, out) = weight_origᵀ; u (out,), v (in,)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    init = torch_uniform_init(d_in)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out)))
    self.bias = nnx.Param(init(rngs.params(), (d_out,)))
    self.u = Spectral(_normalize(jax.random.normal(rngs.params(), (d_out,))))
    self.v = Spectral(_normalize(jax.random.normal(rngs.params(), (d_in,))))

  def effective_kernel(self, update: bool) -> Array:
    k = self.kernel[...]
    u, v = self.u[...], self.v[...]
    if update:
      # v <- normalize(Wᵀu), u <- normalize(W v), with W = kᵀ (out, in).
      v = _normalize(k @ u)
      u = _normalize(v @ k)
      self.u[...] = jax.lax.stop_gradient(u)
      self.v[...] = jax.lax.stop_gradient(v)
    u = jax.lax.stop_gradient(u)
    v = jax.lax.stop_gradient(v)
    s = jnp.dot(v @ k, u)
    return k / s

  def __call__(self, x: Array, update: bool = False) -> Array:
    k = self.effective_kernel(update)
    return jnp.dot(x.astype(jnp.float32), k, precision=jax.lax.Precision.HIGHEST) + self.bias[...]


class DiscriminatorHead(nnx.Module):

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.main_0 = SNLinear(dim, dim, rngs=rngs)
    self.main_2 = SNLinear(dim, 1, rngs=rngs)

  def __call__(self, h_BxLxD: Array, update: bool = False) -> Array:
    return self.main_2(jax.nn.silu(self.main_0(h_BxLxD, update)), update)[..., 0]


class PrefixShared:
  """A discriminator's calls, for a trunk class with `trunk_carry`, `run_blocks` and
  `trunk_output` and a `DiscriminatorHead` as `output_layer` (DiT and ESM).

  `prefix` / `from_prefix` split one call at a block boundary: `from_prefix(prefix(x, σ, k), k)`
  is `self(x, σ)` without dropout. A DiDi iteration runs the frozen first blocks once for the
  discriminator's update and the reward pass (docs/method.md §7.4).
  """

  def __call__(self, x, sigma_B=None, *, soft_input: str = 'logits',
               update_spectral: bool = False, dropout_key: Optional[Array] = None) -> Array:
    h, _ = self.trunk(x, sigma_B, soft_input=soft_input, dropout_key=dropout_key)
    return self.output_layer(h, update_spectral)

  def prefix(self, x, sigma_B, n_blocks: int, *, soft_input: str = 'logits'):
    """The carry after the first `n_blocks` blocks (no dropout): a pytree, rows first."""
    return self.run_blocks(self.trunk_carry(x, sigma_B, soft_input=soft_input), 0, n_blocks)

  def from_prefix(self, carry, n_blocks: int, *, update_spectral: bool = False) -> Array:
    """Per-token logits (B, L) from a `prefix(..., n_blocks)` carry (no dropout)."""
    h, _ = self.trunk_output(self.run_blocks(carry, n_blocks))
    return self.output_layer(h, update_spectral)


class Discriminator(PrefixShared, DiTTrunk):
  """(ids (B, L) or soft input (B, L, V), σ_B) -> per-token logits (B, L), float32.

  A soft input is logits by default, as in the official model (softmax inside); RGAS feeds
  probabilities with soft_input='probs'. `block_path` / `head_modules` say which parameters
  `distill.disc_unfreeze_blocks` trains (the last blocks under `block_path`, and the head).
  """
  block_path = ('blocks',)
  head_modules = ('output_layer',)

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.output_layer = DiscriminatorHead(cfg.hidden_size, rngs=rngs)


def trainable_mask(params_tree, n_blocks: int, unfreeze_blocks: int):
  """Bool pytree over a Discriminator's Param state: last `unfreeze_blocks` blocks + head."""
  first = n_blocks - unfreeze_blocks

  def is_trainable(path, _):
    keys = [getattr(p, 'key', getattr(p, 'idx', None)) for p in path]
    if keys and keys[0] == 'output_layer':
      return True
    if keys and keys[0] == 'blocks':
      return int(keys[1]) >= first
    return False
  return jax.tree_util.tree_map_with_path(is_trainable, params_tree)
