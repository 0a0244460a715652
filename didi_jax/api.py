"""One-call loaders for released checkpoints: a denoiser and a discriminator as plain callables.

    denoise = load_denoiser('hf:haoyangzheng/didi-instruct-small')
    logits_BxLxV = denoise(ids_BxL, sigma_B)          # raw logits, as the official DiT returns
    logits_BxLxV = denoise(soft_logits_BxLxV, sigma_B)  # soft input: logits, softmax inside

A 3-D input is a soft input read as the official model reads it: logits, h = softmax_V(logits) @ E
in float32 (docs/method.md §3.2). soft_input='probs' reads it as probabilities instead (the path
RGAS uses internally).

`source` names a model as every entry point does (`didi_jax.checkpoint.loader.resolve`): 'demo'
(the shipped demo teacher), a didi_jax run directory (a `pretrain` workdir gives its teacher, a
`distill` workdir its student EMA, student or discriminator), or anything
`didi_jax.checkpoint.importer` reads (file, directory, hf:ORG/NAME). With dtype=float32 every matmul runs in float32 (parity with the PyTorch model); with bfloat16 the model
follows the official bf16-autocast policy and returns bf16 logits (docs/method.md §3.2).
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import models
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import names
from didi_jax.models import dit

Array = jax.Array


def _check_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'dtype={dtype}: use jnp.float32 or jnp.bfloat16')
  return dtype


def _open(source: str):
  """`loader.resolve(source)`: a run directory as is, anything else opened once
  (`importer.Source`)."""
  path = loader.resolve(source)
  return path if loader.checkpoint_dir(path) is not None else importer.open_source(path)


def _load(source, role: str, dtype, size, length: int, weights: str = 'ema') -> tuple:
  """(model, model config) of network `role` from `_open(...)` through the one loader, rebuilt
  in `dtype` (a run directory's sizes come from its config; a file's from `size` or its shapes)."""
  model_cfg = None
  if isinstance(source, importer.Source):
    kind = names.DISCRIMINATOR if role == 'discriminator' else names.DIT
    model_cfg = _model_config(source, kind, size, dtype, length)
  net = loader.load(source, role, model_cfg, weights=weights)
  cfg = net.model_cfg.copy_and_resolve_references()
  cfg.compute_dtype = _check_dtype(dtype).name
  cfg.dropout = 0.0
  gd, _, _ = models.split_abstract(cfg, 'discriminator' if role == 'discriminator' else 'denoiser')
  parts = (net.params,) if net.spectral is None else (net.params, net.spectral)
  return nnx.merge(gd, *parts), cfg


def _model_config(src: importer.Source, role: str, size, dtype, length: int):
  inferred = importer.source_model_config(src, role, length=length)
  if size is None:
    cfg = inferred
  elif isinstance(size, str):
    if size not in config_lib.MODEL_SIZES:
      raise ValueError(f'size={size!r} is not a preset: use one of {list(config_lib.MODEL_SIZES)} '
                       'or None to infer it from the checkpoint')
    cfg = config_lib.model_config(size, vocab_size=inferred.vocab_size, length=length)
  else:
    cfg = importer.as_model_config(size).copy_and_resolve_references()
  cfg.compute_dtype = _check_dtype(dtype).name
  cfg.dropout = 0.0
  return cfg


class _Loaded:
  """A jit-compiled forward over an imported model (held as graphdef + state)."""

  def __init__(self, model: nnx.Module, model_cfg, forward):
    self.model_cfg = model_cfg
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef
    self._fn = jax.jit(
        lambda state, x, sigma, soft_input: forward(nnx.merge(graphdef, state), x, sigma,
                                                    soft_input),
        static_argnames='soft_input')
    self._precision = 'float32' if model_cfg.compute_dtype == 'float32' else None

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state)

  def _run(self, x, sigma, soft_input: str):
    dit.check_soft_input(soft_input)
    x = jnp.asarray(x)
    if x.ndim not in (2, 3):
      raise ValueError(f'input has shape {x.shape}: pass ids (B, L) or logits (B, L, V)')
    if x.ndim == 2 and not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'2-D input has dtype {x.dtype}: ids must be integers (a soft input is '
                       'logits (B, L, V))')
    if x.ndim == 3:
      if x.shape[-1] != self.model_cfg.vocab_size:
        raise ValueError(f'soft input has {x.shape[-1]} classes but the model has vocab '
                         f'{self.model_cfg.vocab_size}')
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f'soft input has dtype {x.dtype}: pass float logits (B, L, V)')
    sigma_B = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    if self._precision:
      with jax.default_matmul_precision(self._precision):
        return self._fn(self.state, x, sigma_B, soft_input)
    return self._fn(self.state, x, sigma_B, soft_input)


class Denoiser(_Loaded):
  """(ids_BxL | logits_BxLxV, sigma_B) -> raw logits_BxLxV (no SUBS, as the official DiT).

  A 3-D input is logits (softmax inside, as the official model); soft_input='probs' reads it as
  probabilities.
  """

  def __call__(self, x, sigma, *, soft_input: str = 'logits') -> Array:
    return self._run(x, sigma, soft_input)


class DiscriminatorFn(_Loaded):
  """(ids_BxL | logits_BxLxV, sigma_B) -> logits_BxL (eval mode: stored spectral u, v).

  A 3-D input is logits (softmax inside, as the official model); soft_input='probs' reads it as
  probabilities (what RGAS passes, so this callable can serve as its `disc_fn`).
  """

  def __call__(self, x, sigma, *, soft_input: str = 'logits') -> Array:
    return self._run(x, sigma, soft_input)


def load_denoiser(source: str, dtype=jnp.float32, size: Union[None, str, object] = None, *,
                  network: str = 'auto', weights: str = 'ema', length: int = 1024) -> Denoiser:
  """A DiT denoiser from a checkpoint (the student EMA of a DiDi source, else the teacher).

  The callable takes ids (B, L) or, as the official DiT, soft-input logits (B, L, V), and σ (B,).

  size: None infers the sizes from tensor shapes; a preset name ('small', ...) or a model config.
  network / weights: see importer.import_dit. A run directory's network: 'auto' is the student
  EMA of a distillation run and the teacher (EMA weights unless weights='raw') of a pre-training
  run; size and length come from the run's own config.
  """
  source = _open(source)
  if network == 'auto':
    if isinstance(source, importer.Source):
      network = 'student_ema' if importer.is_didi(source) else 'teacher'
    else:
      network = 'student_ema' if loader.workdir_job(source) == 'distill' else 'teacher'
  model, cfg = _load(source, network, dtype, size, length, weights)
  return Denoiser(model, cfg, lambda m, x, s, soft: m(x, s, soft_input=soft))


def load_discriminator(source: str, dtype=jnp.float32, size: Union[None, str, object] = None, *,
                       length: int = 1024) -> DiscriminatorFn:
  """The DiDi discriminator from a checkpoint: per-token logits (high = real), eval mode.

  The callable takes ids (B, L) or, as the official model, soft-input logits (B, L, V), and σ (B,).
  """
  model, cfg = _load(_open(source), 'discriminator', dtype, size, length)
  return DiscriminatorFn(model, cfg,
                         lambda m, x, s, soft: m(x, s, soft_input=soft, update_spectral=False))

