"""PyTorch cross-checks of our torch-free checkpoint reader/writer (torch_ckpt, exporter, convert,
importer), with the real torch and safetensors.torch.

* our `.ckpt` exports load with `torch.load(weights_only=True / False, mmap=...)` and into a torch
  module tree with the official names (`load_state_dict(strict=True)`, DUO's EMA `copy_to` over
  `parameters()`), with identical tensors (names, order, shapes, dtypes, bits);
* our safetensors exports load with `safetensors.torch.load_file` identically;
* torch-written files (`torch.save` of Lightning-style dicts with views, shared storages,
  Parameters, stray objects; `safetensors.torch.save_file`; `pytorch_model.bin`) load in ours with
  identical tensors, and the loaded denoiser/discriminator match the NumPy reference forward;
* a torch-pickled payload (`__reduce__` -> os.system) is refused with a one-line error and never
  runs.

Tiny models (tests/test_importer.py sizes); files live in tmp_path.
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from didi_jax import api
from didi_jax.checkpoint import convert
from didi_jax.checkpoint import exporter
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import names
from didi_jax.checkpoint import torch_ckpt
from tests import test_importer as ck   # official(), tiny_cfg(), the NumPy reference

TORCH_DTYPE = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
    np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16, np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
    np.dtype(np.uint32): torch.uint32, np.dtype(np.uint64): torch.uint64,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.complex64): torch.complex64,
    np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2,
}
_BITS_VIEW = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
              torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
              torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach().contiguous()
  if t.dtype in _BITS_VIEW:
    as_int, np_dtype = _BITS_VIEW[t.dtype]
    return t.view(as_int).numpy().view(np_dtype)
  return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
  a = np.array(a, copy=True, order='C')
  dtype = TORCH_DTYPE[a.dtype]
  if dtype in _BITS_VIEW:
    as_int, _ = _BITS_VIEW[dtype]
    return torch.from_numpy(a.view(np.int16 if as_int == torch.int16 else np.uint8)).view(dtype)
  return torch.from_numpy(a)


def assert_same(theirs, ours: np.ndarray, name: str = ''):
  """A torch tensor and a numpy array hold the same dtype, shape and bits."""
  ours = np.asarray(ours)
  assert isinstance(theirs, torch.Tensor), (name, type(theirs))
  assert theirs.dtype == TORCH_DTYPE[ours.dtype], (name, theirs.dtype, ours.dtype)
  assert tuple(theirs.shape) == ours.shape, (name, tuple(theirs.shape), ours.shape)
  assert to_numpy(theirs).tobytes() == np.ascontiguousarray(ours).tobytes(), name


def assert_same_arrays(got: np.ndarray, want: np.ndarray, name: str = ''):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
  assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), name


def torch_module(tensors) -> torch.nn.Module:
  """A zero-filled torch module tree with exactly these dotted names (the official layout:
  rotary inv_freq and spectral-norm u, v are buffers, everything else a Parameter), registered in
  the given order, as the official modules register them."""
  root = torch.nn.Module()
  for name, arr in tensors.items():
    *path, leaf = name.split('.')
    mod = root
    for p in path:
      if p not in mod._modules:
        mod.add_module(p, torch.nn.Module())
      mod = mod._modules[p]
    zero = torch.zeros(np.shape(arr), dtype=TORCH_DTYPE[np.asarray(arr).dtype])
    if leaf in ('inv_freq', 'weight_u', 'weight_v'):
      mod.register_buffer(leaf, zero)
    else:
      mod.register_parameter(leaf, torch.nn.Parameter(zero))
  return root


def official_set(cfg=None):
  """(student, student EMA, discriminator) official tensors and our trees made from them."""
  cfg = cfg or ck.tiny_cfg()
  student, ema, disc = ck.official(2), ck.official(3), ck.official(4, 'discriminator')
  ours = dict(
      student=importer.convert_official(student, cfg, names.DIT)[0],
      student_ema=importer.convert_official(ema, cfg, names.DIT)[0])
  ours['discriminator'], ours['discriminator_spectral'] = importer.convert_official(
      disc, cfg, names.DISCRIMINATOR)
  return student, ema, disc, ours


def assert_tree_is(tree, official_tensors, spectral=None):
  """Our pure dict(s) hold exactly the official tensors (kernels transposed), float32."""
  got = importer.flatten_tree(tree)
  if spectral is not None:
    got.update(importer.flatten_tree(spectral))
  want = {}
  for name, arr in official_tensors.items():
    if name == names.INV_FREQ:
      continue
    m = names.official_to_path(name)
    want[m.path] = np.asarray(arr, np.float32).T if m.transpose else np.asarray(arr, np.float32)
  assert set(got) == set(want)
  for path, arr in want.items():
    assert_same_arrays(got[path], arr, str(path))


# ------------------------------------------------------------------------------------------------
# torch_ckpt <-> torch, all dtypes and layouts


def test_dtypes_views_and_sharing_round_trip_with_torch(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.standard_normal((3, 4)).astype(np.float32)
  arrays = collections.OrderedDict(
      (np.dtype(d).name, np.abs(base * 10).astype(d)) for d in TORCH_DTYPE)
  arrays['scalar'] = np.array(7, np.int64)
  arrays['empty'] = np.zeros((0, 3), np.float32)
  # ours -> torch
  shared = np.arange(5, dtype=np.float32)
  torch_ckpt.save({'state_dict': arrays, 'shared': [shared, shared], 'epoch': 3, 'name': 'x',
                   'none': None, 'tuple': (1, 2.5)}, str(tmp_path / 'ours.ckpt'))
  for kwargs in (dict(weights_only=True), dict(weights_only=False), dict(weights_only=True,
                                                                          mmap=True)):
    back = torch.load(tmp_path / 'ours.ckpt', map_location='cpu', **kwargs)
    assert list(back['state_dict']) == list(arrays)
    for k, v in arrays.items():
      assert_same(back['state_dict'][k], v, k)
    assert back['shared'][0] is back['shared'][1]          # one object, as torch.save shares it
    assert (back['epoch'], back['name'], back['none'], back['tuple']) == (3, 'x', None, (1, 2.5))
  # torch -> ours: views with strides and storage offsets, shared storages, Parameters, Size
  flat = torch.arange(24, dtype=torch.float32)
  sd = collections.OrderedDict((k, to_torch(v)) for k, v in arrays.items())
  sd['transposed'] = torch.randn(4, 3).t()
  sd['offset_view'] = flat[5:11].view(2, 3)
  sd['strided'] = flat.view(4, 6)[:, ::2]
  sd['param'] = torch.nn.Parameter(torch.randn(2, 2).to(torch.bfloat16))
  sd['expanded'] = torch.randn(3, 1).expand(3, 4)          # stride 0
  obj = {'state_dict': sd, 'views': [flat[:4], flat[4:8]], 'size': torch.Size([2, 3])}
  torch.save(obj, tmp_path / 'torch.ckpt')
  got = torch_ckpt.load(str(tmp_path / 'torch.ckpt'))
  assert list(got['state_dict']) == list(sd)
  for k, v in sd.items():
    assert_same(v, got['state_dict'][k], k)
  assert_same(flat[4:8], got['views'][1])
  assert got['size'] == (2, 3)
  # The official loader of a plain state dict (no Lightning) also reads our file.
  torch_ckpt.save(collections.OrderedDict(w=base), str(tmp_path / 'plain.bin'))
  assert torch.equal(torch.load(tmp_path / 'plain.bin', weights_only=True)['w'],
                     torch.from_numpy(base))


# ------------------------------------------------------------------------------------------------
# our exports -> torch


@pytest.mark.parametrize('weights_only,mmap', [(True, False), (False, False), (True, True)])
def test_didi_ckpt_export_loads_in_torch_like_lightning(tmp_path, weights_only, mmap):
  student, ema, disc, ours = official_set()
  path = tmp_path / 'didi.ckpt'
  exporter.export_didi_ckpt(str(path), model_cfg=ck.tiny_cfg(), **ours)
  want = collections.OrderedDict()
  for prefix, t in (('backbone.', student), ('discriminator.', disc), ('student_ema.', ema)):
    want.update(ck.prefixed(t, prefix))
  ckpt = torch.load(path, map_location='cpu', weights_only=weights_only, mmap=mmap)
  assert ckpt['pytorch-lightning_version'] == exporter.LIGHTNING_VERSION
  assert (ckpt['epoch'], ckpt['global_step']) == (0, 0)
  assert list(ckpt['state_dict']) == list(want)
  for k, v in want.items():
    assert_same(ckpt['state_dict'][k], v, k)
  # Lightning: LightningModule.load_state_dict(checkpoint['state_dict'], strict=True).
  module = torch.nn.Module()
  for attr, t in (('backbone', student), ('discriminator', disc), ('student_ema', ema)):
    module.add_module(attr, torch_module(t))
  module.load_state_dict(ckpt['state_dict'], strict=True)
  for k, v in module.state_dict().items():
    assert_same(v, want[k], k)


@pytest.mark.parametrize('weights_only', [True, False])
def test_teacher_ckpt_export_loads_in_torch_like_duo(tmp_path, weights_only):
  _, _, _, ours = official_set()
  raw, ema = ck.official(5), ck.official(6)
  cfg = ck.tiny_cfg()
  exporter.export_teacher_ckpt(str(tmp_path / 't.ckpt'),
                               importer.convert_official(raw, cfg)[0],
                               ema_params=importer.convert_official(ema, cfg)[0], model_cfg=cfg,
                               ema_decay=0.999, num_updates=12)
  ckpt = torch.load(tmp_path / 't.ckpt', map_location='cpu', weights_only=weights_only)
  assert list(ckpt['state_dict']) == ['backbone.' + k for k in raw]
  for k, v in raw.items():
    assert_same(ckpt['state_dict']['backbone.' + k], v, k)
  e = ckpt['ema']
  assert (e['decay'], e['num_updates'], e['collected_params']) == (0.999, 12, None)
  # DUO: model.load_state_dict(state_dict); ema.load_state_dict(ckpt['ema']);
  # ema.copy_to(model.parameters()) - the shadow list follows parameters() registration order.
  model = torch.nn.Module()
  model.add_module('backbone', torch_module(raw))
  model.load_state_dict(ckpt['state_dict'], strict=True)
  params = list(model.parameters())
  assert len(params) == len(e['shadow_params'])
  with torch.no_grad():
    for p, s in zip(params, e['shadow_params'], strict=True):
      assert p.shape == s.shape and p.dtype == s.dtype
      p.copy_(s)
  for k, v in model.backbone.state_dict().items():
    assert_same(v, ema[k], k)                   # EMA weights, and the rotary buffer unchanged


def test_convert_cli_outputs_load_in_torch(tmp_path):
  t = ck.official(7)
  src = str(tmp_path / 'model.safetensors')
  torch_ckpt.write_safetensors(t, src)
  assert convert.main([src, str(tmp_path / 'teacher.ckpt')]) == 0
  ckpt = torch.load(tmp_path / 'teacher.ckpt', weights_only=True)
  for k, v in t.items():
    assert_same(ckpt['state_dict']['backbone.' + k], v, k)
  order = [k for k in t if k != names.INV_FREQ]                  # registration order, by hand
  for k, s in zip(order, ckpt['ema']['shadow_params'], strict=True):
    assert_same(s, t[k], k)
  assert convert.main([str(tmp_path / 'teacher.ckpt'), str(tmp_path / 'hf')]) == 0
  back = safetensors.torch.load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  assert set(back) == set(t)
  for k, v in t.items():
    assert_same(back[k], v, k)


def test_safetensors_exports_load_in_safetensors_torch(tmp_path):
  student, ema, disc, ours = official_set()
  cfg = ck.tiny_cfg()

  def load(path):
    with safetensors.safe_open(str(path), 'pt') as f:
      meta = f.metadata()
    return safetensors.torch.load_file(str(path)), meta

  for prefix in ('', 'backbone.'):
    p = exporter.export_dit_safetensors(str(tmp_path / f'dit{prefix}.safetensors'),
                                        ours['student_ema'], model_cfg=cfg, prefix=prefix)
    got, meta = load(p)
    assert meta == {'format': 'pt'} and set(got) == {prefix + k for k in ema}
    for k, v in ema.items():
      assert_same(got[prefix + k], v, k)
  # bfloat16 export: bf16 bits of the float32 weights (the rotary buffer stays float32).
  p = exporter.export_dit_safetensors(str(tmp_path / 'bf16.safetensors'), ours['student_ema'],
                                      model_cfg=cfg, dtype=ml_dtypes.bfloat16)
  got, _ = load(p)
  for k, v in ema.items():
    assert_same(got[k], v if k == names.INV_FREQ else v.astype(ml_dtypes.bfloat16), k)
  # A discriminator model object (params + spectral u, v), and the HF directory layout.
  model = ck.loader_model(str(exporter.export_hf_didi(
      str(tmp_path / 'hf'), student_ema=ours['student_ema'], discriminator=ours['discriminator'],
      discriminator_spectral=ours['discriminator_spectral'], model_cfg=cfg)), cfg, 'discriminator')
  for path, want in ((tmp_path / 'hf' / 'model.safetensors', ema),
                     (tmp_path / 'hf' / 'discriminator.safetensors', disc),
                     (exporter.export_discriminator_safetensors(
                         str(tmp_path / 'd.safetensors'), model), disc)):
    got, meta = load(path)
    assert meta == {'format': 'pt'} and set(got) == set(want)
    for k, v in want.items():
      assert_same(got[k], v, k)
  # Our own flat format: <group>/<tree path> keys, our layout, the model config in the metadata.
  exporter.save_ours(str(tmp_path / 'ours.safetensors'), ours, model_cfg=cfg)
  got, meta = load(tmp_path / 'ours.safetensors')
  assert meta['format'] == importer.OURS_FORMAT and '"hidden_size": 32' in meta['model_config']
  want = {f'{g}/' + '/'.join(map(str, p)): v for g, tree in ours.items()
          for p, v in importer.flatten_tree(tree).items()}
  assert set(got) == set(want)
  for k, v in want.items():
    assert_same(got[k], v, k)


# ------------------------------------------------------------------------------------------------
# torch-written files -> ours


def _torch_state(tensors, prefix='', *, views=True):
  """Official tensors as torch would hold them: Parameters, Linear weights as transposed views."""
  out = collections.OrderedDict()
  for i, (k, v) in enumerate(tensors.items()):
    t = to_torch(v)
    if views and t.ndim == 2 and i % 2:
      t = to_torch(np.ascontiguousarray(v.T)).t()            # non-contiguous, stride (1, out)
    if views and i % 3 == 0 and k != names.INV_FREQ:
      t = torch.nn.Parameter(t, requires_grad=True)
    out[prefix + k] = t
  return out


def test_torch_saved_duo_lightning_checkpoint_loads_in_ours(tmp_path):
  raw, ema = ck.official(5), ck.official(6)
  order = [k for k in ema if k != names.INV_FREQ]
  # DUO's EMA list, here as views into one flat storage (offsets into a shared buffer).
  flat = torch.cat([to_torch(ema[k]).reshape(-1) for k in order])
  shadow = [chunk.view(ema[k].shape) for k, chunk in
            zip(order, torch.split(flat, [ema[k].size for k in order]), strict=True)]
  ckpt = {'epoch': 3, 'global_step': 1000, 'pytorch-lightning_version': '2.1.3',
          'state_dict': _torch_state(raw, 'backbone.'),
          'ema': {'decay': 0.9999, 'num_updates': 1000, 'shadow_params': shadow,
                  'collected_params': None},
          'hyper_parameters': {'config': argparse.Namespace(lr=3e-4, model='small')},
          'optimizer_states': [{'state': {0: {'exp_avg': torch.zeros(4)}}, 'param_groups': []}],
          'lr_schedulers': [], 'callbacks': {}, 'loops': {}}
  path = str(tmp_path / 'mdlm.ckpt')
  torch.save(ckpt, path)
  cfg = ck.tiny_cfg()
  assert_tree_is(importer.import_teacher(path, cfg, weights='ema'), ema)
  assert_tree_is(importer.import_teacher(path, cfg, weights='raw'), raw)
  denoise = api.load_denoiser(path)                                 # sizes inferred
  ids, _ = ck.inputs(2)
  sigma = np.array([0.1, 3.0], np.float32)
  assert ck.rel_err(denoise(ids, sigma), ck.ref.dit_forward(ema, ids, sigma, ck.HEADS)) < 1e-5


def test_torch_saved_didi_checkpoint_loads_in_ours(tmp_path):
  student, ema, disc = ck.official(2), ck.official(3), ck.official(4, 'discriminator')
  sd = collections.OrderedDict()
  sd.update(_torch_state(student, 'backbone.'))
  sd.update(_torch_state(ck.official(9), 'teacher.'))              # ignored by the importer
  sd.update(_torch_state(disc, 'discriminator.'))
  sd.update(_torch_state(ema, 'student_ema.'))
  sd['reward_baseline'] = torch.tensor(0.25)
  path = str(tmp_path / 'didi-instruct.ckpt')
  torch.save({'state_dict': sd, 'ema': {'shadow_params': [torch.ones(3)]}}, path)
  out = importer.import_didi(path)
  assert_tree_is(out['student'], student)
  assert_tree_is(out['student_ema'], ema)
  assert_tree_is(out['discriminator'], disc, out['discriminator_spectral'])
  ids, _ = ck.inputs(3)
  sigma = np.array([0.0, 1.5], np.float32)
  judge = api.load_discriminator(path)
  assert ck.rel_err(judge(ids, sigma), ck.ref.discriminator_forward(disc, ids, sigma,
                                                                    ck.HEADS)) < 1e-5


def test_hf_files_written_by_torch_load_in_ours(tmp_path):
  t, disc = ck.official(1), ck.official(4, 'discriminator')
  ids, _ = ck.inputs(4)
  sigma = np.array([0.2, 2.0], np.float32)
  # kuleshov-group/mdlm-owt: backbone.* safetensors (+ config.json), and the same as a .bin.
  owt = tmp_path / 'mdlm-owt'
  owt.mkdir()
  safetensors.torch.save_file(_torch_state(t, 'backbone.', views=False),
                              str(owt / 'model.safetensors'), metadata={'format': 'pt'})
  (owt / 'config.json').write_text('{"model_type": "mdlm"}')
  binary = tmp_path / 'bin'
  binary.mkdir()
  torch.save(_torch_state(t, 'backbone.'), binary / 'pytorch_model.bin')
  for d in (owt, binary):
    assert_tree_is(importer.import_teacher(str(d), ck.tiny_cfg()), t)
    denoise = api.load_denoiser(str(d))
    assert ck.rel_err(denoise(ids, sigma), ck.ref.dit_forward(t, ids, sigma, ck.HEADS)) < 1e-5
  # haoyangzheng/didi-instruct-small: un-prefixed model.safetensors + discriminator.safetensors.
  hf = tmp_path / 'didi-hf'
  hf.mkdir()
  safetensors.torch.save_file(_torch_state(t, views=False), str(hf / 'model.safetensors'))
  safetensors.torch.save_file(_torch_state(disc, views=False),
                              str(hf / 'discriminator.safetensors'))
  out = importer.import_didi(str(hf), ck.tiny_cfg())
  assert_tree_is(out['student_ema'], t)
  assert_tree_is(out['discriminator'], disc, out['discriminator_spectral'])
  # bfloat16 tensors (a bf16 release): imported as the exact float32 values of the bf16 weights.
  bf = collections.OrderedDict((k, to_torch(v).to(torch.bfloat16)) for k, v in t.items())
  safetensors.torch.save_file(bf, str(tmp_path / 'bf16.safetensors'))
  assert_tree_is(importer.import_teacher(str(tmp_path / 'bf16.safetensors'), ck.tiny_cfg()),
                 {k: to_numpy(v.float()) for k, v in bf.items()})


# ------------------------------------------------------------------------------------------------
# a malicious pickle


class Payload:
  """Pickles as a call of os.system (what a malicious checkpoint would carry)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_torch_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'PWNED'
  t = ck.official(1)
  sd = _torch_state(t, 'backbone.', views=False)
  ema = [to_torch(v) for k, v in t.items() if k != names.INV_FREQ]
  evil = Payload(marker)
  bad_sd = collections.OrderedDict(sd)
  bad_sd['backbone.blocks.0.norm1.weight'] = evil
  files = {
      'whole.ckpt': evil,
      'in_state_dict.ckpt': {'state_dict': bad_sd},
      'in_ema.ckpt': {'state_dict': sd, 'ema': {'shadow_params': ema[:3] + [evil] + ema[4:]}},
      'flat.pt': collections.OrderedDict(list(sd.items()) + [('backbone.extra', evil)]),
  }
  for name, obj in files.items():
    torch.save(obj, tmp_path / name)
  (tmp_path / 'hfdir').mkdir()
  torch.save(bad_sd, tmp_path / 'hfdir' / 'pytorch_model.bin')
  # The reference refuses it too (torch's safe loader), so the file really carries the call.
  with pytest.raises(pickle.UnpicklingError, match='posix.system|os.system'):
    torch.load(tmp_path / 'whole.ckpt', weights_only=True)
  for name in list(files) + ['hfdir']:
    for load in (api.load_denoiser, importer.import_teacher, importer.open_source):
      with pytest.raises(importer.CheckpointError) as e:
        load(str(tmp_path / name))
      msg = str(e.value)
      assert '\n' not in msg and 'posix.system' in msg and 'refusing' in msg, msg
      assert not marker.exists()
  # torch_ckpt itself never runs it either: the call is an inert stub.
  assert isinstance(torch_ckpt.load(str(tmp_path / 'whole.ckpt')), torch_ckpt.Stub)
  # Objects outside the tensors (Lightning hyper-parameters) stay inert stubs: the file loads.
  torch.save({'state_dict': sd, 'hyper_parameters': {'x': evil}}, tmp_path / 'hp.ckpt')
  assert_tree_is(importer.import_teacher(str(tmp_path / 'hp.ckpt'), weights='raw'), t)
  assert not marker.exists()
  # Control: the unsafe reference loader does run the payload, so the check above is not vacuous.
  torch.load(tmp_path / 'whole.ckpt', weights_only=False)
  assert marker.exists()
