"""Loading networks by source, for every job.

A source is one of:
  * a didi_jax workdir (or its `checkpoints/` dir) written by `pretrain` or `distill`: the orbax
    checkpoint is restored and the named network taken from it (teacher: EMA or raw weights per
    `teacher.weights`; student / student_ema / discriminator from a distillation);
  * anything `didi_jax.checkpoint.importer` reads: official Lightning `.ckpt`, HF safetensors
    folders, `hf:ORG/NAME`, our exported `.safetensors` / `.npz`.
Returned parameters are `nnx.State`s matching `nnx.split(model, nnx.Param)` of the model built
from the returned model config.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from didi_jax.checkpoint import importer
from didi_jax.checkpoint.manager import Manager
from didi_jax.models.discriminator import Discriminator, Spectral
from didi_jax.train import distill_state as ds
from didi_jax.train import pretrain


@dataclasses.dataclass
class Network:
  """A loaded network: its model config, graphdef and parameter states."""
  role: str                      # teacher | student | student_ema | discriminator | ar
  model_cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: nnx.State
  spectral: Optional[nnx.State] = None
  source: str = ''

  def model(self):
    if self.spectral is not None:
      return nnx.merge(self.graphdef, self.params, self.spectral)
    return nnx.merge(self.graphdef, self.params)


def checkpoint_dir(source: str) -> Optional[str]:
  """The orbax checkpoint dir of a didi_jax workdir (or the dir itself), else None."""
  source = os.path.expanduser(source)
  if not os.path.isdir(source):
    return None
  cand = os.path.join(source, 'checkpoints')
  for d in (cand, source):
    if os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d)):
      return d
  return None


def read_workdir_config(source: str) -> tuple[ml_collections.ConfigDict, Manager]:
  ckpt = checkpoint_dir(source)
  if ckpt is None:
    raise FileNotFoundError(f'{source} holds no didi_jax checkpoint: run the job there first, or '
                            'point at a checkpoint file / hf:ORG/NAME')
  mngr = Manager(ckpt, async_save=False)
  meta = mngr.read_meta()
  if 'config' not in meta:
    raise FileNotFoundError(f'{ckpt} has no config in its metadata: it was not written by '
                            'didi_jax pretrain/distill')
  return ml_collections.ConfigDict(meta['config']), mngr


def workdir_job(source: str) -> str:
  """The job ('pretrain' | 'distill') that wrote the checkpoints of a didi_jax workdir."""
  _, mngr = read_workdir_config(source)
  job = mngr.read_meta().get('job', '')
  mngr.close()
  return job


def _model_cfg(model_dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model_dict))


def build_abstract(model_cfg, discriminator: bool = False):
  """(graphdef, abstract params, abstract spectral or None) of a DiT / GPT-2 / discriminator."""
  if discriminator:
    abstract = nnx.eval_shape(lambda: Discriminator(model_cfg, rngs=nnx.Rngs(0)))
    gd, params, spectral = nnx.split(abstract, nnx.Param, Spectral)
    return gd, params, spectral
  abstract = pretrain.abstract_model(model_cfg)
  gd, params = nnx.split(abstract, nnx.Param)
  return gd, params, None


def load(source: str, role: str, model_cfg=None, *, weights: str = 'ema') -> Network:
  """Loads network `role` from `source` (see the module docstring)."""
  if role not in ('teacher', 'student', 'student_ema', 'discriminator', 'ar'):
    raise ValueError(f'unknown network role {role!r}')
  ckpt = checkpoint_dir(source)
  if ckpt is not None:
    return _load_workdir(source, role, weights)
  src = importer.open_source(source)
  if model_cfg is None:
    model_cfg = importer.source_model_config(src)
  model_cfg = _model_cfg(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg)
  if role == 'discriminator':
    params_d, spectral_d = importer.import_discriminator(src, model_cfg)
    gd, params, spectral = build_abstract(model_cfg, discriminator=True)
    params = _fill(params, params_d)
    spectral = _fill(spectral, spectral_d)
    return Network(role, model_cfg, gd, params, spectral, source)
  network = {'teacher': 'auto', 'student': 'student', 'student_ema': 'student_ema'}.get(role,
                                                                                        'auto')
  params_d = importer.import_dit(src, model_cfg, network=network, weights=weights)
  gd, params, _ = build_abstract(model_cfg)
  return Network(role, model_cfg, gd, _fill(params, params_d), None, source)


def _fill(abstract_state, pure):
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_state)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return state


def _load_workdir(source: str, role: str, weights: str) -> Network:
  cfg, mngr = read_workdir_config(source)
  job = mngr.read_meta().get('job')
  model_cfg = _model_cfg(cfg.model.to_dict())
  if job == 'pretrain':
    if role not in ('teacher', 'ar'):
      raise ValueError(f'{source} is a pre-training run: it holds a teacher, not a {role}')
    gd, _, _ = build_abstract(model_cfg)
    tx = pretrain.make_optimizer(cfg.pretrain)
    state, _, _ = mngr.restore(pretrain.abstract_state(cfg, tx))
    params = state['ema'] if weights == 'ema' else state['params']
    mngr.close()
    return Network(role, model_cfg, gd, params, None, source)
  if job == 'distill':
    abstract = abstract_distill_state(cfg)
    state, _, _ = mngr.restore(abstract)
    mngr.close()
    student_gd, disc_gd = ds.make_graphdefs(cfg)
    if role == 'teacher':
      raise ValueError(f'{source} is a distillation run; its teacher came from '
                       f'{cfg.teacher.checkpoint!r}: pass that as --config.teacher.checkpoint')
    if role in ('student', 'student_ema'):
      params = state.ema if role == 'student_ema' else state.student
      gd, _, _ = build_abstract(model_cfg)
      return Network(role, model_cfg, gd, params, None, source)
    if role == 'discriminator':
      merged = nnx.merge(disc_gd, state.disc_train, state.disc_frozen, state.spectral)
      gd, params, spectral = nnx.split(merged, nnx.Param, Spectral)
      return Network(role, model_cfg, gd, params, spectral, source)
    raise ValueError(f'{source} is a distillation run: it holds no {role} network')
  raise ValueError(f'{source}: unknown job {job!r} in checkpoint metadata')


def abstract_distill_state(cfg):
  model_cfg = _model_cfg(cfg.model.to_dict())
  _, abstract_params, _ = build_abstract(model_cfg)
  return jax.eval_shape(lambda p: ds.init_distill_state(cfg, p, jax.random.PRNGKey(0)),
                        abstract_params)
