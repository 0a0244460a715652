"""Import / export of HF ESM-2 and DPLM checkpoints for `models.esm.EsmForMaskedLM`.

Sources (`load_esm(source)`):

* a HF model directory: `config.json` + `model.safetensors` | `model.safetensors.index.json`
  (shards) | `pytorch_model.bin` | `pytorch_model.bin.index.json`. This is the layout of
  `facebook/esm2_*` and of DPLM's hub checkpoints (`airkingbd/dplm_150m` ...: DPLM's
  `EsmForDPLM.from_pretrained` reads them as a plain `EsmForMaskedLM` subclass, so the keys are
  `esm.*` / `lm_head.*`; its config.json adds `dplm_type`, ignored here);
* a single weights file (.safetensors / .bin / a DPLM Lightning `.ckpt` whose `state_dict` keys
  carry `model.net.`) with `config.json` beside it;
* `hf:ORG/NAME`, downloaded through `huggingface_hub` (optional; imported only then).

Key layout: any prefix before `esm.` (`net.`, `model.net.`) is stripped; legacy `LayerNorm.gamma` /
`.beta` (what transformers 5 writes back on save) read as `.weight` / `.bias`. Every tensor is
consumed or on the ignore list: `esm.contact_head.*` (the contact-prediction head, unused),
`esm.embeddings.position_ids`, `lm_head.decoder.weight` (must equal the word embeddings: the
decoder is tied) and the rotary `inv_freq` (per layer as transformers 4 / DPLM, shared
`esm.rotary_embeddings.inv_freq` as transformers 5, or the literal `esm.encoder.layer.*.` key
transformers 5 writes): all copies must agree, and a table that differs from the one rope_theta
gives (e.g. one saved in float16) is kept in `EsmConfig.rope_inv_freq`, so the model uses exactly
the checkpoint's frequencies.
Missing keys, unexpected keys and shape mismatches are one-line `CheckpointError`s naming the key.
pytorch_model.bin / .ckpt are read by `torch_ckpt` (no pickled code ever runs).

Export (`export_hf`) writes config.json (model_type 'esm', architectures ['EsmForMaskedLM']),
`model.safetensors` (or `pytorch_model.bin`) in the transformers-4 / DPLM key layout (per-layer
inv_freq, `.weight` / `.bias`, decoder omitted as tied), plus vocab.txt / tokenizer_config.json
for a 33-token ESM vocabulary, so that transformers (4 and 5) and DPLM load it; re-importing it
gives bit-identical parameters.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didi_jax.checkpoint import hf
from didi_jax.checkpoint import torch_ckpt
from didi_jax.data.protein import ESM_TOKENS
from didi_jax.errors import CheckpointError
from didi_jax.models import esm as esm_lib

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                'pytorch_model.bin.index.json')
_WORD = 'esm.embeddings.word_embeddings.weight'
_INV_FREQ_SHARED = 'esm.rotary_embeddings.inv_freq'
_INV_FREQ_LAYER = re.compile(r'^esm\.encoder\.layer\.(\d+|\*)\.attention\.self\.rotary_embeddings'
                             r'\.inv_freq$')
_IGNORED = re.compile(r'^(esm\.contact_head\..*|esm\.embeddings\.position_ids'
                      r'|lm_head\.decoder\.weight)$')

# ------------------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping[str, Any], **overrides) -> esm_lib.EsmConfig:
  """Our EsmConfig from a HF ESM config.json dict (CheckpointError if it is not an ESM-2-style
  masked LM we implement)."""
  model_type = hf.get('model_type', 'esm')
  if model_type != 'esm':
    raise CheckpointError(f'config.json has model_type={model_type!r}: an ESM-2 / DPLM checkpoint '
                          "(model_type 'esm') is needed")
  pos = hf.get('position_embedding_type', 'absolute')
  if pos != 'rotary':
    raise CheckpointError(f'config.json has position_embedding_type={pos!r}: only rotary ESM '
                          '(ESM-2, DPLM) is implemented, not ESM-1b / ESM-1v')
  if hf.get('is_folding_model') or hf.get('is_decoder') or hf.get('add_cross_attention'):
    raise CheckpointError('config.json describes ESMFold or a decoder: only the ESM-2 / DPLM '
                          'masked LM is implemented')
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise CheckpointError(f'config.json has hidden_act={act!r}: ESM uses gelu (erf)')
  theta = hf.get('rope_theta')
  if theta is None and isinstance(hf.get('rope_parameters'), Mapping):
    theta = hf['rope_parameters'].get('rope_theta')
  kw = dict(vocab_size=int(hf['vocab_size']), hidden_size=int(hf['hidden_size']),
            num_hidden_layers=int(hf['num_hidden_layers']),
            num_attention_heads=int(hf['num_attention_heads']),
            intermediate_size=int(hf['intermediate_size']),
            layer_norm_eps=float(hf.get('layer_norm_eps') or 1e-12),
            mask_token_id=int(hf['mask_token_id']), pad_token_id=int(hf['pad_token_id']),
            token_dropout=bool(hf.get('token_dropout', False)),
            emb_layer_norm_before=bool(hf.get('emb_layer_norm_before') or False),
            rope_theta=float(theta if theta is not None else 10000.0),
            hidden_dropout_prob=float(hf.get('hidden_dropout_prob') or 0.0))
  kw.update(overrides)
  try:
    return esm_lib.EsmConfig(**kw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'config.json does not give a usable ESM config: {e}') from None


def config_to_hf(cfg: esm_lib.EsmConfig) -> dict:
  """A HF config.json dict (transformers 4 and 5 read it)."""
  return {
      'architectures': ['EsmForMaskedLM'], 'model_type': 'esm',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'num_hidden_layers': cfg.num_hidden_layers, 'num_attention_heads': cfg.num_attention_heads,
      'intermediate_size': cfg.intermediate_size, 'hidden_act': 'gelu',
      'hidden_dropout_prob': cfg.hidden_dropout_prob, 'attention_probs_dropout_prob': 0.0,
      'max_position_embeddings': 1026, 'initializer_range': 0.02,
      'layer_norm_eps': cfg.layer_norm_eps, 'position_embedding_type': 'rotary',
      'rope_theta': cfg.rope_theta, 'use_cache': True, 'emb_layer_norm_before':
      cfg.emb_layer_norm_before, 'token_dropout': cfg.token_dropout,
      'mask_token_id': cfg.mask_token_id, 'pad_token_id': cfg.pad_token_id,
      'eos_token_id': 2, 'is_folding_model': False, 'esmfold_config': None, 'vocab_list': None,
      'tie_word_embeddings': True, 'torch_dtype': 'float32'}


# -------------------------------------------------------------------------------------- names


def _path_to_hf(path: tuple) -> tuple[str, bool]:
  """(HF name, transpose?) of one of our state paths (generic: the names mirror HF's)."""
  *mods, leaf = [str(p) for p in path]
  if leaf == 'kernel':
    return '.'.join(mods + ['weight']), True
  if leaf == 'embedding':
    return '.'.join(mods + ['weight']), False
  return '.'.join(mods + [leaf]), False


def _flat_state(model) -> dict:
  """{our path tuple: array} of the model's Params."""
  pure = nnx.state(model, nnx.Param)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(pure))[0]:
    flat[tuple(getattr(p, 'key', getattr(p, 'idx', None)) for p in path)] = leaf
  return flat


