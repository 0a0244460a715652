"""Checkpoint import/export: official names and layouts, parity with a NumPy reference, errors.

All models are tiny (d=32, 2 blocks, 2 heads, vocab 50, L=16); files live in tmp_path.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import didi_jax
from didi_jax import api
from didi_jax.checkpoint import convert
from didi_jax.checkpoint import exporter
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import names
from didi_jax.checkpoint import torch_ckpt
from didi_jax.config import model_config

sys.path.insert(0, os.path.dirname(__file__))
import reference_dit_numpy as ref  # noqa: E402

D, BLOCKS, HEADS, MLP, COND, VOCAB, L, B = 32, 2, 2, 64, 16, 50, 16, 2


def loader_model(source, model_cfg, role):
  """The ready nnx model of `role` through the one loader."""
  return loader.load(source, role, model_cfg).model()


def tiny_cfg():
  cfg = model_config('tiny', vocab_size=VOCAB, length=L)
  cfg.update(dict(hidden_size=D, n_blocks=BLOCKS, n_heads=HEADS, mlp_dim=MLP, cond_dim=COND,
                  compute_dtype='float32', dropout=0.0))
  return cfg


def official(seed: int, role: str = 'dit', *, zero_mask_row: bool = True):
  """Random tensors under the official names (PyTorch layout), written from docs/method.md §3.3 by hand.

  adaLN and output weights are non-zero so every path of the forward matters.
  """
  rng = np.random.default_rng(seed)

  def w(out, inp, scale=1.0):
    return (rng.standard_normal((out, inp)) * scale / np.sqrt(inp)).astype(np.float32)

  def vec(n, center=0.0, scale=0.1):
    return (center + scale * rng.standard_normal(n)).astype(np.float32)

  t = collections.OrderedDict()
  t['vocab_embed.embedding'] = rng.standard_normal((VOCAB, D)).astype(np.float32)
  t['sigma_map.mlp.0.weight'] = w(COND, 256, 2.0)
  t['sigma_map.mlp.0.bias'] = vec(COND)
  t['sigma_map.mlp.2.weight'] = w(COND, COND)
  t['sigma_map.mlp.2.bias'] = vec(COND)
  hd = D // HEADS
  t['rotary_emb.inv_freq'] = (1.0 / (10000 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
                              ).astype(np.float32)
  for i in range(BLOCKS):
    p = f'blocks.{i}.'
    t[p + 'norm1.weight'] = vec(D, 1.0)
    t[p + 'attn_qkv.weight'] = w(3 * D, D)
    t[p + 'attn_out.weight'] = w(D, D)
    t[p + 'norm2.weight'] = vec(D, 1.0)
    t[p + 'mlp.0.weight'] = w(MLP, D)
    t[p + 'mlp.0.bias'] = vec(MLP)
    t[p + 'mlp.2.weight'] = w(D, MLP)
    t[p + 'mlp.2.bias'] = vec(D)
    t[p + 'adaLN_modulation.weight'] = w(6 * D, COND, 0.5)
    t[p + 'adaLN_modulation.bias'] = vec(6 * D)
  if role == 'dit':
    t['output_layer.norm_final.weight'] = vec(D, 1.0)
    t['output_layer.linear.weight'] = w(VOCAB, D)
    t['output_layer.linear.bias'] = vec(VOCAB)
    if zero_mask_row:
      t['output_layer.linear.weight'][VOCAB - 1] = 0
      t['output_layer.linear.bias'][VOCAB - 1] = 0
    t['output_layer.adaLN_modulation.weight'] = w(2 * D, COND, 0.5)
    t['output_layer.adaLN_modulation.bias'] = vec(2 * D)
  else:
    for j, out in ((0, D), (2, 1)):
      p = f'output_layer.main.{j}.'
      t[p + 'bias'] = vec(out)
      t[p + 'weight_orig'] = w(out, D, 3.0)
      u, v = rng.standard_normal(out), rng.standard_normal(D)
      t[p + 'weight_u'] = (u / np.linalg.norm(u)).astype(np.float32)
      t[p + 'weight_v'] = (v / np.linalg.norm(v)).astype(np.float32)
  return t


def prefixed(t, prefix):
  return collections.OrderedDict((prefix + k, v) for k, v in t.items())


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (B, L)).astype(np.int32)
  ids[:, ::3] = VOCAB - 1                               # some [MASK] tokens
  logits = rng.standard_normal((B, L, VOCAB)) * 2       # a soft input is logits (official)
  return ids, logits.astype(np.float32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v)
  return out


def assert_trees_bit_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    assert np.array_equal(fa[k].view(np.uint8), fb[k].view(np.uint8)), k


# ------------------------------------------------------------------------------------------------
# names


def test_registration_order_and_mapping_match_the_model():
  from flax import nnx
  from didi_jax.models.dit import DiT
  from didi_jax.models.discriminator import Discriminator, Spectral

  small = model_config('small')
  order = names.registration_order(12)
  assert len(order) == 130 and len(set(order)) == 130
  assert order[:2] == ['vocab_embed.embedding', 'sigma_map.mlp.0.weight']
  assert order[5:15] == names.state_dict_order(12)[6:16]   # block 0 after the buffer
  assert order[-5:] == ['output_layer.norm_final.weight', 'output_layer.linear.weight',
                        'output_layer.linear.bias', 'output_layer.adaLN_modulation.weight',
                        'output_layer.adaLN_modulation.bias']
  shapes = names.official_shapes(small)
  n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k != names.INV_FREQ)
  assert n_params == 169_627_218                                        # docs/method.md §3.3
  dshapes = names.official_shapes(small, 'discriminator')
  assert sum(int(np.prod(s)) for k, s in dshapes.items() if k in
             names.registration_order(12, 'discriminator')) == 131_371_265
  # Every leaf of our models maps to exactly the official names, with transposed kernels.
  for cls, role in ((DiT, 'dit'), (Discriminator, 'discriminator')):
    model = nnx.eval_shape(lambda cls=cls: cls(small, rngs=nnx.Rngs(0)))
    got = {}
    for coll, filt in ((names.PARAMS, nnx.Param), (names.SPECTRAL, Spectral)):
      for path, leaf in flat_shapes(nnx.to_pure_dict(nnx.state(model, filt))).items():
        name, transpose = names.path_to_official(path, coll)
        assert names.official_to_path(name) == names.Mapped(path, coll, transpose)
        got[name] = leaf[::-1] if transpose else leaf
    want = {k: v for k, v in names.official_shapes(small, role).items() if k != names.INV_FREQ}
    assert got == want
  # Sizes are inferred from shapes alone (zero-stride arrays: nothing is allocated).
  fake = {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}
  inferred = importer.infer_model_config(fake)
  assert inferred.size == 'small' and inferred.n_heads == 12 and inferred.vocab_size == 50258
  del fake[names.INV_FREQ]
  assert importer.infer_model_config(fake).n_heads == 12          # hidden / 64 without the buffer
  assert names.official_to_path('blocks.3.mlp.0.weight') == names.Mapped(
      ('blocks', 3, 'mlp_0', 'kernel'), 'params', True)
  assert names.official_to_path('output_layer.main.2.weight_u').path == (
      'output_layer', 'main_2', 'u')
  assert names.official_to_path('blocks.3.norm1.weight').transpose is False


def flat_shapes(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(v.shape)
  return out


# ------------------------------------------------------------------------------------------------
# torch zip and safetensors I/O


def test_torch_zip_roundtrip_dtypes_sharing_and_strides(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  obj = {'epoch': 3, 'name': 'x', 'blob': b'\x00\xff', 'none': None, 'tuple': (1, 2.5),
         'state_dict': collections.OrderedDict(
             f32=a, bf16=a.astype(ml_dtypes.bfloat16), f16=a.astype(np.float16),
             i64=np.array(7, np.int64), b=np.array([True, False]), t=a.T),
         'shared': [a, a]}
  path = str(tmp_path / 'x.ckpt')
  torch_ckpt.save(obj, path)
  with zipfile.ZipFile(path) as zf:
    assert zf.namelist()[0] == 'archive/data.pkl' and 'archive/version' in zf.namelist()
  back = torch_ckpt.load(path)
  assert back['epoch'] == 3 and back['blob'] == b'\x00\xff' and back['tuple'] == (1, 2.5)
  for k, v in obj['state_dict'].items():
    got = back['state_dict'][k]
    assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), k
  assert back['shared'][0] is back['shared'][1]
  # A strided view and an offset into one shared storage (as torch writes a transposed view).
  storage = torch_ckpt._Storage('0', np.arange(10, dtype=np.float32))
  views = {'t': torch_ckpt._Tensor(storage, 1, (3, 2), (1, 3)),
           'o': torch_ckpt._Tensor(storage, 4, (2,), (1,))}
  torch_ckpt.save(views, path)
  back = torch_ckpt.load(path)
  assert np.array_equal(back['t'], np.arange(1, 7, dtype=np.float32).reshape(2, 3).T)
  assert np.array_equal(back['o'], np.array([4, 5], np.float32))


class _Evil:
  def __reduce__(self):
    return (os.system, ('touch PWNED',))


class _Config(dict):
  pass


def test_torch_loader_never_runs_code_and_stubs_unknown_classes(tmp_path):
  buf = io.BytesIO()
  pickle.Pickler(buf, protocol=2).dump(
      {'evil': _Evil(), 'hp': _Config(lr=0.1), 'od': collections.OrderedDict(a=1)})
  # Pretend the config object is an omegaconf class (which is not installed here).
  data = buf.getvalue().replace(f'{_Config.__module__}\n_Config\n'.encode(),
                                b'omegaconf.dictconfig\nDictConfig\n')
  assert b'omegaconf' in data and b'posix\nsystem' in data
  path = tmp_path / 'evil.ckpt'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', data)
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    obj = torch_ckpt.load(str(path))
  finally:
    os.chdir(cwd)
  assert not (tmp_path / 'PWNED').exists()
  assert isinstance(obj['evil'], torch_ckpt.Stub) and obj['evil'].args == ('touch PWNED',)
  assert isinstance(obj['hp'], torch_ckpt.Stub) and obj['hp'].items == {'lr': 0.1}
  assert obj['od'] == collections.OrderedDict(a=1)
  with pytest.raises(torch_ckpt.TorchFormatError, match='not a zip-format PyTorch file'):
    (tmp_path / 'legacy.pt').write_bytes(pickle.dumps({'a': 1}))
    torch_ckpt.load(str(tmp_path / 'legacy.pt'))


def test_safetensors_interop_with_the_reference_library(tmp_path):
  t = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.array([1, 2], np.int64)}
  safetensors.numpy.save_file(t, str(tmp_path / 'lib.safetensors'), metadata={'format': 'pt'})
  got, meta = torch_ckpt.read_safetensors(str(tmp_path / 'lib.safetensors'))
  assert meta == {'format': 'pt'} and all(np.array_equal(got[k], t[k]) for k in t)
  torch_ckpt.write_safetensors(t, str(tmp_path / 'ours.safetensors'), {'k': 'v'})
  lib = safetensors.numpy.load_file(str(tmp_path / 'ours.safetensors'))
  assert all(np.array_equal(lib[k], t[k]) for k in t)
  bf = {'x': np.linspace(-3, 3, 7).astype(ml_dtypes.bfloat16)}
  torch_ckpt.write_safetensors(bf, str(tmp_path / 'bf.safetensors'))
  back, _ = torch_ckpt.read_safetensors(str(tmp_path / 'bf.safetensors'))
  assert back['x'].dtype == bf['x'].dtype and np.array_equal(back['x'], bf['x'])


# ------------------------------------------------------------------------------------------------
# parity with the NumPy reference


def test_teacher_parity_hf_layout_ids_soft_and_sigma(tmp_path):
  t = official(1)
  path = str(tmp_path / 'model.safetensors')
  torch_ckpt.write_safetensors(prefixed(t, 'backbone.'), path)          # mdlm-owt key layout
  denoise = api.load_denoiser(str(tmp_path), dtype=jnp.float32)          # size inferred
  cfg = denoise.model_cfg
  assert (cfg.hidden_size, cfg.n_blocks, cfg.n_heads, cfg.mlp_dim, cfg.cond_dim,
          cfg.vocab_size) == (D, BLOCKS, HEADS, MLP, COND, VOCAB)
  ids, logits = inputs()
  for sigma in (np.zeros(B, np.float32), np.array([0.3, 4.0], np.float32)):
    want = ref.dit_forward(t, ids, sigma, HEADS)
    got = denoise(ids, sigma)
    assert got.dtype == jnp.float32 and got.shape == (B, L, VOCAB)
    assert rel_err(got, want) < 1e-5
    assert rel_err(denoise(logits, sigma), ref.dit_forward(t, logits, sigma, HEADS)) < 1e-5
  assert np.all(np.asarray(got)[..., VOCAB - 1] == np.asarray(t['output_layer.linear.bias'])[-1])
  # bf16 mode follows the official autocast policy: bf16 logits, close to the reference.
  bf = api.load_denoiser(path, dtype=jnp.bfloat16)
  got = bf(ids, sigma)
  assert got.dtype == jnp.bfloat16 and rel_err(got, ref.dit_forward(t, ids, sigma, HEADS)) < 5e-2


def test_didi_ckpt_import_discriminator_parity_and_spectral_weights(tmp_path):
  student, ema, disc = official(2), official(3), official(4, 'discriminator')
  sd = collections.OrderedDict()
  sd.update(prefixed(student, 'backbone.'))
  sd.update(prefixed(official(9), 'teacher.'))                           # ignored
  sd.update(prefixed(disc, 'discriminator.'))
  sd.update(prefixed(ema, 'student_ema.'))
  sd['reward_baseline'] = np.array(0.5, np.float32)                      # ignored
  ckpt = {'epoch': 1, 'global_step': 10, 'state_dict': sd, 'ema': {'shadow_params': [np.ones(3)]},
          'optimizer_states': [{'state': {0: {'exp_avg': np.ones(4, np.float32)}}}]}
  path = str(tmp_path / 'didi-instruct.ckpt')
  torch_ckpt.save(ckpt, path)
  out = importer.import_didi(path, tiny_cfg())
  assert set(out) == {'student', 'student_ema', 'discriminator', 'discriminator_spectral'}
  np.testing.assert_array_equal(out['student']['blocks'][1]['mlp_0']['kernel'],
                                student['blocks.1.mlp.0.weight'].T)
  np.testing.assert_array_equal(out['student_ema']['blocks'][1]['mlp_0']['kernel'],
                                ema['blocks.1.mlp.0.weight'].T)
  np.testing.assert_array_equal(out['discriminator_spectral']['output_layer']['main_2']['u'],
                                disc['output_layer.main.2.weight_u'])
  # Effective spectral weights: our SNLinear in eval mode == W / (uᵀ W v).
  model = loader_model(path, tiny_cfg(), 'discriminator')
  for j in (0, 2):
    layer = getattr(model.output_layer, f'main_{j}')
    want = ref.spectral_weight(disc, f'output_layer.main.{j}')
    assert rel_err(np.asarray(layer.effective_kernel(update=False)).T, want) < 1e-6
  judge = api.load_discriminator(path)
  ids, logits = inputs(1)
  sigma = np.array([0.0, 2.5], np.float32)
  got = judge(ids, sigma)
  assert got.shape == (B, L) and got.dtype == jnp.float32
  assert rel_err(got, ref.discriminator_forward(disc, ids, sigma, HEADS)) < 1e-5
  assert rel_err(judge(logits, sigma), ref.discriminator_forward(disc, logits, sigma, HEADS)) < 1e-5
  # The DiDi denoiser is the student EMA, which the shared compile cache can run too.
  denoise = api.load_denoiser(path)
  assert rel_err(denoise(ids, sigma), ref.dit_forward(ema, ids, sigma, HEADS)) < 1e-5


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def soft_logits(seed):
  """Random soft-input logits (B, L, V), float32, with a wide range: N(0, 3²) entries, some rows
  with −1e4 entries, and one-hot·1e9 rows (how the official RGAS feeds revealed tokens)."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((B, L, VOCAB)) * 3
  logits[:, 1::4, : VOCAB // 2] = -1e4
  logits[:, 2::5] = 1e9 * np.eye(VOCAB)[rng.integers(0, VOCAB - 1, (B, len(range(2, L, 5))))]
  return logits.astype(np.float32)


def test_soft_input_is_logits_as_the_official_model(tmp_path):
  """A 3-D input is logits (h = softmax_V(logits) @ E), as in the official DiT (docs/method.md
  §3.2, §3.4): the loaded denoiser and discriminator match the NumPy reference of the official
  forward on the same random logits and σ, and on ids."""
  student, disc = official(11), official(12, 'discriminator')
  torch_ckpt.write_safetensors(student, str(tmp_path / 'model.safetensors'))   # HF DiDi layout
  torch_ckpt.write_safetensors(disc, str(tmp_path / 'discriminator.safetensors'))
  denoise = didi_jax.load_denoiser(str(tmp_path))
  judge = didi_jax.load_discriminator(str(tmp_path))
  ids, _ = inputs(2)
  logits = soft_logits(3)
  for sigma in (np.array([0.0, 0.0], np.float32), np.array([0.7, 3.0], np.float32)):
    for x in (logits, ids):
      got, want = denoise(x, sigma), ref.dit_forward(student, x, sigma, HEADS)
      assert got.shape == (B, L, VOCAB) and rel_err(got, want) < 1e-4
      got, want = judge(x, sigma), ref.discriminator_forward(disc, x, sigma, HEADS)
      assert got.shape == (B, L) and rel_err(got, want) < 1e-4
  # Logits, not probabilities: feeding softmax(logits) as if it were logits is far off.
  probs = _softmax(logits.astype(np.float64)).astype(np.float32)
  assert rel_err(denoise(probs, sigma), ref.dit_forward(student, logits, sigma, HEADS)) > 1e-2
  # One-hot·1e9 logits reproduce the ids (the official RGAS input at revealed rows).
  onehot = (1e9 * np.eye(VOCAB)[ids]).astype(np.float32)
  np.testing.assert_allclose(denoise(onehot, sigma), denoise(ids, sigma), rtol=0, atol=1e-5)
  np.testing.assert_allclose(judge(onehot, sigma), judge(ids, sigma), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="soft_input='probability' is not valid"):
    denoise(logits, sigma, soft_input='probability')
  with pytest.raises(ValueError, match='ids must be integers'):
    judge(logits[..., 0], sigma)


def test_probs_path_on_softmax_equals_the_logits_path(tmp_path):
  """soft_input='probs' (what RGAS feeds) on softmax(logits) == the official logits path."""
  student, disc = official(11), official(12, 'discriminator')
  torch_ckpt.write_safetensors(student, str(tmp_path / 'model.safetensors'))
  torch_ckpt.write_safetensors(disc, str(tmp_path / 'discriminator.safetensors'))
  denoise = didi_jax.load_denoiser(str(tmp_path))
  judge = didi_jax.load_discriminator(str(tmp_path))
  logits = soft_logits(4)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  sigma = np.array([0.2, 1.5], np.float32)
  for fn in (denoise, judge):
    np.testing.assert_allclose(fn(probs, sigma, soft_input='probs'), fn(logits, sigma),
                               rtol=0, atol=1e-6 * float(np.max(np.abs(fn(logits, sigma)))))
  # The embedding itself: bit-equal.
  emb = denoise.model.vocab_embed
  run = jax.jit(lambda x, soft: emb(x, soft), static_argnums=1)
  np.testing.assert_array_equal(run(jnp.asarray(probs), 'probs'),
                                run(jnp.asarray(logits), 'logits'))


def test_duo_lightning_teacher_ema_maps_by_registration_order(tmp_path):
  raw, ema = official(5), official(6)
  order = [k for k in ema if k != 'rotary_emb.inv_freq']
  ckpt = {'state_dict': prefixed(raw, 'backbone.'),
          'ema': {'decay': 0.9999, 'num_updates': 5, 'collected_params': None,
                  'shadow_params': [ema[k] for k in order]},
          'hyper_parameters': {'config': {'model': 'small'}}}
  path = str(tmp_path / 'mdlm.ckpt')
  torch_ckpt.save(ckpt, path)
  assert order == names.registration_order(BLOCKS)
  got_ema = importer.import_teacher(path, tiny_cfg(), weights='ema')
  got_raw = importer.import_teacher(path, tiny_cfg(), weights='raw')
  for name in order:
    m = names.official_to_path(name)
    leaf_e, leaf_r = got_ema, got_raw
    for p in m.path:
      leaf_e, leaf_r = leaf_e[p], leaf_r[p]
    np.testing.assert_array_equal(leaf_e, ema[name].T if m.transpose else ema[name])
    np.testing.assert_array_equal(leaf_r, raw[name].T if m.transpose else raw[name])
  # A short shadow list is caught; a checkpoint without EMA says to use raw.
  ckpt['ema']['shadow_params'] = ckpt['ema']['shadow_params'][:-1]
  torch_ckpt.save(ckpt, path)
  with pytest.raises(importer.CheckpointError,
                     match='shadow_params has 29 tensors but a DiT with 2 blocks has 30'):
    importer.import_teacher(path, tiny_cfg())
  del ckpt['ema']
  torch_ckpt.save(ckpt, path)
  with pytest.raises(importer.CheckpointError, match='teacher.weights=raw'):
    importer.import_teacher(path, tiny_cfg(), weights='ema')


# ------------------------------------------------------------------------------------------------
# export and round trips


def test_round_trips_are_bit_exact(tmp_path):
  cfg = tiny_cfg()
  student, ema, disc = official(2), official(3), official(4, 'discriminator')
  sd = collections.OrderedDict()
  for prefix, t in (('backbone.', student), ('discriminator.', disc), ('student_ema.', ema)):
    sd.update(prefixed(t, prefix))
  torch_ckpt.save({'state_dict': sd}, str(tmp_path / 'a.ckpt'))
  first = importer.import_didi(str(tmp_path / 'a.ckpt'), cfg)
  # ours -> official .ckpt: the exact official tensors come back, in state_dict order.
  exporter.export_didi_ckpt(str(tmp_path / 'b.ckpt'), model_cfg=cfg, **first)
  back = torch_ckpt.load(str(tmp_path / 'b.ckpt'))
  assert list(back['state_dict']) == list(sd)
  assert all(np.array_equal(back['state_dict'][k], v) and back['state_dict'][k].dtype == v.dtype
             for k, v in sd.items())
  assert back['pytorch-lightning_version'] == exporter.LIGHTNING_VERSION
  second = importer.import_didi(str(tmp_path / 'b.ckpt'), cfg)
  for k in first:
    assert_trees_bit_equal(first[k], second[k])
  # HF directory layout and our own flat formats.
  exporter.export_hf_didi(str(tmp_path / 'hf'), student_ema=first['student_ema'],
                          discriminator=first['discriminator'],
                          discriminator_spectral=first['discriminator_spectral'], model_cfg=cfg)
  hf = importer.import_didi(str(tmp_path / 'hf'), cfg)
  for k in ('student_ema', 'discriminator', 'discriminator_spectral'):
    assert_trees_bit_equal(first[k], hf[k])
  assert_trees_bit_equal(hf['student'], first['student_ema'])         # HF has no raw student
  for ext in ('npz', 'safetensors'):
    exporter.save_ours(str(tmp_path / f'ours.{ext}'), first, model_cfg=cfg)
    ours = importer.import_didi(str(tmp_path / f'ours.{ext}'))         # config from the file
    for k in first:
      assert_trees_bit_equal(first[k], ours[k])
  # Teacher: DUO-style .ckpt with a distinct EMA, and a model object as input.
  exporter.export_teacher_ckpt(str(tmp_path / 't.ckpt'), first['student'],
                               ema_params=first['student_ema'], model_cfg=cfg)
  assert_trees_bit_equal(importer.import_teacher(str(tmp_path / 't.ckpt'), cfg, 'raw'),
                         first['student'])
  assert_trees_bit_equal(importer.import_teacher(str(tmp_path / 't.ckpt'), cfg, 'ema'),
                         first['student_ema'])
  model = loader_model(str(tmp_path / 'a.ckpt'), cfg, 'discriminator')
  exporter.export_discriminator_safetensors(str(tmp_path / 'd.safetensors'), model)
  d2 = importer.import_discriminator(str(tmp_path / 'd.safetensors'), cfg)
  assert_trees_bit_equal(d2[0], first['discriminator'])
  assert_trees_bit_equal(d2[1], first['discriminator_spectral'])


def test_convert_cli_both_directions(tmp_path, capsys):
  t = official(7)
  src = str(tmp_path / 'model.safetensors')
  torch_ckpt.write_safetensors(t, src)
  assert convert.main([src, str(tmp_path / 'ours.npz')]) == 0
  assert convert.main([str(tmp_path / 'ours.npz'), str(tmp_path / 'back.ckpt')]) == 0
  back = torch_ckpt.load(str(tmp_path / 'back.ckpt'))
  assert set(back['state_dict']) == {'backbone.' + k for k in t}
  assert all(np.array_equal(back['state_dict']['backbone.' + k], v) for k, v in t.items())
  assert len(back['ema']['shadow_params']) == len(names.registration_order(BLOCKS))
  assert convert.main([str(tmp_path / 'back.ckpt'), str(tmp_path / 'again.safetensors'),
                       '--format', 'official']) == 0
  again, _ = torch_ckpt.read_safetensors(str(tmp_path / 'again.safetensors'))
  assert list(again) == list(t) and all(np.array_equal(again[k], t[k]) for k in t)
  with pytest.raises(SystemExit) as e:
    convert.main(['--help'])
  assert e.value.code == 0 and 'SRC' in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# errors


def _write(tmp_path, t, name='m.safetensors'):
  path = str(tmp_path / name)
  torch_ckpt.write_safetensors(t, path)
  return path


def test_errors_name_every_problem_and_the_fix(tmp_path):
  cfg = tiny_cfg()
  t = official(8)
  del t['blocks.1.mlp.2.bias']
  with pytest.raises(importer.CheckpointError,
                     match=r'1 missing.*\n  missing: blocks.1.mlp.2.bias'):
    importer.import_teacher(_write(tmp_path, t), cfg)

  t = official(8)
  t['blocks.0.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(importer.CheckpointError, match='unexpected: blocks.0.extra.weight'):
    importer.import_teacher(_write(tmp_path, t), cfg)

  t = official(8)
  t['blocks.0.mlp.0.weight'] = np.ascontiguousarray(t['blocks.0.mlp.0.weight'].T)
  with pytest.raises(importer.CheckpointError,
                     match=r'blocks.0.mlp.0.weight is \(32, 64\) but the model needs \(64, 32\)'
                           r' - it looks transposed'):
    importer.import_teacher(_write(tmp_path, t), cfg)

  t = official(8)
  wrong = tiny_cfg()
  wrong.vocab_size = 51
  with pytest.raises(importer.CheckpointError,
                     match='has vocab 50 but the config says 51: '
                           'set --config.model.vocab_size=50'):
    importer.import_teacher(_write(tmp_path, t), wrong)

  # Several problems at once: one error that lists them all.
  t = official(8)
  del t['sigma_map.mlp.0.bias']
  t['blocks.1.attn_out.weight'] = np.zeros((D, D + 1), np.float32)
  t['stray'] = np.zeros(1, np.float32)
  with pytest.raises(importer.CheckpointError) as e:
    importer.import_teacher(_write(tmp_path, t), cfg)
  msg = str(e.value)
  assert '1 missing, 1 unexpected, 1 mis-shaped' in msg
  assert 'sigma_map.mlp.0.bias' in msg and 'stray' in msg and 'blocks.1.attn_out.weight' in msg

  # Wrong head count is caught through the rotary buffer; a different base too.
  heads = tiny_cfg()
  heads.n_heads = 4
  with pytest.raises(importer.CheckpointError, match='--config.model.n_heads=2'):
    importer.import_teacher(_write(tmp_path, official(8)), heads)
  t = official(8)
  t['rotary_emb.inv_freq'] = t['rotary_emb.inv_freq'] * 1.01
  with pytest.raises(importer.CheckpointError, match='differs from the recomputed'):
    importer.import_teacher(_write(tmp_path, t), cfg)
  # Wrong role, wrong checkpoint kind.
  with pytest.raises(importer.CheckpointError, match='discriminator'):
    importer.import_teacher(_write(tmp_path, official(8, 'discriminator')), cfg)
  with pytest.raises(importer.CheckpointError, match='does not exist'):
    importer.import_teacher(str(tmp_path / 'nope.ckpt'), cfg)


def test_mask_row_warning(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger=importer.__name__):
    importer.import_teacher(_write(tmp_path, official(8)), tiny_cfg())
  assert 'MASK' not in caplog.text
  with caplog.at_level(logging.WARNING, logger=importer.__name__):
    importer.import_teacher(_write(tmp_path, official(8, zero_mask_row=False)), tiny_cfg())
  assert '[MASK] row 49 of output_layer.linear is not zero' in caplog.text


def test_hf_source_without_huggingface_hub(monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)   # never touches the network
  with pytest.raises(importer.CheckpointError, match='pip install huggingface_hub'):
    importer.import_teacher('hf:kuleshov-group/mdlm-owt', tiny_cfg())


def test_rotary_tables_are_constants_of_the_compiled_forward():
  """The trunk's rotary tables are evaluated outside the trace (`dit.rotary_constants`): equal to
  the closed form, and no compiled forward evaluates cos/sin over (L, Dh); traced, XLA's CPU backend
  fused them into the q/k fusions and evaluated them again per (batch, head) element
  (BENCHMARKS.md)."""
  from flax import nnx
  from didi_jax import models
  from didi_jax.models import dit
  cfg = model_config('tiny', vocab_size=258, length=32)
  cfg.compute_dtype = 'float32'
  dh = cfg.hidden_size // cfg.n_heads
  cos, sin = dit.rotary_constants(cfg.length, dh)
  pos = np.arange(cfg.length, dtype=np.float64)[:, None]
  ang = pos * 10000.0 ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)[None]
  ang = np.concatenate([ang, ang], axis=-1)
  np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=2e-6)
  np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=2e-6)
  gd, params = nnx.split(models.build(cfg, seed=0), nnx.Param)
  fwd = jax.jit(lambda p, x, s: nnx.merge(gd, p)(x, s))
  hlo = fwd.lower(params, jnp.zeros((3, cfg.length), jnp.int32), jnp.zeros((3,))).compile().as_text()
  table = f'f32[{cfg.length},{dh}]'
  assert not [ln for ln in hlo.splitlines()
              if (' cosine(' in ln or ' sine(' in ln) and f'= {table}' in ln], \
      'the rotary tables are evaluated inside the compiled forward'
