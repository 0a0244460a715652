"""The one loader: a network from any source, for every job, the API and the tools.

    net = loader.load(source, 'teacher')          # Network(model_cfg, graphdef, params, ...)
    model = net.model()                            # a ready nnx module

A source is one of:
  * a didi_jax workdir (or its `checkpoints/` dir) written by `pretrain` or `distill`: only the
    named network's arrays are read from the latest orbax checkpoint (teacher / ar: EMA or raw
    weights per `weights`; student / student_ema / discriminator from a distillation);
  * anything `didi_jax.checkpoint.importer` reads: official Lightning `.ckpt`, HF safetensors
    folders, `hf:ORG/NAME`, our exported `.safetensors` / `.npz`;
  * an ESM-2 / DPLM masked LM (`is_esm_source`: a HF dir whose config.json has model_type 'esm',
    a weights file / DPLM Lightning `.ckpt` beside such a config.json, or `hf:airkingbd/dplm_*` /
    `hf:facebook/esm2_*`), read by `checkpoint.esm_hf.load_esm` into a model.kind='esm' network
    (teacher / student roles; it holds no discriminator).
The model config comes from the run's own config, our export's stored config, or is inferred from
tensor shapes; `model_cfg` overrides the sizes for imported files. Networks are built by the
model factory (`didi_jax.models`), so any registered architecture loads the same way.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import models
from didi_jax.checkpoint import esm_hf
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import manager as manager_lib
from didi_jax.checkpoint import names
from didi_jax.checkpoint.manager import Manager
from didi_jax.models import esm as esm_lib

ROLES = ('teacher', 'student', 'student_ema', 'discriminator', 'ar')
CheckpointError = importer.CheckpointError


@dataclasses.dataclass
class Network:
  """A loaded network: its model config, graphdef and parameter states."""
  role: str                      # one of ROLES
  model_cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: nnx.State
  spectral: Optional[nnx.State] = None
  source: str = ''

  def model(self):
    if self.spectral is not None:
      return nnx.merge(self.graphdef, self.params, self.spectral)
    return nnx.merge(self.graphdef, self.params)


# A directory holding none of these (and no .ckpt / .npz) but exactly one .safetensors file (e.g.
# didi_jax/assets/demo_teacher/) names that file.
_DIR_LAYOUT_FILES = {'model.safetensors', 'pytorch_model.bin', 'discriminator.safetensors',
                     'model.safetensors.index.json', 'config.json'}


def resolve(source) -> str:
  """The one way a model is named, for every entry point (API, CLIs, configs, this loader).

  * a shipped name (`config.SHIPPED_MODELS`: 'demo' is the demo teacher) -> its file;
  * `hf:ORG/NAME` -> unchanged (downloaded when opened);
  * a didi_jax run directory (or its checkpoints/) -> itself;
  * a directory whose only checkpoint is one `.safetensors` file -> that file;
  * any other existing file or directory -> its path (`~` expanded).
  Anything else raises CheckpointError naming the forms accepted.
  """
  source = os.fspath(source)
  if source in config_lib.SHIPPED_MODELS:
    return config_lib.SHIPPED_MODELS[source]
  if source.startswith('hf:'):
    return source
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise CheckpointError(f'model {source!r} does not exist: {ACCEPTED}')
  if os.path.isdir(path) and checkpoint_dir(path) is None:
    entries = os.listdir(path)
    lone = [n for n in entries if n.endswith('.safetensors')]
    if len(lone) == 1 and not _DIR_LAYOUT_FILES & set(entries) and \
        not any(n.endswith(('.ckpt', '.npz')) for n in entries):
      return os.path.join(path, lone[0])
  return path


ACCEPTED = ("name a model as " + ", ".join(map(repr, config_lib.SHIPPED_MODELS)) +
            " (shipped), a didi_jax run directory, a checkpoint file or directory, or hf:ORG/NAME "
            "(README, 'Naming a model')")


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


def _model_cfg(model_cfg) -> ml_collections.ConfigDict:
  d = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  return ml_collections.ConfigDict(d)


def _network_role(role: str) -> str:
  return 'discriminator' if role == 'discriminator' else 'denoiser'


ESM_HUB_NAMES = ('airkingbd/dplm', 'facebook/esm2')   # hf: repos read as ESM without a look


def _config_json_model_type(directory: str) -> Optional[str]:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f).get('model_type')
  except (OSError, ValueError, AttributeError):
    return None


def is_esm_source(source) -> bool:
  """An ESM-2 / DPLM checkpoint: hf:airkingbd/dplm_* / hf:facebook/esm2_*, or a local dir (or a
  weights file in a dir) whose config.json says model_type 'esm'."""
  if not isinstance(source, (str, os.PathLike)):
    return False
  source = os.path.expanduser(os.fspath(source))
  if source.startswith('hf:'):
    return source[3:].lower().startswith(ESM_HUB_NAMES)
  directory = source if os.path.isdir(source) else os.path.dirname(source) or '.'
  return os.path.exists(source) and _config_json_model_type(directory) == 'esm'


def _load_esm(source: str, role: str, model_cfg) -> Network:
  """An ESM / DPLM masked LM as a model.kind='esm' Network; sizes from its config.json, length
  and precision knobs from `model_cfg` when given."""
  if role == 'discriminator':
    raise CheckpointError(f'{source} is an ESM / DPLM masked LM, not a discriminator: load the '
                          'discriminator from a distillation run')
  model = esm_hf.load_esm(source)
  base = config_lib.model_config('small', length=1024) if model_cfg is None \
      else _model_cfg(model_cfg)
  fields = esm_lib.model_config_fields(model.cfg)
  with base.unlocked():
    for key, value in fields.items():
      if key == 'esm':
        base.esm = ml_collections.ConfigDict(value)
      else:
        base[key] = value
    if model_cfg is None:
      base.compute_dtype = 'float32'
  gd, params, _ = models.split_abstract(base)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return Network(role, base, gd, _fill(params, pure, source), None, source)


def load(source, role: str, model_cfg=None, *, weights: str = 'ema') -> Network:
  """Network `role` from `source` (see the module docstring; an `importer.Source` already opened
  also works). model_cfg: sizes for an imported file (None: the stored config, else inferred from
  shapes); ignored for a workdir."""
  if role not in ROLES:
    raise ValueError(f'unknown network role {role!r}: use one of {ROLES}')
  if weights not in ('ema', 'raw'):
    raise ValueError(f"weights={weights!r}: use 'ema' or 'raw'")
  if isinstance(source, importer.Source):
    src, source = source, source.label
  elif checkpoint_dir(resolve(source)) is not None:
    return _load_workdir(resolve(source), role, weights)
  elif is_esm_source(resolve(source)):
    return _load_esm(resolve(source), role, model_cfg)
  else:
    src = importer.open_source(resolve(source))
  if src.kind == 'ours' and src.model_cfg is not None and src.model_cfg.kind != 'dit':
    return _load_ours(src, role, _model_cfg(model_cfg or src.model_cfg), source)
  if model_cfg is None:
    model_cfg = importer.source_model_config(
        src, names.DISCRIMINATOR if role == 'discriminator' else names.DIT)
  model_cfg = _model_cfg(model_cfg)
  gd, params, spectral = models.split_abstract(model_cfg, _network_role(role))
  if role == 'discriminator':
    params_d, spectral_d = importer.import_discriminator(src, model_cfg)
    return Network(role, model_cfg, gd, _fill(params, params_d, source),
                   _fill(spectral, spectral_d, source), source)
  network = {'student': 'student', 'student_ema': 'student_ema'}.get(role, 'auto')
  params_d = importer.import_dit(src, model_cfg, network=network, weights=weights)
  return Network(role, model_cfg, gd, _fill(params, params_d, source), None, source)


def _load_ours(src: importer.Source, role: str, model_cfg, source: str) -> Network:
  """A network of any registered architecture from our flat format: the group named by the
  role, or the file's only network; the factory's abstract network must match it exactly."""
  networks = [g for g in src.groups if g != 'discriminator_spectral']
  group = role if role in src.groups else (networks[0] if len(networks) == 1 else None)
  if group is None:
    raise CheckpointError(f'{source} holds {networks}, no {role}: name one of them')
  model_cfg.kind = src.model_cfg.kind
  gd, params, spectral = models.split_abstract(model_cfg, _network_role(role))
  if spectral is not None:
    spectral = _fill(spectral, src.groups.get('discriminator_spectral', {}), source)
  return Network(role, model_cfg, gd, _fill(params, src.groups[group], source), spectral, source)


def _fill(abstract_state: nnx.State, pure: dict, source: str) -> nnx.State:
  """`abstract_state` filled from the pure dict `pure`, whose keys must match exactly."""
  want = set(importer.flatten_tree(nnx.to_pure_dict(abstract_state)))
  got = set(importer.flatten_tree(pure))
  if want != got:   # guards the importer's name tables against drift from the model code
    raise CheckpointError(
        f'{source}: the imported tensors do not match the model: missing '
        f'{sorted(map(str, want - got))[:5]}, extra {sorted(map(str, got - want))[:5]}')
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_state)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return state


def _device_arrays(values: dict) -> dict:
  """Host arrays as uncommitted jax.Arrays (what an imported file gives too), so that a loaded
  network computes exactly as the run's own under eager calls; callers place them on a mesh."""
  return {k: jnp.asarray(v) for k, v in values.items()}


