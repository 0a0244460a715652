"""Import official PyTorch / HF checkpoints into our parameter trees (docs/method.md §3.4).

Sources (`source` is a local file, a local directory, or `hf:ORG/NAME`):

* HF `kuleshov-group/mdlm-owt`: `model.safetensors` (or `pytorch_model.bin`), keys `backbone.*`.
* DUO `mdlm.ckpt` (Lightning): `state_dict['backbone.*']` (raw) and `ema.shadow_params` (a list in
  registration order, names.registration_order).
* official `didi-instruct.ckpt`: `backbone.*` student, `student_ema.*`, `discriminator.*` (incl. the
  spectral head).
* HF `haoyangzheng/didi-instruct-small`: `model.safetensors` (student EMA) +
  `discriminator.safetensors`, un-prefixed.
* our exports: official-name files from `exporter`, or our flat `.npz`/`.safetensors` (save_ours).

Every import is one-to-one: each source tensor is consumed or on an explicit ignore list
(`rotary_emb.inv_freq`, checked against the recomputed value; `teacher.*`, `reward_baseline` and the
top-level `ema` of a DiDi checkpoint), every tensor of the model is filled and shapes are checked.
All problems of one network are reported in ONE `CheckpointError` with the fix. Only model tensors
are read from Lightning files: optimizer states, loops and hyper-parameters are never touched.

Results are pure dicts of host numpy float32 arrays in our tree layout (`nnx.replace_by_pure_dict`
takes them); `didi_jax.checkpoint.loader` builds the networks from them.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Any, Mapping, Optional

import numpy as np

from didi_jax import config as config_lib
from didi_jax import errors
from didi_jax.checkpoint import hf
from didi_jax.checkpoint import names
from didi_jax.checkpoint import torch_ckpt

log = logging.getLogger(__name__)

OURS_FORMAT = 'didi_jax'
OURS_GROUPS = ('teacher', 'student', 'student_ema', 'discriminator', 'discriminator_spectral')
DIDI_PREFIXES = ('backbone', 'student_ema', 'discriminator')
DIDI_IGNORED_PREFIXES = ('teacher',)        # stripped on save by the official code anyway
DIDI_IGNORED_NAMES = ('reward_baseline',)   # a DiDiInstruct buffer, not part of any network
_MAX_LISTED = 12


# A checkpoint cannot be imported; the message lists every problem and says how to fix it.
CheckpointError = errors.CheckpointError


# ----------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass
class Source:
  """A checkpoint opened but not yet interpreted."""
  label: str                 # for messages: the path (and hf: name)
  kind: str                  # 'flat' | 'lightning' | 'hf_dir' | 'ours'
  tensors: dict = dataclasses.field(default_factory=dict)   # flat: name -> array
  files: dict = dataclasses.field(default_factory=dict)     # hf_dir: 'model'/'discriminator'
  ckpt: Any = None           # lightning: the unpickled object
  groups: dict = dataclasses.field(default_factory=dict)    # ours: group -> pure dict
  model_cfg: Any = None      # ours: the stored model config (if any)


def resolve(source: str) -> str:
  """A local path for `source` (downloads `hf:ORG/NAME` through huggingface_hub)."""
  source = os.fspath(source)
  if source.startswith('hf:'):
    return hf.snapshot(source[3:], ['*.safetensors', '*.json'], ['*.bin', '*.ckpt', '*.json'])
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint {source!r} does not exist: fix the path, or use hf:ORG/NAME')
  return path


def _read_tensor_file(path: str) -> tuple[dict, dict]:
  """(tensors, metadata) of a .safetensors / torch zip (.bin/.pt/.pth) file of plain tensors."""
  if path.endswith('.safetensors'):
    return torch_ckpt.read_safetensors(path)
  obj = torch_ckpt.load(path)
  refuse_pickled_objects(obj, path)
  if isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values()):
    return dict(obj), {}
  raise CheckpointError(f'{path} is not a flat {{name: tensor}} file')


def _read_sharded(path: str, index: str) -> dict:
  with open(os.path.join(path, index)) as f:
    weight_map = json.load(f)['weight_map']
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(_read_tensor_file(os.path.join(path, shard))[0])
  return tensors


def refuse_pickled_objects(obj: Any, label: str) -> None:
  """One-line CheckpointError if a pickled object (a torch_ckpt.Stub: an unknown global, never
  called) stands where tensors are read: the file itself, state_dict values, ema.shadow_params
  entries, or the values of a flat state dict. Stubs elsewhere (hyper_parameters) are fine."""
  places = [('the top-level object', obj)]
  if isinstance(obj, Mapping):
    sd = obj.get('state_dict', obj)
    if isinstance(sd, Mapping):
      places += [(f'state_dict[{k!r}]' if sd is not obj else repr(k), v) for k, v in sd.items()]
    ema = obj.get('ema')
    shadow = ema.get('shadow_params') if isinstance(ema, Mapping) else None
    if isinstance(shadow, (list, tuple)):
      places += [(f'ema.shadow_params[{i}]', v) for i, v in enumerate(shadow)]
  for where, value in places:
    if isinstance(value, torch_ckpt.Stub):
      raise CheckpointError(
          f'{label}: {where} is a pickled {value.module}.{value.name} object where tensors belong: '
          'refusing the file (nothing in it was run); load only checkpoints you trust, saved as '
          'plain tensors')


def open_source(source: str) -> Source:
  """Opens a file, directory or hf:ORG/NAME and says what kind of checkpoint it holds."""
  path = resolve(source)
  label = source if str(source) == path else f'{source} ({path})'
  if os.path.isdir(path):
    return _open_dir(path, label)
  if path.endswith('.npz') or path.endswith('.safetensors'):
    if path.endswith('.safetensors'):
      tensors, meta = torch_ckpt.read_safetensors(path)
      if meta.get('format') == OURS_FORMAT:
        return _ours_source(label, tensors, meta)
      return Source(label, 'flat', tensors=dict(tensors))
    return _ours_source(label, *_read_npz(path))
  try:
    obj = torch_ckpt.load(path)
  except torch_ckpt.TorchFormatError as e:
    raise CheckpointError(f'{label}: {e}') from None
  refuse_pickled_objects(obj, label)
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    return Source(label, 'lightning', ckpt=obj)
  if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return Source(label, 'flat', tensors=dict(obj))
  raise CheckpointError(f'{label} is a torch file but neither a Lightning checkpoint (no '
                        "'state_dict') nor a flat {name: tensor} state dict: convert it to one "
                        'of those')


def _open_dir(path: str, label: str) -> Source:
  files = {}
  for role_file, candidates in (('model', ('model.safetensors', 'pytorch_model.bin')),
                                ('discriminator', ('discriminator.safetensors',))):
    for c in candidates:
      if os.path.exists(os.path.join(path, c)):
        files[role_file] = _read_tensor_file(os.path.join(path, c))[0]
        break
  if 'model' not in files and os.path.exists(os.path.join(path, 'model.safetensors.index.json')):
    files['model'] = _read_sharded(path, 'model.safetensors.index.json')
  if files:
    return Source(label, 'hf_dir', files=files)
  for pattern in ('*.ckpt', '*.npz'):
    found = sorted(glob.glob(os.path.join(path, pattern)))
    if len(found) == 1:
      return open_source(found[0])
  raise CheckpointError(
      f'{label} is a directory without model.safetensors / pytorch_model.bin / discriminator.'
      f'safetensors or a single .ckpt / .npz (it holds {sorted(os.listdir(path))[:10]}): pass the '
      'checkpoint file itself')


def _parse_path(key: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in key.split('/'))


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    k = int(k) if isinstance(k, str) and k.isdigit() else k
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _read_npz(path: str) -> tuple[dict, dict]:
  with np.load(path, allow_pickle=False) as z:
    tensors = {k: z[k] for k in z.files}
  meta = {}
  for k in list(tensors):
    if k.startswith('__') and k.endswith('__'):
      meta[k.strip('_')] = str(tensors.pop(k))
  if meta.get('format') != OURS_FORMAT:
    raise CheckpointError(f'{path} is an .npz without the {OURS_FORMAT!r} format marker: write it '
                          'with didi_jax.checkpoint.exporter.save_ours')
  return tensors, meta


def _ours_source(label: str, tensors: Mapping, meta: Mapping) -> Source:
  by_group: dict = {}
  for key, value in tensors.items():
    group, _, rest = key.partition('/')
    if group not in OURS_GROUPS or not rest:
      raise CheckpointError(f'{label}: key {key!r} is not <group>/<path> with group in '
                            f'{list(OURS_GROUPS)}: write the file with exporter.save_ours')
    by_group.setdefault(group, {})[_parse_path(rest)] = value
  model_cfg = None
  if meta.get('model_config'):
    model_cfg = config_lib.model_config('small')
    model_cfg.update(json.loads(meta['model_config']))
  return Source(label, 'ours', groups={g: unflatten_tree(f) for g, f in by_group.items()},
                model_cfg=model_cfg)


# ----------------------------------------------------------------------------------------------
# Model configuration from tensors.


def as_model_config(model_cfg):
  """Accepts a model config or a full config (uses its `.model`)."""
  if model_cfg is not None and 'model' in model_cfg and 'hidden_size' not in model_cfg:
    return model_cfg.model
  return model_cfg


def infer_model_config(tensors: Mapping[str, Any], *, length: int = 1024):
  """A model config matching un-prefixed official tensors: sizes from shapes, heads from the
  rotary buffer (head dim = 2·len(inv_freq)) or hidden/64 without one."""
  if 'vocab_embed.embedding' not in tensors:
    raise CheckpointError('cannot infer the model size: the checkpoint has no '
                          'vocab_embed.embedding; pass a model config')
  vocab, d = (int(s) for s in tensors['vocab_embed.embedding'].shape)
  blocks = {int(k.split('.')[1]) for k in tensors if k.startswith('blocks.') and
            k.split('.')[1].isdigit()}
  n_blocks = max(blocks) + 1 if blocks else 0
  try:
    mlp = int(_first(tensors, 'blocks.0.mlp.0.bias', 'blocks.0.mlp.0.weight').shape[0]) \
        if n_blocks else 4 * d
    cond = int(_first(tensors, 'sigma_map.mlp.0.bias', 'sigma_map.mlp.0.weight').shape[0])
  except KeyError as e:
    raise CheckpointError(f'cannot infer the model size: the checkpoint has no {e}; pass a model '
                          'config') from None
  if names.INV_FREQ in tensors:
    head_dim = 2 * int(tensors[names.INV_FREQ].shape[0])
  elif d % 64 == 0:
    head_dim = 64
  else:
    raise CheckpointError(f'cannot infer n_heads: hidden size {d} is not a multiple of 64 and the '
                          'checkpoint has no rotary_emb.inv_freq; pass a model config')
  if head_dim == 0 or d % head_dim:
    raise CheckpointError(f'cannot infer n_heads: hidden size {d} is not a multiple of the rotary '
                          f'head dim {head_dim}; pass a model config')
  cfg = config_lib.model_config('small', vocab_size=vocab, length=length)
  cfg.update(dict(hidden_size=d, n_blocks=n_blocks, n_heads=d // head_dim, mlp_dim=mlp,
                  cond_dim=cond))
  dims = (d, n_blocks, d // head_dim, mlp, cond)
  cfg.size = next((k for k, v in config_lib.MODEL_SIZES.items() if v == dims), 'custom')
  return cfg


def _first(tensors: Mapping, *keys: str):
  for k in keys:
    if k in tensors:
      return tensors[k]
  raise KeyError(keys[-1])


def _describe(cfg) -> str:
  return (f'd={cfg.hidden_size}, {cfg.n_blocks} blocks, {cfg.n_heads} heads, mlp {cfg.mlp_dim}, '
          f'cond {cfg.cond_dim}, vocab {cfg.vocab_size}')


# ----------------------------------------------------------------------------------------------
# The one-to-one matcher.


def _listing(items: list[str]) -> str:
  shown = ', '.join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f', ... and {more} more' if more > 0 else '')


def _fixes(tensors: Mapping, cfg, role: str, label: str) -> list[str]:
  """Config flags that would make `cfg` match the tensors (only when they then fit exactly)."""
  try:
    got = infer_model_config(tensors)
  except CheckpointError:
    return []
  fixes = []
  if got.vocab_size != cfg.vocab_size:
    fixes.append(f'Checkpoint {label} has vocab {got.vocab_size} but the config says '
                 f'{cfg.vocab_size}: set --config.model.vocab_size={got.vocab_size}')
  flags = [f'--config.model.{k}={got[k]}' for k in
           ('hidden_size', 'n_blocks', 'n_heads', 'mlp_dim', 'cond_dim') if got[k] != cfg[k]]
  if names.INV_FREQ not in tensors:   # without the rotary buffer the head count is a guess
    flags = [f for f in flags if '.n_heads=' not in f]
  if flags and not _problems(tensors, got, role)[2]:
    size = f" (preset '{got.size}')" if got.size != 'custom' else ''
    fixes.append(f'the checkpoint is {_describe(got)}{size} but the config builds '
                 f'{_describe(cfg)}: set {" ".join(flags)}, or let the size be inferred '
                 '(model_cfg=None / --size omitted)')
  return fixes


def _check_mask_row(params: Mapping, cfg, label: str) -> None:
  """docs/method.md §3.4 sanity note: the [MASK] row of output_layer.linear never gets gradient."""
  m = cfg.vocab_size - 1
  w = params['output_layer']['linear']['kernel'][:, m]
  b = params['output_layer']['linear']['bias'][m]
  if np.any(w != 0) or b != 0:
    log.warning('%s: the [MASK] row %d of output_layer.linear is not zero (max |w| = %.3g, '
                'bias = %.3g); SUBS never trains it, so the vocabulary or the mask id may differ '
                'from this model', label, m, float(np.max(np.abs(w))), float(b))


def _problems(tensors: Mapping[str, Any], cfg, role: str, ignore: tuple = ()
              ) -> tuple[list, list, list]:
  """(missing, unexpected, mis-shaped) for `tensors` against the model `cfg` builds."""
  expected = names.official_shapes(cfg, role)
  missing, unexpected, misshaped = [], [], []
  for name in tensors:
    if name not in expected and name not in ignore:
      unexpected.append(name)
  for name, shape in expected.items():
    if name not in tensors:
      if name != names.INV_FREQ:   # the buffer is optional: we recompute it
        missing.append(name)
      continue
    arr = tensors[name]
    got = tuple(int(s) for s in np.shape(arr))
    if got != shape:
      note = ''
      if len(got) == 2 and got[::-1] == shape:
        note = (' - it looks transposed: Linear weights must be in PyTorch layout (out, in); '
                'transpose it (our kernels are (in, out))')
      elif name == names.INV_FREQ:
        note = (f' - the checkpoint has head dim {2 * got[0]} but the config has '
                f'{cfg.hidden_size // cfg.n_heads}')
      misshaped.append(f'{name} is {got} but the model needs {shape}{note}')
    elif np.asarray(arr).dtype.name not in _FLOAT_DTYPES:
      misshaped.append(f'{name} has dtype {np.asarray(arr).dtype}, not a float type')
  if names.INV_FREQ in tensors and not any(m.startswith(names.INV_FREQ) for m in misshaped):
    stored = np.asarray(tensors[names.INV_FREQ])
    # Rounded to the stored dtype: a bf16/fp16 checkpoint holds the buffer in that precision.
    want = names.inv_freq(cfg.hidden_size // cfg.n_heads).astype(stored.dtype).astype(np.float32)
    got_f = stored.astype(np.float32)
    if not np.allclose(got_f, want, rtol=1e-6, atol=0):
      misshaped.append(f'{names.INV_FREQ} differs from the recomputed 10000^(-2j/'
                       f'{cfg.hidden_size // cfg.n_heads}) (max diff '
                       f'{float(np.max(np.abs(got_f - want))):.3g}): another rotary base or '
                       'head layout, which this model does not support')
  return missing, unexpected, misshaped


_FLOAT_DTYPES = ('float16', 'float32', 'float64', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2')


def convert_official(tensors: Mapping[str, Any], model_cfg, role: str = names.DIT, *,
                     label: str = 'checkpoint', ignore: tuple = (),
                     check_mask_row: bool = True) -> tuple[dict, dict]:
  """Un-prefixed official tensors -> (params, spectral) pure dicts, checked one-to-one.

  `ignore`: extra source names to drop silently. `check_mask_row`: log a warning when the [MASK]
  row of a DiT's output layer is not zero (docs/method.md §3.4). Raises CheckpointError listing every missing,
  unexpected and mis-shaped tensor with the fix.
  """
  cfg = as_model_config(model_cfg)
  expected = names.official_shapes(cfg, role)
  missing, unexpected, misshaped = _problems(tensors, cfg, role, ignore)
  if missing or unexpected or misshaped:
    counts = ', '.join(f'{len(v)} {k}' for k, v in (
        ('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if v)
    fixes = _fixes(tensors, cfg, role, label)
    if not fixes:
      other = names.DISCRIMINATOR if role == names.DIT else names.DIT
      if all(n in tensors for n in names.official_shapes(cfg, other) if n != names.INV_FREQ):
        fixes.append(f'these are {other} tensors: import them with role {other!r}')
      heads = {n.split('.', 1)[0] for n in unexpected}
      stripped = {n.split('.', 1)[-1] for n in unexpected}
      if missing and len(heads) == 1 and set(missing) <= stripped:
        fixes.append(f'the tensors carry the prefix {next(iter(heads)) + "."!r}: strip it from '
                     'the names (or pick the network it names)')
    if not fixes:
      if any('looks transposed' in m for m in misshaped):
        fixes.append('transpose the weights marked "looks transposed" to PyTorch layout (out, in)')
      if unexpected:
        fixes.append('remove the unexpected tensors (or pass ignore=(...) for names known to be '
                     'safe)')
      if missing:
        fixes.append(f'supply the missing tensors: a complete official {role} state_dict is needed')
    fix = '; '.join(fixes) if fixes else (
        'pass a checkpoint of this architecture (official DiT names, PyTorch layout), or let the '
        'size be inferred (model_cfg=None)')
    lines = [f'{label} does not match the {role} model ({_describe(cfg)}): {counts}. Fix: {fix}']
    if missing:
      lines.append(f'  missing: {_listing(missing)}')
    if unexpected:
      lines.append(f'  unexpected: {_listing(unexpected)}')
    for m in misshaped[:_MAX_LISTED]:
      lines.append(f'  mis-shaped: {m}')
    if len(misshaped) > _MAX_LISTED:
      lines.append(f'  ... and {len(misshaped) - _MAX_LISTED} more mis-shaped')
    raise CheckpointError('\n'.join(lines))
  flat = {names.PARAMS: {}, names.SPECTRAL: {}}
  for name in expected:
    if name == names.INV_FREQ:
      continue
    mapped = names.official_to_path(name)
    arr = np.asarray(tensors[name])
    if mapped.transpose:
      arr = arr.T
    flat[mapped.collection][mapped.path] = np.array(arr, dtype=np.float32, order='C')
  params, spectral = unflatten_tree(flat[names.PARAMS]), unflatten_tree(flat[names.SPECTRAL])
  if role == names.DIT and check_mask_row:
    _check_mask_row(params, cfg, label)
  return params, spectral


def ours_to_official(params: Mapping, spectral: Optional[Mapping] = None) -> dict:
  """Our (params, spectral) pure dicts -> {official name: array in PyTorch layout} (no buffers)."""
  out = {}
  for collection, tree in ((names.PARAMS, params), (names.SPECTRAL, spectral or {})):
    for path, value in flatten_tree(tree).items():
      name, transpose = names.path_to_official(path, collection)
      arr = np.asarray(value)
      out[name] = arr.T if transpose else arr
  return out


# ----------------------------------------------------------------------------------------------
# Networks inside a source.


def _strip(tensors: Mapping, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _split_state_dict(sd: Mapping, label: str, prefixes: tuple, ignored_prefixes: tuple = (),
                      ignored_names: tuple = ()) -> dict[str, dict]:
  groups: dict[str, dict] = {p: {} for p in prefixes}
  stray = []
  for key, value in sd.items():
    head = key.split('.', 1)[0]
    if head in groups and '.' in key:
      groups[head][key.split('.', 1)[1]] = value
    elif head in ignored_prefixes or key in ignored_names:
      continue
    else:
      stray.append(key)
  if stray:
    raise CheckpointError(
        f'{label} state_dict has {len(stray)} tensor(s) outside {[p + ".*" for p in prefixes]}: '
        f'{_listing(stray)}. Fix: remove them, or pass ignore=... for names you know are safe')
  return groups


def is_didi_state_dict(sd: Mapping) -> bool:
  return any(k.startswith(('student_ema.', 'discriminator.')) for k in sd)


def is_didi(src: Source) -> bool:
  """True for sources holding a DiDi-Instruct state (student EMA and discriminator)."""
  if src.kind == 'ours':
    return 'student_ema' in src.groups and 'discriminator' in src.groups
  if src.kind == 'lightning':
    return is_didi_state_dict(src.ckpt['state_dict'])
  if src.kind == 'hf_dir':
    return 'discriminator' in src.files and 'model' in src.files
  return is_didi_state_dict(src.tensors)


def is_discriminator(tensors: Mapping) -> bool:
  return any(k.startswith('output_layer.main.') for k in tensors)


def _flat_networks(tensors: Mapping) -> dict[str, dict]:
  """Networks in a flat file: 'backbone.'-prefixed (mdlm-owt), re-prefixed DiDi, or un-prefixed."""
  if tensors and all(k.startswith('backbone.') for k in tensors):
    return {'dit': _strip(tensors, 'backbone.')}
  if is_didi_state_dict(tensors):
    return {'didi': dict(tensors)}
  if is_discriminator(tensors):
    return {'discriminator': dict(tensors)}
  return {'dit': dict(tensors)}


def _cfg_for(model_cfg, tensors: Mapping, source: Source):
  cfg = as_model_config(model_cfg)
  if cfg is None:
    cfg = source.model_cfg if source.model_cfg is not None else infer_model_config(tensors)
  return cfg


def _ema_teacher(src: Source, sd_backbone: Mapping, cfg, ignore: tuple = ()) -> tuple[dict, dict]:
  ema = src.ckpt.get('ema')
  shadow = ema.get('shadow_params') if isinstance(ema, Mapping) else None
  if shadow is None:
    raise CheckpointError(f'{src.label} has no EMA weights (no ema.shadow_params): set '
                          '--config.teacher.weights=raw (weights="raw") to use its state_dict')
  order = names.registration_order(cfg.n_blocks, names.DIT)
  if len(shadow) != len(order):
    raise CheckpointError(
        f'{src.label}: ema.shadow_params has {len(shadow)} tensors but a DiT with {cfg.n_blocks} '
        f'blocks has {len(order)} parameters: fix the model size, or set '
        '--config.teacher.weights=raw to use the state_dict')
  # The raw state_dict is still checked one-to-one (it names and shapes what the list holds).
  convert_official(sd_backbone, cfg, names.DIT, label=f'{src.label} state_dict backbone.*',
                   ignore=ignore, check_mask_row=False)
  tensors = dict(zip(order, shadow, strict=True))
  if names.INV_FREQ in sd_backbone:
    tensors[names.INV_FREQ] = sd_backbone[names.INV_FREQ]
  return convert_official(tensors, cfg, names.DIT, label=f'{src.label} ema.shadow_params')


def import_dit(source, model_cfg=None, *, network: str = 'auto', weights: str = 'ema',
               ignore: tuple = ()) -> dict:
  """One DiT (teacher / student / student EMA) from any source -> Param pure dict.

  network: 'teacher' (teacher sources only), 'student', 'student_ema', or 'auto' (the student
  EMA of a DiDi source, else the teacher). weights: 'ema' | 'raw' for Lightning teacher files.
  model_cfg None: sizes inferred from the tensors.
  """
  if network not in ('auto', 'teacher', 'student', 'student_ema'):
    raise ValueError(f"network={network!r}: use 'auto', 'teacher', 'student' or 'student_ema'")
  if weights not in ('ema', 'raw'):
    raise ValueError(f"weights={weights!r}: use 'ema' or 'raw' (--config.teacher.weights)")
  src = source if isinstance(source, Source) else open_source(source)
  if src.kind == 'ours':
    want = ('student_ema', 'teacher', 'student') if network == 'auto' else (network,)
    group = next((g for g in want if g in src.groups), None)
    if group is None:
      raise CheckpointError(f'{src.label} holds {sorted(src.groups)}, not {" / ".join(want)}: '
                            'pick one of those (--role)')
    tensors = ours_to_official(src.groups[group])
    cfg = _cfg_for(model_cfg, tensors, src)
    return convert_official(tensors, cfg, names.DIT, label=f'{src.label} [{group}]',
                            ignore=ignore)[0]
  if src.kind == 'lightning':
    sd = src.ckpt['state_dict']
    if is_didi_state_dict(sd):
      if network == 'teacher':
        raise CheckpointError(f'{src.label} is a DiDi-Instruct checkpoint (student_ema.*, '
                              'discriminator.*; its teacher.* was stripped on save): use it as '
                              'the student (import_didi / --role didi), not as a teacher')
      groups = _split_state_dict(sd, src.label, DIDI_PREFIXES, DIDI_IGNORED_PREFIXES,
                                 DIDI_IGNORED_NAMES + tuple(ignore))
      key = 'backbone' if network == 'student' else 'student_ema'
      cfg = _cfg_for(model_cfg, groups[key], src)
      return convert_official(groups[key], cfg, names.DIT, label=f'{src.label} {key}.*',
                              ignore=ignore)[0]
    if network in ('student', 'student_ema'):
      raise CheckpointError(f'{src.label} is a teacher checkpoint (backbone.* only): import it '
                            'with network="teacher"')
    backbone = _split_state_dict(sd, src.label, ('backbone',), (), tuple(ignore))['backbone']
    cfg = _cfg_for(model_cfg, backbone, src)
    if weights == 'ema':
      return _ema_teacher(src, backbone, cfg, ignore)[0]
    return convert_official(backbone, cfg, names.DIT, label=f'{src.label} backbone.*',
                            ignore=ignore)[0]
  if src.kind == 'hf_dir':
    if 'model' not in src.files:
      raise CheckpointError(f'{src.label} has no model.safetensors / pytorch_model.bin')
    nets = _flat_networks(src.files['model'])
  else:
    nets = _flat_networks(src.tensors)
  if 'didi' in nets:
    sd = nets['didi']
    groups = _split_state_dict(sd, src.label, DIDI_PREFIXES, DIDI_IGNORED_PREFIXES,
                               DIDI_IGNORED_NAMES + tuple(ignore))
    key = 'backbone' if network == 'student' else 'student_ema'
    tensors = groups[key]
  elif 'discriminator' in nets:
    raise CheckpointError(f'{src.label} holds a discriminator (output_layer.main.*), not a DiT: '
                          'load it with import_discriminator / --role discriminator')
  else:
    tensors = nets['dit']
  cfg = _cfg_for(model_cfg, tensors, src)
  return convert_official(tensors, cfg, names.DIT, label=src.label, ignore=ignore)[0]


def import_teacher(source, model_cfg=None, weights: str = 'ema', *, ignore: tuple = ()) -> dict:
  """The teacher DiT -> Param pure dict (`weights`: 'ema' shadow list or 'raw' state_dict)."""
  return import_dit(source, model_cfg, network='teacher', weights=weights, ignore=ignore)


def import_discriminator(source, model_cfg=None, *, ignore: tuple = ()) -> tuple[dict, dict]:
  """The discriminator -> (Param pure dict, Spectral pure dict with u, v)."""
  src = source if isinstance(source, Source) else open_source(source)
  if src.kind == 'ours':
    if 'discriminator' not in src.groups:
      raise CheckpointError(f'{src.label} holds {sorted(src.groups)}, no discriminator')
    tensors = ours_to_official(src.groups['discriminator'], src.groups.get(
        'discriminator_spectral'))
  elif src.kind == 'lightning' or (src.kind == 'flat' and is_didi_state_dict(src.tensors)):
    sd = src.ckpt['state_dict'] if src.kind == 'lightning' else src.tensors
    if not is_didi_state_dict(sd):
      raise CheckpointError(f'{src.label} is a teacher checkpoint without a discriminator')
    tensors = _split_state_dict(sd, src.label, DIDI_PREFIXES, DIDI_IGNORED_PREFIXES,
                                DIDI_IGNORED_NAMES + tuple(ignore))['discriminator']
  elif src.kind == 'hf_dir':
    if 'discriminator' not in src.files:
      raise CheckpointError(f'{src.label} has no discriminator.safetensors')
    tensors = src.files['discriminator']
  else:
    tensors = src.tensors
  cfg = _cfg_for(model_cfg, tensors, src)
  return convert_official(tensors, cfg, names.DISCRIMINATOR, label=f'{src.label} discriminator',
                          ignore=ignore)


def import_didi(source, model_cfg=None, *, ignore: tuple = ()) -> dict:
  """A DiDi checkpoint -> dict(student, student_ema, discriminator, discriminator_spectral).

  The HF release has no raw student: `student` is then a copy of `student_ema` (logged).
  """
  src = source if isinstance(source, Source) else open_source(source)
  if src.kind == 'ours':
    missing = [g for g in ('student_ema', 'discriminator') if g not in src.groups]
    if missing:
      raise CheckpointError(f'{src.label} holds {sorted(src.groups)}, not a DiDi state (missing '
                            f'{missing}): export all of student_ema and discriminator')
    has_student = 'student' in src.groups
  elif src.kind == 'lightning':
    if not is_didi_state_dict(src.ckpt['state_dict']):
      raise CheckpointError(f'{src.label} is a teacher checkpoint (backbone.* only), not a DiDi '
                            'checkpoint: use import_teacher / --role teacher')
    has_student = any(k.startswith('backbone.') for k in src.ckpt['state_dict'])
  elif src.kind == 'hf_dir':
    if 'discriminator' not in src.files:
      raise CheckpointError(f'{src.label} has no discriminator.safetensors: a DiDi directory needs '
                            'model.safetensors (student EMA) and discriminator.safetensors')
    has_student = False
  elif is_didi_state_dict(src.tensors):
    has_student = any(k.startswith('backbone.') for k in src.tensors)
  else:
    raise CheckpointError(f'{src.label} is a single network, not a DiDi checkpoint: use '
                          'import_teacher or import_discriminator')
  student_ema = import_dit(src, model_cfg, network='student_ema', ignore=ignore)
  if has_student:
    student = import_dit(src, model_cfg, network='student', ignore=ignore)
  else:
    log.info('%s has no raw student; using the student EMA for both', src.label)
    student = flatten_tree(student_ema)
    student = unflatten_tree({k: v.copy() for k, v in student.items()})
  disc, spectral = import_discriminator(src, model_cfg, ignore=ignore)
  return dict(student=student, student_ema=student_ema, discriminator=disc,
              discriminator_spectral=spectral)


def source_model_config(source, role: str = names.DIT, *, length: int = 1024):
  """The model config a source implies (sizes inferred from its tensors)."""
  src = source if isinstance(source, Source) else open_source(source)
  if src.kind == 'ours' and src.model_cfg is not None:
    return src.model_cfg
  if src.kind == 'ours':
    group = next(g for g in src.groups if g != 'discriminator_spectral')
    tensors = ours_to_official(src.groups[group])
  elif src.kind == 'lightning':
    sd = src.ckpt['state_dict']
    prefix = ('discriminator.' if role == names.DISCRIMINATOR else 'student_ema.') \
        if is_didi_state_dict(sd) else 'backbone.'
    tensors = _strip(sd, prefix)
  elif src.kind == 'hf_dir':
    tensors = src.files.get('discriminator' if role == names.DISCRIMINATOR else 'model') or \
        next(iter(src.files.values()))
    tensors = _strip(tensors, 'backbone.') or tensors
  else:
    nets = _flat_networks(src.tensors)
    tensors = next(iter(nets.values()))
    if 'didi' in nets:
      tensors = _strip(tensors, 'discriminator.' if role == names.DISCRIMINATOR else 'student_ema.')
  return infer_model_config(tensors, length=length)


# ----------------------------------------------------------------------------------------------
# Models.


def merge_trees(a: Mapping, b: Mapping) -> dict:
  flat = flatten_tree(a)
  flat.update(flatten_tree(b))
  return unflatten_tree(flat)


def _tree_map(fn, tree: Mapping) -> dict:
  return {k: _tree_map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}
