"""Export our parameter trees to the official layouts (docs/method.md §3.4), and to our own flat files.

Official layouts (PyTorch names and layout, `rotary_emb.inv_freq` included so that the official
`load_state_dict(strict=True)` accepts them):

* `export_dit_safetensors`: one DiT, un-prefixed (the HF release's `model.safetensors`); with
  `prefix='backbone.'` the `kuleshov-group/mdlm-owt` layout.
* `export_discriminator_safetensors`: the HF release's `discriminator.safetensors`.
* `export_hf_didi`: a directory with both (the `haoyangzheng/didi-instruct-small` layout).
* `export_teacher_ckpt`: a DUO/MDLM Lightning `.ckpt` (`state_dict['backbone.*']` + `ema`).
* `export_didi_ckpt`: a DiDi-Instruct Lightning `.ckpt` (`backbone.*`, `student_ema.*`,
  `discriminator.*`).

`save_ours` writes our own flat format (`<group>/<tree path>` keys, `.npz` or `.safetensors`) with
the model config; `importer` reads everything back bit-exactly.

Inputs are pure dicts (as `importer` returns them, or `nnx.to_pure_dict`), nnx States, or nnx
models (a Discriminator model gives both its params and its spectral u, v).
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping, Optional

from flax import nnx
import numpy as np

from didi_jax.checkpoint import importer
from didi_jax.checkpoint import names
from didi_jax.checkpoint import torch_ckpt
from didi_jax.models.discriminator import Spectral

LIGHTNING_VERSION = '2.5.3'   # what the official converter writes


def as_pure(tree) -> tuple[dict, dict]:
  """(params, spectral) numpy pure dicts from a pure dict, an nnx State or an nnx model."""
  if isinstance(tree, nnx.Module):
    params = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
    spectral = nnx.to_pure_dict(nnx.state(tree, Spectral))
  elif isinstance(tree, nnx.State):
    params, spectral = nnx.to_pure_dict(tree), {}
  else:
    params, spectral = tree, {}
  flat = importer.flatten_tree(params)
  sflat = importer.flatten_tree(spectral)
  # A pure dict of a whole Discriminator state holds u, v next to the params: split them.
  for path in [p for p in flat if p[-1] in ('u', 'v')]:
    sflat[path] = flat.pop(path)
  unflatten = importer.unflatten_tree
  return (unflatten({k: np.asarray(v) for k, v in flat.items()}),
          unflatten({k: np.asarray(v) for k, v in sflat.items()}))


_OFFICIAL_HIDDEN = (768, 1024, 1280)   # small / medium / large: all with 64-wide heads


def _head_dim(tree, params: Mapping, model_cfg) -> int:
  """Rotary head dim for `rotary_emb.inv_freq`: config, model attribute, or 64 (official sizes)."""
  model_cfg = importer.as_model_config(model_cfg)
  if model_cfg is not None:
    return model_cfg.hidden_size // model_cfg.n_heads
  if getattr(tree, 'head_dim', None):
    return int(tree.head_dim)
  hidden = int(np.shape(params['vocab_embed']['embedding'])[1])
  if hidden not in _OFFICIAL_HIDDEN:
    raise ValueError(f'hidden size {hidden} is not an official size, so the head count is unknown:'
                     ' pass model_cfg (it sets rotary_emb.inv_freq)')
  return 64


def to_official(params, spectral: Optional[Mapping] = None, *, role: Optional[str] = None,
                model_cfg=None, dtype=None, with_inv_freq: bool = True
                ) -> 'collections.OrderedDict[str, np.ndarray]':
  """Our tree(s) -> {official name: array (PyTorch layout)} in state_dict order.

  role: 'dit' | 'discriminator' (None: from the tree). dtype: cast (default: keep). The tree must
  be complete: every official tensor present, nothing else.
  """
  p, s = as_pure(params)
  if spectral is not None:
    s = importer.merge_trees(s, as_pure(spectral)[1])
  role = role or (names.DISCRIMINATOR if 'main_0' in p.get('output_layer', {}) else names.DIT)
  flat = importer.ours_to_official(p, s)
  n_blocks = len(p.get('blocks', {}))
  order = names.state_dict_order(n_blocks, role)
  want = [n for n in order if n != names.INV_FREQ]
  missing = [n for n in want if n not in flat]
  extra = [n for n in flat if n not in order]
  if missing or extra:
    raise importer.CheckpointError(
        f'cannot export this {role} tree: missing {missing[:8]}, unexpected {extra[:8]}; pass the '
        'complete Param state (and the spectral u, v for a discriminator)')
  out = collections.OrderedDict()
  for name in order:
    if name == names.INV_FREQ:
      if with_inv_freq:
        out[name] = names.inv_freq(_head_dim(params, p, model_cfg))
      continue
    arr = np.ascontiguousarray(flat[name])
    out[name] = arr.astype(dtype) if dtype is not None else arr
  return out


def _prefixed(tensors: Mapping[str, np.ndarray], prefix: str) -> dict:
  return collections.OrderedDict((prefix + k, v) for k, v in tensors.items())


def export_dit_safetensors(path: str, params, *, model_cfg=None, prefix: str = '',
                           dtype=None) -> str:
  """One DiT as an official-name safetensors file (prefix 'backbone.' = mdlm-owt layout)."""
  tensors = to_official(params, role=names.DIT, model_cfg=model_cfg, dtype=dtype)
  torch_ckpt.write_safetensors(_prefixed(tensors, prefix), path, metadata={'format': 'pt'})
  return path


def export_discriminator_safetensors(path: str, params, spectral=None, *, model_cfg=None,
                                     dtype=None) -> str:
  """The discriminator (trunk + spectral head with u, v) as an official-name safetensors file."""
  tensors = to_official(params, spectral, role=names.DISCRIMINATOR, model_cfg=model_cfg,
                        dtype=dtype)
  torch_ckpt.write_safetensors(tensors, path, metadata={'format': 'pt'})
  return path


def export_hf_didi(out_dir: str, *, student_ema, discriminator, discriminator_spectral=None,
                   model_cfg=None, dtype=None) -> str:
  """The HF release layout: out_dir/model.safetensors (student EMA) + discriminator.safetensors."""
  os.makedirs(out_dir, exist_ok=True)
  export_dit_safetensors(os.path.join(out_dir, 'model.safetensors'), student_ema,
                         model_cfg=model_cfg, dtype=dtype)
  export_discriminator_safetensors(os.path.join(out_dir, 'discriminator.safetensors'),
                                   discriminator, discriminator_spectral, model_cfg=model_cfg,
                                   dtype=dtype)
  return out_dir


def lightning_checkpoint(state_dict: Mapping[str, np.ndarray], **extra: Any) -> dict:
  """The top-level dict of a Lightning checkpoint, as the official converter writes it."""
  ckpt = {'epoch': 0, 'global_step': 0, 'pytorch-lightning_version': LIGHTNING_VERSION,
          'state_dict': collections.OrderedDict(state_dict)}
  ckpt.update(extra)
  return ckpt


def export_teacher_ckpt(path: str, params, *, ema_params=None, model_cfg=None,
                        ema_decay: float = 0.9999, num_updates: int = 0) -> str:
  """A DUO/MDLM Lightning checkpoint: state_dict backbone.* (raw) and ema.shadow_params.

  ema_params None: the shadow list holds copies of `params` (so 'ema' and 'raw' import alike).
  """
  raw = to_official(params, role=names.DIT, model_cfg=model_cfg)
  ema = to_official(ema_params if ema_params is not None else params, role=names.DIT,
                    model_cfg=model_cfg)
  order = names.registration_order(len(as_pure(params)[0]['blocks']), names.DIT)
  shadow = [np.array(ema[n], copy=True) for n in order]
  ckpt = lightning_checkpoint(
      _prefixed(raw, 'backbone.'),
      ema={'decay': float(ema_decay), 'num_updates': int(num_updates), 'shadow_params': shadow,
           'collected_params': None})
  torch_ckpt.save(ckpt, path)
  return path


def export_didi_ckpt(path: str, *, student_ema, discriminator, discriminator_spectral=None,
                     student=None, model_cfg=None) -> str:
  """A DiDi-Instruct Lightning checkpoint (backbone.* only when `student` is given)."""
  sd = collections.OrderedDict()
  if student is not None:
    sd.update(_prefixed(to_official(student, role=names.DIT, model_cfg=model_cfg), 'backbone.'))
  sd.update(_prefixed(to_official(discriminator, discriminator_spectral,
                                  role=names.DISCRIMINATOR, model_cfg=model_cfg),
                      'discriminator.'))
  sd.update(_prefixed(to_official(student_ema, role=names.DIT, model_cfg=model_cfg),
                      'student_ema.'))
  torch_ckpt.save(lightning_checkpoint(sd), path)
  return path


def save_ours(path: str, groups: Mapping[str, Any], model_cfg=None) -> str:
  """Our flat format: keys `<group>/<tree path>`, groups in importer.OURS_GROUPS.

  `.npz` or `.safetensors` (by extension); the model config is stored for exact re-import.
  A Discriminator model or a tree holding u, v fills `discriminator_spectral` by itself.
  """
  flat = collections.OrderedDict()
  for group, tree in groups.items():
    if group not in importer.OURS_GROUPS:
      raise ValueError(f'group {group!r} is not one of {list(importer.OURS_GROUPS)}')
    params, spectral = as_pure(tree)
    if group == 'discriminator_spectral':
      parts = [(group, spectral)]
    elif group == 'discriminator':
      parts = [(group, params), ('discriminator_spectral', spectral)]
    else:
      parts = [(group, params)]
    for g, t in parts:
      for p, v in importer.flatten_tree(t).items():
        flat[g + '/' + '/'.join(str(x) for x in p)] = np.ascontiguousarray(v)
  meta = {'format': importer.OURS_FORMAT}
  model_cfg = importer.as_model_config(model_cfg)
  if model_cfg is not None:
    meta['model_config'] = json.dumps({k: model_cfg[k] for k in (
        'kind', 'size', 'hidden_size', 'n_blocks', 'n_heads', 'mlp_dim', 'cond_dim', 'vocab_size',
        'length') if k in model_cfg})
  if path.endswith('.safetensors'):
    torch_ckpt.write_safetensors(flat, path, metadata=meta)
  elif path.endswith('.npz'):
    bad = [k for k, v in flat.items() if v.dtype.kind == 'V' or v.dtype.name in (
        'bfloat16', 'float8_e4m3fn', 'float8_e5m2')]
    if bad:
      raise ValueError(f'.npz cannot hold bfloat16 ({bad[:3]}): save to .safetensors instead')
    arrays = dict(flat)
    arrays.update({f'__{k}__': np.array(v) for k, v in meta.items()})
    tmp = path[:-4] + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  else:
    raise ValueError(f'{path}: our flat format is .npz or .safetensors')
  return path