def _restore(mngr: Manager, groups: dict[str, nnx.State]) -> dict[str, nnx.State]:
  """{group: abstract state} -> {group: state} read from the checkpoint's `group.*` keys."""
  flat = {}
  for group, abstract_state in groups.items():
    flat.update({f'{group}.{k}': v for k, v in manager_lib.flatten(abstract_state).items()})
  values = _device_arrays(mngr.restore_subset(flat))
  return {group: manager_lib.unflatten(abstract_state, {
      k[len(group) + 1:]: v for k, v in values.items() if k.startswith(group + '.')})
          for group, abstract_state in groups.items()}


def _load_workdir(source: str, role: str, weights: str) -> Network:
  cfg, mngr = read_workdir_config(source)
  try:
    job = mngr.read_meta().get('job')
    model_cfg = _model_cfg(cfg.model)
    if job == 'pretrain':
      if role not in ('teacher', 'ar'):
        raise CheckpointError(f'{source} is a pre-training run: it holds a teacher, not a {role}')
      gd, params, _ = models.split_abstract(model_cfg)
      group = 'ema' if weights == 'ema' else 'params'
      return Network(role, model_cfg, gd, _restore(mngr, {group: params})[group], None, source)
    if job != 'distill':
      raise CheckpointError(f'{source}: unknown job {job!r} in checkpoint metadata')
    if role in ('teacher', 'ar'):
      raise CheckpointError(f'{source} is a distillation run; its teacher came from '
                            f'{cfg.teacher.checkpoint!r}: pass that as --config.teacher.checkpoint')
    if role in ('student', 'student_ema'):
      gd, params, _ = models.split_abstract(model_cfg)
      group = 'ema' if role == 'student_ema' else 'student'
      return Network(role, model_cfg, gd, _restore(mngr, {group: params})[group], None, source)
    if mngr.read_meta().get('method') == 'sdtt':
      raise CheckpointError(f'{source} is an SDTT run: it trains no discriminator (RGAS needs a '
                            'DiDi-Instruct run); sample its student with sampler.kind=ancestral')
    return _load_discriminator(mngr, model_cfg, source)
  finally:
    mngr.close()


def _load_discriminator(mngr: Manager, model_cfg, source: str) -> Network:
  """The discriminator of a distillation run: its parameters are stored split into trainable and
  frozen groups (by `distill.disc_unfreeze_blocks`); each key is read from the group holding it."""
  gd, params, spectral = models.split_abstract(model_cfg, 'discriminator')
  stored = mngr.stored_keys(mngr.latest_step()) or set()
  flat = {}
  for key, leaf in manager_lib.flatten(params).items():
    group = 'disc_train' if f'disc_train.{key}' in stored else 'disc_frozen'
    flat[f'{group}.{key}'] = leaf
  flat.update({f'spectral.{k}': v for k, v in manager_lib.flatten(spectral).items()})
  values = _device_arrays(mngr.restore_subset(flat))
  by_key = {k.split('.', 1)[1]: v for k, v in values.items() if not k.startswith('spectral.')}
  spec = {k[len('spectral.'):]: v for k, v in values.items() if k.startswith('spectral.')}
  return Network('discriminator', model_cfg, gd, manager_lib.unflatten(params, by_key),
                 manager_lib.unflatten(spectral, spec), source)