def _abstract_model(cfg: esm_lib.EsmConfig):
  return nnx.eval_shape(lambda: esm_lib.EsmForMaskedLM(cfg, rngs=nnx.Rngs(0)))


def expected_shapes(cfg: esm_lib.EsmConfig) -> dict:
  """{HF name: torch-layout shape} of every parameter the importer requires."""
  out = {}
  for path, leaf in _flat_state(_abstract_model(cfg)).items():
    name, transpose = _path_to_hf(path)
    out[name] = tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)
  return out


# ----------------------------------------------------------------------------------- reading


def _read_file(path: str) -> dict:
  """{name: array} of one weights file; a Lightning checkpoint's `state_dict`."""
  try:
    if path.endswith('.safetensors'):
      return dict(torch_ckpt.read_safetensors(path)[0])
    obj = torch_ckpt.load(path)
  except CheckpointError:
    raise
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} cannot be read: {e}') from None
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a {{name: tensor}} state dict')
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch_ckpt.Stub):
      raise CheckpointError(f'{path}: {k!r} is a pickled {v.module}.{v.name} object where tensors '
                            'belong: refusing the file (nothing in it was run)')
    if isinstance(v, np.ndarray):
      out[str(k)] = v
  return out


def _read_sharded(directory: str, index: str) -> dict:
  with open(os.path.join(directory, index)) as f:
    weight_map = json.load(f)['weight_map']
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(_read_file(os.path.join(directory, shard)))
  return tensors


