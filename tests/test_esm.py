"""ESM-2 / DPLM denoiser: parity with transformers' EsmForMaskedLM and an independent NumPy forward,
HF checkpoint import (safetensors, pytorch_model.bin, DPLM Lightning prefix) and exact export."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax.checkpoint import esm_hf, torch_ckpt
from didi_jax.errors import CheckpointError
from didi_jax.models import esm as esm_lib
from didi_jax.models.interface import Denoiser
from tests import reference_esm_numpy as ref_np

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

HEADS = 2
TOL = 2e-5
# Rows with <cls>, residues, <mask> (token dropout), <eos> and <pad> (attention mask).
IDS = np.array([[0, 5, 6, 32, 7, 8, 2, 1, 1, 1],
                [0, 4, 32, 32, 9, 10, 11, 12, 13, 2],
                [0, 20, 21, 22, 23, 24, 25, 26, 27, 28]])


def _hf_config(**kw):
  base = dict(vocab_size=33, hidden_size=16, num_hidden_layers=2, num_attention_heads=HEADS,
              intermediate_size=32, mask_token_id=32, pad_token_id=1,
              position_embedding_type='rotary', token_dropout=True, layer_norm_eps=1e-5,
              emb_layer_norm_before=False, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
  base.update(kw)
  return transformers.EsmConfig(**base)


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """A tiny random HF EsmForMaskedLM (every parameter perturbed, so LN affine and the LM bias
  matter) saved as (a) save_pretrained safetensors, (b) torch.save(state_dict) pytorch_model.bin,
  (c) a DPLM Lightning checkpoint (`state_dict`, `model.net.` prefix, per-layer inv_freq)."""
  torch.manual_seed(0)
  model = transformers.EsmForMaskedLM(_hf_config()).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.3)
  root = tmp_path_factory.mktemp('hf_esm')
  st = root / 'st'
  model.save_pretrained(st)
  binary = root / 'bin'
  binary.mkdir()
  sd = model.state_dict()
  torch.save(sd, binary / 'pytorch_model.bin')
  (binary / 'config.json').write_text((st / 'config.json').read_text())
  dplm = root / 'dplm'
  dplm.mkdir()
  lightning = {}
  for k, v in sd.items():
    if k == 'esm.rotary_embeddings.inv_freq':
      for i in range(2):
        lightning[f'model.net.esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq'] = v
    else:
      lightning['model.net.' + k] = v
  torch.save({'state_dict': lightning, 'epoch': 3}, dplm / 'last.ckpt')
  cfg = json.loads((st / 'config.json').read_text())
  cfg['dplm_type'] = 'dplm_esm'
  cfg['architectures'] = ['EsmForDPLM']
  (dplm / 'config.json').write_text(json.dumps(cfg))
  tensors = {k: v.detach().numpy().astype(np.float64) for k, v in sd.items()}
  return {'model': model, 'st': str(st), 'bin': str(binary), 'dplm': str(dplm / 'last.ckpt'),
          'tensors': tensors, 'root': root}


def _hf_logits(model, ids, mask=True):
  with torch.no_grad():
    kw = {'attention_mask': torch.tensor(ids != 1)} if mask else {}
    return model(torch.tensor(ids), **kw).logits.numpy().astype(np.float64)


@pytest.mark.parametrize('kind', ['st', 'bin', 'dplm'])
def test_matches_transformers_after_import(hf, kind):
  model = esm_hf.load_esm(hf[kind])
  out = np.asarray(model(jnp.asarray(IDS), None), np.float64)
  want = _hf_logits(hf['model'], IDS)
  assert out.shape == (3, 10, 33)
  np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
  assert np.abs(want).max() > 1.0          # not a degenerate all-zero comparison


def test_no_pad_mask_matches_transformers_without_attention_mask(hf):
  model = esm_hf.load_esm(hf['st'], pad_attention_mask=False)
  out = np.asarray(model(jnp.asarray(IDS), None), np.float64)
  np.testing.assert_allclose(out, _hf_logits(hf['model'], IDS, mask=False), atol=TOL, rtol=0)
  # ... and the pad mask matters on row 0 (three pads), not on row 2 (none).
  masked = np.asarray(esm_hf.load_esm(hf['st'])(jnp.asarray(IDS), None), np.float64)
  assert np.abs(masked[0] - out[0]).max() > 1e-3
  np.testing.assert_allclose(masked[2], out[2], atol=1e-6)


def test_matches_independent_numpy_forward(hf):
  model = esm_hf.load_esm(hf['st'])
  out = np.asarray(model(jnp.asarray(IDS), None), np.float64)
  want = ref_np.forward(hf['tensors'], IDS, n_heads=HEADS, attention_mask=(IDS != 1).astype(float))
  np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
  nomask = esm_hf.load_esm(hf['st'], pad_attention_mask=False)
  want = ref_np.forward(hf['tensors'], IDS, n_heads=HEADS, attention_mask=None)
  np.testing.assert_allclose(np.asarray(nomask(jnp.asarray(IDS), None)), want, atol=TOL, rtol=0)


def test_token_dropout_scale_and_soft_inputs(hf):
  model = esm_hf.load_esm(hf['st'])
  E = np.asarray(model.esm.embeddings.word_embeddings.embedding[...], np.float64)
  e, valid = model.embed(jnp.asarray(IDS))
  e = np.asarray(e, np.float64)
  # row 0: 7 valid tokens, 1 <mask>: scale 0.88 / (1 - 1/7); <mask> and pads zero.
  np.testing.assert_allclose(e[0, 1], E[5] * 0.88 / (1 - 1 / 7), rtol=1e-6)
  assert not e[0, 3].any() and not e[0, 7:].any()
  np.testing.assert_array_equal(np.asarray(valid[0]), IDS[0] != 1)
  # one-hot probabilities (and sharp logits) give exactly the ids path
  onehot = jax.nn.one_hot(IDS, 33)
  ids_out = np.asarray(model(jnp.asarray(IDS), None))
  np.testing.assert_allclose(np.asarray(model(onehot, None, soft_input='probs')), ids_out,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(model(onehot * 60.0, None)), ids_out, atol=1e-4)
  # a soft mixture: e = Σ p E (mask row zeroed) · 0.88 / (1 − mean_l p(<mask>))
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(33) * 0.3, size=(1, 6))
  p[..., 1] = 0.0                          # no pad mass
  p /= p.sum(-1, keepdims=True)
  e_soft = np.asarray(model.embed(jnp.asarray(p, jnp.float32), 'probs')[0], np.float64)
  E0 = E.copy()
  E0[32] = 0
  want = (p @ E0) * 0.88 / (1 - p[..., 32].mean())
  np.testing.assert_allclose(e_soft[0], want[0], rtol=1e-5, atol=1e-6)


def test_features_project_trunk_and_sigma(hf):
  model = esm_hf.load_esm(hf['st'])
  x = jnp.asarray(IDS)
  full = np.asarray(model(x, jnp.zeros(3)))
  np.testing.assert_array_equal(np.asarray(model(x, jnp.full(3, 7.0))), full)   # σ ignored
  np.testing.assert_allclose(np.asarray(model.project(model.features(x, None))), full, atol=0)
  # the Denoiser interface: projection is a module of its own (split / merge like DiT's Linear)
  assert isinstance(model, Denoiser) and model.trunk_modules == ('esm',)
  gd, st = nnx.split(model.projection)
  assert {str(k) for k in st.keys()} == {'lm_head', 'word_embeddings'}
  feats = model.features(x, None)
  np.testing.assert_allclose(np.asarray(nnx.merge(gd, st)(feats[:, 2:4])), full[:, 2:4], atol=0)
  h, c = model.trunk(x, None)
  assert h.shape == (3, 10, 16) and h.dtype == jnp.float32 and c.shape == (3, 0)
  f = model.esm.encoder.emb_layer_norm_after(h)
  np.testing.assert_allclose(np.asarray(model.features(x, None)), np.asarray(f), atol=0)
  # num_blocks=1 equals a 1-layer model with the same first layer
  h1, _ = model.trunk(x, None, num_blocks=1)
  tensors = {k: v for k, v in hf['tensors'].items() if '.layer.1.' not in k}
  want = ref_np.forward(tensors, IDS, n_heads=HEADS, attention_mask=(IDS != 1).astype(float))
  one = esm_lib.EsmForMaskedLM(model.cfg.replace(num_hidden_layers=1), rngs=nnx.Rngs(0))
  pure = esm_hf.hf_to_state({k: v.astype(np.float32) for k, v in tensors.items()}, one.cfg)
  state = nnx.state(one, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(one, state)
  np.testing.assert_allclose(np.asarray(one(x, None)), want, atol=TOL)
  np.testing.assert_allclose(np.asarray(h1), np.asarray(one.trunk(x, None)[0]), atol=1e-6)


def test_stored_inv_freq_is_used_and_exported(hf, tmp_path):
  model = esm_hf.load_esm(hf['st'])
  assert model.cfg.rope_inv_freq is None              # HF's table equals the rope_theta default
  assert len(nnx.split(model, nnx.Param)) == 2        # Params only: splits like the DiT
  # a table saved in float16 (as some old checkpoints): used exactly, and exported back
  t = {k: v.astype(np.float32) for k, v in hf['tensors'].items()}
  inv16 = t['esm.rotary_embeddings.inv_freq'].astype(np.float16).astype(np.float32)
  assert not np.array_equal(inv16, t['esm.rotary_embeddings.inv_freq'])
  t['esm.rotary_embeddings.inv_freq'] = inv16
  d = tmp_path / 'f16'
  d.mkdir()
  torch_ckpt.write_safetensors(t, str(d / 'model.safetensors'))
  (d / 'config.json').write_text((hf['root'] / 'st' / 'config.json').read_text())
  m16 = esm_hf.load_esm(str(d))
  assert m16.cfg.rope_inv_freq == tuple(float(v) for v in inv16)
  out = np.asarray(m16(jnp.asarray(IDS), None), np.float64)
  mask = (IDS != 1).astype(float)
  want = ref_np.forward(hf['tensors'], IDS, n_heads=HEADS, attention_mask=mask, inv_freq=inv16)
  np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
  assert np.abs(out - np.asarray(model(jnp.asarray(IDS), None))).max() > 1e-6
  back = esm_hf.state_to_hf(esm_hf.load_esm(esm_hf.export_hf(m16, str(tmp_path / 'x'))))
  assert np.array_equal(back['esm.encoder.layer.1.attention.self.rotary_embeddings.inv_freq'], inv16)
  t['esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq'] = inv16 * 2
  torch_ckpt.write_safetensors(t, str(d / 'model.safetensors'))
  with pytest.raises(CheckpointError, match='inv_freq copies must agree'):
    esm_hf.load_esm(str(d))


def test_dropout_and_bf16():
  cfg = esm_lib.EsmConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, hidden_dropout_prob=0.5)
  model = esm_lib.init_model(cfg, seed=1)
  x = jnp.asarray(IDS)
  a = np.asarray(model(x, None, dropout_key=jax.random.key(0)))
  b = np.asarray(model(x, None, dropout_key=jax.random.key(0)))
  c = np.asarray(model(x, None, dropout_key=jax.random.key(1)))
  d = np.asarray(model(x, None))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-3
  bf = esm_lib.EsmForMaskedLM(cfg.replace(compute_dtype='bfloat16'), rngs=nnx.Rngs(1))
  out = bf(x, None)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), d, atol=0.1)


def test_export_round_trip_is_exact_and_transformers_loads_it(hf, tmp_path):
  model = esm_hf.load_esm(hf['st'])
  for fmt in ('safetensors', 'bin'):
    out = esm_hf.export_hf(model, str(tmp_path / fmt), fmt=fmt)
    back = esm_hf.load_esm(out)
    a = esm_hf.state_to_hf(model)
    b = esm_hf.state_to_hf(back)
    assert list(a) == list(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # bit-exact against the source tensors too
    for k, v in hf['model'].state_dict().items():
      if k in a:
        assert np.array_equal(a[k], v.numpy()), k
    hf_back = transformers.EsmForMaskedLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(hf_back, IDS), _hf_logits(hf['model'], IDS), atol=0)
  tok = transformers.EsmTokenizer.from_pretrained(str(tmp_path / 'safetensors'))
  assert tok.mask_token_id == 32 and tok.pad_token_id == 1
  # export is deterministic: same bytes twice
  esm_hf.export_hf(back, str(tmp_path / 'again'))
  assert ((tmp_path / 'again' / 'model.safetensors').read_bytes()
          == (tmp_path / 'safetensors' / 'model.safetensors').read_bytes())


def _write(tmp_path, tensors, cfg_json):
  d = tmp_path / 'ck'
  d.mkdir(exist_ok=True)
  torch_ckpt.write_safetensors(tensors, str(d / 'model.safetensors'))
  (d / 'config.json').write_text(json.dumps(cfg_json))
  return str(d)


def test_import_errors_are_one_line_and_name_the_key(hf, tmp_path):
  base = {k: v.astype(np.float32) for k, v in hf['tensors'].items()}
  cfg = json.loads((hf['root'] / 'st' / 'config.json').read_text())

  def err(tensors, cfg_json=cfg):
    with pytest.raises(CheckpointError) as e:
      esm_hf.load_esm(_write(tmp_path, tensors, cfg_json))
    assert '\n' not in str(e.value)
    return str(e.value)

  t = dict(base)
  del t['esm.encoder.layer.1.output.dense.bias']
  assert 'esm.encoder.layer.1.output.dense.bias' in err(t)
  t = dict(base)
  t['lm_head.dense.weight'] = np.zeros((16, 8), np.float32)
  assert 'lm_head.dense.weight' in err(t) and '[16, 16]' in err(t)
  t = dict(base, **{'esm.pooler.dense.weight': np.zeros((16, 16), np.float32)})
  assert 'esm.pooler.dense.weight' in err(t)
  t = dict(base, **{'lm_head.decoder.weight': base['esm.embeddings.word_embeddings.weight'] + 1})
  assert 'untied' in err(t)
  t = {k[len('esm.'):]: v for k, v in base.items() if k.startswith('esm.')}
  assert 'bare EsmModel' in err(t)
  assert 'rotary' in err(base, dict(cfg, position_embedding_type='absolute'))
  assert 'hidden_size' in err(base, dict(cfg, hidden_size=15))
  d = tmp_path / 'nocfg'
  d.mkdir()
  torch_ckpt.write_safetensors(base, str(d / 'model.safetensors'))
  with pytest.raises(CheckpointError, match='config.json'):
    esm_hf.load_esm(str(d))
  bad_vocab = _write(tmp_path, base, cfg)
  with open(os.path.join(bad_vocab, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(['<cls>', '<pad>', '<eos>', '<unk>', 'A', 'L'] + ['x'] * 27))
  with pytest.raises(CheckpointError, match='at id 4'):
    esm_hf.load_esm(bad_vocab)


def test_hf_source_errors(monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  with pytest.raises(CheckpointError, match='pip install huggingface_hub'):
    esm_hf.load_esm('hf:airkingbd/dplm_150m')
  monkeypatch.delitem(sys.modules, 'huggingface_hub')
  hub = pytest.importorskip('huggingface_hub')

  def offline(*a, **k):
    raise OSError('offline')
  monkeypatch.setattr(hub, 'snapshot_download', offline)
  with pytest.raises(CheckpointError, match='could not fetch hf:airkingbd/dplm_150m'):
    esm_hf.load_esm('hf:airkingbd/dplm_150m')


def test_hf_source_downloads_through_snapshot(hf, monkeypatch):
  hub = pytest.importorskip('huggingface_hub')
  calls = []

  def fake(repo, revision=None, allow_patterns=None):
    calls.append((repo, revision))
    return hf['st']
  monkeypatch.setattr(hub, 'snapshot_download', fake)
  model = esm_hf.load_esm('hf:airkingbd/dplm_150m@main')
  assert calls == [('airkingbd/dplm_150m', 'main')]
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS), None)),
                             _hf_logits(hf['model'], IDS), atol=TOL)


def test_trainable_mask_last_layers_and_head():
  cfg = esm_lib.EsmConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=32)
  params = nnx.state(esm_lib.init_model(cfg), nnx.Param)
  mask = esm_lib.trainable_mask(params, 3, 1)
  flat = {tuple(str(getattr(p, 'key', getattr(p, 'idx', ''))) for p in path
                if hasattr(p, 'key') or hasattr(p, 'idx')): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  on = {k for k, v in flat.items() if v}
  assert all(k[:4] == ('esm', 'encoder', 'layer', '2') or k[0] == 'lm_head' for k in on)
  assert any(k[:4] == ('esm', 'encoder', 'layer', '2') for k in on)
  assert not flat[('esm', 'embeddings', 'word_embeddings', 'embedding')]
