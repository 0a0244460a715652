"""Samplers (docs/method.md §8): the categorical draw, ancestral (+DDPM-cache, sparse reveal), RGAS, cost.

All samplers are pure functions over network callables and run as one `lax.scan`; the caller
closes over the parameters and jits. See `ancestral` for the key layout and the cache semantics.
"""
from __future__ import annotations

from typing import Callable, Optional

import chex
import jax

from didi_jax.sampling import ancestral as _ancestral
from didi_jax.sampling import rgas as _rgas
from didi_jax.sampling.ancestral import ancestral_sample
from didi_jax.sampling.ancestral import sparse_ancestral_sample
from didi_jax.sampling.categorical import Regime
from didi_jax.sampling.categorical import ancestral_step
from didi_jax.sampling.categorical import race
from didi_jax.sampling.cost import sampler_cost
from didi_jax.sampling.rgas import rgas_sample

__all__ = ['Regime', 'ancestral_sample', 'ancestral_step', 'race', 'rgas_sample',
           'sample_from_config', 'sampler_cost', 'sparse_ancestral_sample']


def sample_from_config(sampler_cfg, key: jax.Array, batch_size: int, length: int, mask_id: int,
                       *, denoise_fn: Optional[Callable] = None,
                       disc_fn: Optional[Callable] = None,
                       features_fn: Optional[Callable] = None,
                       project_fn: Optional[Callable] = None,
                       x_init: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Runs the sampler that `sampler_cfg` (the config's `sampler` section) names.

  kind='ancestral': `ancestral_sample(denoise_fn)`, or `sparse_ancestral_sample(features_fn,
  project_fn)` when `sampler_cfg.sparse_reveal` is set; kind='rgas': `rgas_sample(denoise_fn,
  disc_fn)`. Call inside `jax.jit` with the networks closed over.
  """
  if x_init is not None:
    chex.assert_shape(x_init, (batch_size, length))
    chex.assert_type(x_init, int)
  sparse = bool(sampler_cfg.get('sparse_reveal', False))
  if sampler_cfg.kind == 'rgas':
    if denoise_fn is None or disc_fn is None:
      raise ValueError("sampler.kind='rgas' needs denoise_fn and disc_fn: pass the student and "
                       'the discriminator')
    if sparse:
      raise ValueError("sampler.sparse_reveal works with sampler.kind='ancestral' only: turn it "
                       'off for RGAS')
    return rgas_sample(denoise_fn, disc_fn, key, batch_size, length, mask_id, x_init=x_init,
                       **_rgas.kwargs_from_config(sampler_cfg))
  kwargs = _ancestral.kwargs_from_config(sampler_cfg)
  if sparse:
    if features_fn is None or project_fn is None:
      raise ValueError('sampler.sparse_reveal needs features_fn and project_fn (e.g. '
                       'model.features and model.projection)')
    capacity = float(sampler_cfg.get('sparse_capacity', _ancestral.DEFAULT_SPARSE_CAPACITY))
    return sparse_ancestral_sample(features_fn, project_fn, key, batch_size, length, mask_id,
                                   capacity_factor=capacity, x_init=x_init, **kwargs)
  if denoise_fn is None:
    raise ValueError("sampler.kind='ancestral' needs denoise_fn (the network's logits)")
  return ancestral_sample(denoise_fn, key, batch_size, length, mask_id, x_init=x_init, **kwargs)