def read_checkpoint(path: str) -> tuple[dict, dict, str]:
  """(config.json dict, {name: array}, label) of a HF directory or a weights file beside a
  config.json."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    directory = path
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
      raise CheckpointError(f'{path} holds none of {", ".join(WEIGHT_FILES)}: pass a HF ESM / DPLM '
                            'model directory')
    name = present[0]
    full = os.path.join(path, name)
    tensors = _read_sharded(path, name) if name.endswith('.index.json') else _read_file(full)
  elif os.path.isfile(path):
    directory = os.path.dirname(path) or '.'
    tensors = _read_file(path)
  else:
    raise CheckpointError(f'{path} does not exist: pass a HF ESM / DPLM directory, a weights file '
                          'or hf:ORG/NAME')
  cfg_path = os.path.join(directory, 'config.json')
  if not os.path.exists(cfg_path):
    raise CheckpointError(f'{cfg_path} is missing: an ESM checkpoint needs its HF config.json '
                          'beside the weights')
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  vocab = os.path.join(directory, 'vocab.txt')
  if os.path.exists(vocab) and int(hf_cfg.get('vocab_size', 0)) == len(ESM_TOKENS):
    with open(vocab, encoding='utf-8') as f:
      tokens = tuple(line.strip() for line in f.read().splitlines())
    if tokens != ESM_TOKENS:
      k = next(i for i, (a, b) in enumerate(zip(tokens + ('',) * 33, ESM_TOKENS)) if a != b)
      raise CheckpointError(f'{vocab} differs from the ESM-2 alphabet at id {k} '
                            f'({tokens[k] if k < len(tokens) else None!r}): the esm tokenizer '
                            'would give wrong ids; use the matching vocabulary')
  return hf_cfg, tensors, path


def _strip_prefix(tensors: Mapping[str, np.ndarray], label: str) -> dict:
  hits = [k for k in tensors if k.endswith('embeddings.word_embeddings.weight')]
  if len(hits) != 1:
    raise CheckpointError(f'{label}: found {len(hits)} word-embedding tensors (*embeddings.'
                          'word_embeddings.weight), expected one: not an ESM checkpoint')
  prefix = hits[0][:-len('embeddings.word_embeddings.weight')]
  if not prefix.endswith('esm.'):
    raise CheckpointError(f'{label} holds a bare EsmModel ({hits[0]!r}) without the LM head: a '
                          'denoiser needs EsmForMaskedLM / DPLM weights (lm_head.*)')
  base = prefix[:-len('esm.')]
  out = {}
  for k, v in tensors.items():
    if not k.startswith(base):
      raise CheckpointError(f'{label}: unexpected tensor {k!r} outside the model prefix {base!r}')
    k = k[len(base):]
    k = re.sub(r'\.LayerNorm\.gamma$', '.LayerNorm.weight', k)
    k = re.sub(r'\.LayerNorm\.beta$', '.LayerNorm.bias', k)
    out[k] = v
  return out


def stored_inv_freq(tensors: Mapping[str, np.ndarray], cfg: esm_lib.EsmConfig,
                    label: str = 'checkpoint') -> Optional[tuple]:
  """The checkpoint's rotary inv_freq as a tuple if it differs from the rope_theta default (the
  value for `EsmConfig.rope_inv_freq`), else None; all stored copies must agree."""
  tensors = _strip_prefix(tensors, label)
  inv = [(k, v) for k, v in tensors.items() if _INV_FREQ_LAYER.match(k) or k == _INV_FREQ_SHARED]
  for k, v in inv[1:]:
    if v.shape != inv[0][1].shape or not np.array_equal(v, inv[0][1]):
      raise CheckpointError(f'{label}: {k} differs from {inv[0][0]}: the rotary inv_freq copies '
                            'must agree')
  if not inv:
    return None
  arr = np.asarray(inv[0][1]).astype(np.float32).reshape(-1)
  if arr.shape != (cfg.head_dim // 2,):
    raise CheckpointError(f'{label}: {inv[0][0]} has shape {list(arr.shape)}, the config needs '
                          f'[{cfg.head_dim // 2}]: config.json and the weights disagree')
  if np.array_equal(arr, esm_lib.default_inv_freq(cfg.head_dim, cfg.rope_theta)):
    return None
  return tuple(float(v) for v in arr)


def hf_to_state(tensors: Mapping[str, np.ndarray], cfg: esm_lib.EsmConfig,
                label: str = 'checkpoint') -> dict:
  """Pure nested dict (our layout, float32 host arrays) of HF-named tensors; strict. The
  rotary inv_freq is not a parameter: read it with `stored_inv_freq`."""
  tensors = _strip_prefix(tensors, label)
  want = expected_shapes(cfg)
  used = {k for k in tensors if _INV_FREQ_LAYER.match(k) or k == _INV_FREQ_SHARED}
  flat = {}
  missing = []
  for name, shape in want.items():
    if name in tensors:
      arr = np.asarray(tensors[name])
      used.add(name)
    else:
      missing.append(name)
      continue
    if tuple(arr.shape) != shape:
      raise CheckpointError(f'{label}: {name} has shape {list(arr.shape)}, the config needs '
                            f'{list(shape)}: config.json and the weights disagree')
    flat[name] = arr
  if missing:
    raise CheckpointError(f'{label} is missing {len(missing)} tensors, first {missing[0]!r}: not a '
                          'complete ESM-2 / DPLM masked-LM checkpoint for this config.json')
  dec = tensors.get('lm_head.decoder.weight')
  if dec is not None:
    if dec.shape != flat[_WORD].shape or not np.array_equal(dec, flat[_WORD]):
      raise CheckpointError(f'{label}: lm_head.decoder.weight differs from {_WORD}: untied '
                            'decoders are not supported (ESM-2 and DPLM tie them)')
  unexpected = [k for k in tensors if k not in used and not _IGNORED.match(k)]
  if unexpected:
    raise CheckpointError(f'{label} has {len(unexpected)} unexpected tensors, first '
                          f'{unexpected[0]!r}: not an ESM-2 / DPLM masked LM of this config')
  out: dict = {}
  abstract = _flat_state(_abstract_model(cfg))
  for path in abstract:
    name, transpose = _path_to_hf(path)
    arr = flat[name].astype(np.float32)
    arr = np.ascontiguousarray(arr.T) if transpose else arr
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  return out


def state_to_hf(model, *, layered_inv_freq: bool = True
                ) -> 'collections.OrderedDict[str, np.ndarray]':
  """HF-named float32 tensors (torch layout) of a model, in a stable order, plus the rotary
  inv_freq buffer per layer (transformers 4 / DPLM layout) or shared (`layered_inv_freq=False`)."""
  cfg = model.cfg
  out = collections.OrderedDict()
  for path, leaf in sorted(_flat_state(model).items(), key=lambda kv: [str(p) for p in kv[0]]):
    name, transpose = _path_to_hf(path)
    arr = np.asarray(jax.device_get(leaf), np.float32)
    out[name] = np.ascontiguousarray(arr.T) if transpose else arr
  inv = cfg.inv_freq()
  if layered_inv_freq:
    for i in range(cfg.num_hidden_layers):
      out[f'esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq'] = inv.copy()
  else:
    out[_INV_FREQ_SHARED] = inv
  return out


# ----------------------------------------------------------------------------------- loading


def resolve(source: str) -> str:
  source = os.fspath(source)
  if source.startswith('hf:'):
    repo, _, rev = source[3:].partition('@')
    return hf.snapshot(repo, ['*.json', '*.safetensors', 'vocab.txt'],
                       ['*.json', '*.bin', 'vocab.txt'], revision=rev or None)
  return source


def load_esm(source: str, *, compute_dtype: str = 'float32', **overrides
             ) -> esm_lib.EsmForMaskedLM:
  """A ready EsmForMaskedLM from a HF / DPLM directory, weights file, or `hf:ORG/NAME[@rev]`.
  `overrides` replace EsmConfig fields (e.g. pad_attention_mask=False, hidden_dropout_prob=0)."""
  hf_cfg, tensors, label = read_checkpoint(resolve(source))
  cfg = config_from_hf(hf_cfg, compute_dtype=compute_dtype, **overrides)
  if 'rope_inv_freq' not in overrides:
    cfg = cfg.replace(rope_inv_freq=stored_inv_freq(tensors, cfg, label))
  pure = hf_to_state(tensors, cfg, label)
  model = esm_lib.EsmForMaskedLM(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)
  return model


def export_hf(model: esm_lib.EsmForMaskedLM, directory: str, *, fmt: str = 'safetensors') -> str:
  """Writes config.json + model.safetensors (fmt='safetensors') or pytorch_model.bin ('bin')
  (+ vocab.txt / tokenizer_config.json for the 33-token ESM vocabulary); returns the directory."""
  if fmt not in ('safetensors', 'bin'):
    raise CheckpointError(f"fmt={fmt!r} is not valid: use 'safetensors' or 'bin'")
  os.makedirs(directory, exist_ok=True)
  tensors = state_to_hf(model)
  if fmt == 'safetensors':
    torch_ckpt.write_safetensors(tensors, os.path.join(directory, 'model.safetensors'),
                                 metadata={'format': 'pt'})
  else:
    torch_ckpt.save(dict(tensors), os.path.join(directory, 'pytorch_model.bin'))
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config_to_hf(model.cfg), f, indent=2, sort_keys=True)
  if model.cfg.vocab_size == len(ESM_TOKENS):
    with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(ESM_TOKENS) + '\n')
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump({'tokenizer_class': 'EsmTokenizer', 'model_max_length': 1024}, f, indent=2)
  return directory
