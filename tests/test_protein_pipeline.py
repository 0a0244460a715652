"""Proteins end to end (issue 13 phase 2): config checks, the fasta data pipeline (rows =
encode_rows of the records, exact resume), the ESM discriminator (trunk copied from the teacher, only the last
K layers + head train), the loader on ESM / DPLM directories, and the configs/protein.py:smoke
pipeline whose sweep reports the protein metrics for teacher and student."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import jobs, models
from didi_jax.distill import didi as distill
from didi_jax import main as cli
from didi_jax.checkpoint import esm_hf, loader
from didi_jax.data import pipeline, protein, sources
from didi_jax.evaluation import judges
from didi_jax.evaluation import protein as pmetrics
from didi_jax.models import esm as esm_lib
from didi_jax.train import distill_loop
from didi_jax.train import distill_state as ds

GLOBINS = '/usr/share/EMBOSS/test/data/hmm/globins630.fa'
needs_emboss = pytest.mark.skipif(not os.path.exists(GLOBINS),
                                  reason='needs the emboss-test package (apt install emboss-test)')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def protein_cfg(tmp_path, fasta=GLOBINS, *, kind='dit', tokenizer='protein', length=48):
  """A tiny float32 protein config on one device, its cache under tmp_path."""
  cfg = config_lib.base_config()
  cfg.data.source, cfg.data.tokenizer, cfg.data.fasta = 'fasta', tokenizer, fasta
  cfg.data.bos = tokenizer == 'esm'
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.model = config_lib.model_config('tiny', vocab_size=config_lib.tokenizer_vocab(tokenizer) + 1,
                                      length=length)
  m = cfg.model
  m.compute_dtype, m.kind = 'float32', kind
  if kind == 'esm':
    m.hidden_size, m.n_blocks, m.n_heads, m.mlp_dim = 32, 3, 4, 64
    m.esm.pad_token_id = config_lib.PROTEIN_PAD[tokenizer]
    m.dropout = 0.0
  cfg.mesh.data = 1
  d = cfg.distill
  d.batch_size, d.group_size, d.disc_unfreeze_blocks, d.num_iterations = 2, 4, 1, 20
  d.optim.student.warmup_steps = d.optim.disc.warmup_steps = 2
  return cfg


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize('changes, fragment', [
    ({'data.tokenizer': 'byte', 'model.vocab_size': 258}, '--config.data.tokenizer=protein'),
    ({'data.fasta': ''}, '--config.data.fasta='),
    ({'data.source': 'text', 'data.paths': 'x'}, '--config.data.source=fasta'),
    ({'model.kind': 'esm', 'model.esm.pad_token_id': 1}, '--config.model.esm.pad_token_id=26'),
    ({'data.bos': True}, 'bos=False'),
    ({'eval.structure_scorer': '/nonexistent/esmfold'}, 'neither esmfold'),
    ({'data.long_records': 'truncate'}, "['crop', 'skip']"),
    ({'data.crop_seed': -1}, 'data.crop_seed'),
    ({'eval.nelbo_draws': 0}, 'eval.nelbo_draws'),
    ({'model.vocab_size': 27}, '--config.model.vocab_size=28'),
])
def test_invalid_protein_configs_are_one_line_errors(tmp_path, changes, fragment):
  cfg = protein_cfg(tmp_path)
  config_lib.validate(cfg)                           # the base protein config is valid
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    jobs.check(cfg)
  assert fragment in str(err.value) and '\n' not in str(err.value)


def test_text_checks_and_judge_free_jobs(tmp_path):
  cfg = config_lib.base_config()
  cfg.eval.structure_scorer = 'esmfold'
  with pytest.raises(config_lib.ConfigError, match="scores proteins"):
    config_lib.validate(cfg)
  cfg = protein_cfg(tmp_path)
  cfg.job = 'evaluate'
  with pytest.raises(config_lib.ConfigError, match='--config.job=sweep'):
    jobs.check(cfg)
  cfg.job, cfg.eval.judge = 'sweep', 'no-such-judge'  # proteins never resolve a judge
  jobs.check(cfg)


def test_protein_presets_validate():
  from configs import protein as presets   # pylint: disable=import-outside-toplevel
  for name in ('smoke', 'scratch', ''):
    cfg = presets.get_config(name)
    assert cfg.data.fasta == GLOBINS
    config_lib.validate(cfg)
  assert presets.get_config('').teacher.checkpoint == 'hf:airkingbd/dplm_150m'


# ------------------------------------------------------------------------------------ data


@needs_emboss
@pytest.mark.parametrize('tokenizer', ['protein', 'esm'])
def test_fasta_splits_are_encode_rows_of_the_records(tmp_path, tokenizer):
  cfg = protein_cfg(tmp_path, tokenizer=tokenizer, length=150)
  tok = protein.get_protein_tokenizer(tokenizer)
  cap = protein.residue_capacity(150, cfg.data.bos)
  records = list(protein.iter_records(GLOBINS, max_length=cap, dedup=True))
  valid = [sources.record_is_valid(r.name, r.sequence, 0.05) for r in records]
  assert 0.02 < np.mean(valid) < 0.1              # data.valid_fraction = 0.05 of the records
  for split, want in (('train', False), ('valid', True)):
    seqs = [r.sequence for r, v in zip(records, valid) if v == want]
    expect = protein.encode_rows(seqs, 150, tok, layout='eos', bos=cfg.data.bos)
    np.testing.assert_array_equal(np.asarray(pipeline.load_blocks(cfg.data, 150, split)), expect)
  # layout 'pad' and skipping long records: other rows (and another cache entry).
  cfg.data.layout, cfg.data.long_records = 'pad', 'skip'
  kept = [r.sequence for r in protein.iter_records(GLOBINS, max_length=cap, long_records='skip',
                                                   dedup=True)
          if not sources.record_is_valid(r.name, r.sequence, 0.05)]
  rows = np.asarray(pipeline.load_blocks(cfg.data, 150, 'train'))
  assert len(kept) < sum(not v for v in valid) and (rows == tok.pad_id).any()
  np.testing.assert_array_equal(rows, protein.encode_rows(kept, 150, tok, layout='pad',
                                                          bos=cfg.data.bos))


@needs_emboss
def test_fasta_training_batches_resume_exactly(tmp_path):
  cfg = protein_cfg(tmp_path, length=160)
  rows = np.asarray(pipeline.load_blocks(cfg.data, 160, 'train'))
  it = pipeline.TrainIterator(cfg.data, 160, 64)
  per_epoch = it.batches_per_epoch
  seen = [next(it) for _ in range(per_epoch - 1)]          # stop just before the epoch ends
  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(3)]                      # crosses into epoch 1
  for b in seen + after:                                    # every batch is rows of the split
    assert b.shape == (64, 160)
    assert all((rows == r).all(-1).any() for r in b[:4])
  resumed = pipeline.TrainIterator(cfg.data, 160, 64)
  resumed.set_state(state)
  for a, b in zip(after, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(a, b)
  # an epoch visits distinct rows (a permutation, the remainder dropped)
  first = np.concatenate(seen + after[:1])
  assert len({r.tobytes() for r in first}) == per_epoch * 64


# ------------------------------------------------------------------------------------ models


def _esm_teacher(cfg, seed=0):
  """An ESM denoiser of cfg.model whose parameters are all perturbed (non-trivial values)."""
  model = models.build(cfg.model, 'denoiser', seed=seed)
  params = nnx.state(model, nnx.Param)
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  return jax.tree.unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def test_esm_discriminator_copies_the_trunk_and_trains_last_layers_and_head(tmp_path):
  cfg = protein_cfg(tmp_path, kind='esm', length=16)
  cfg.distill.disc_unfreeze_blocks = 1
  cfg.distill.optim.disc.lr = 1e-2
  config_lib.validate(cfg)
  tp = _esm_teacher(cfg)
  s0 = ds.init_distill_state(cfg, tp, jax.random.key(1))
  teacher = dict(nnx.to_flat_state(tp))
  disc = dict(nnx.to_flat_state(s0.disc_frozen)) | dict(nnx.to_flat_state(s0.disc_train))
  trunk = [p for p in disc if p[0] == 'esm']
  assert set(trunk) == {p for p in teacher if p[0] == 'esm'}
  for p in trunk:
    np.testing.assert_array_equal(np.asarray(disc[p][...]), np.asarray(teacher[p][...]))
  train = set(dict(nnx.to_flat_state(s0.disc_train)))
  assert {p[:4] for p in train if p[0] == 'esm'} == {('esm', 'encoder', 'layer', 2)}
  assert any(p[0] == 'output_layer' for p in train)
  # One iteration: the last layer and the head move, every other discriminator value stays.
  sgd, dgd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd))
  x = jax.random.randint(jax.random.key(2), (2, 16), 0, 25)
  before = {p: np.asarray(v[...]) for p, v in disc.items()}
  s1, _ = step(s0, tp, x, jax.random.key(3))
  after = dict(nnx.to_flat_state(s1.disc_frozen)) | dict(nnx.to_flat_state(s1.disc_train))
  moved = {p for p in before if not np.array_equal(before[p], np.asarray(after[p][...]))}
  layer2 = {p for p in before if p[:4] == ('esm', 'encoder', 'layer', 2)}
  head = {p for p in before if p[0] == 'output_layer'}
  assert moved <= layer2 | head
  assert moved & layer2 and moved & head
  # the student moved too (ESM student trained by the same step)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(s1.student), jax.tree.leaves(tp)))


def test_loader_reads_an_exported_esm_dir_bit_equal(tmp_path):
  cfg = esm_lib.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6,
                          token_dropout=False, rope_theta=500.0)
  model = esm_lib.init_model(cfg, seed=5)
  out = esm_hf.export_hf(model, str(tmp_path / 'dplm'))
  assert loader.is_esm_source(out) and loader.is_esm_source(os.path.join(out, 'model.safetensors'))
  assert loader.is_esm_source('hf:airkingbd/dplm_150m')
  assert not loader.is_esm_source('hf:kuleshov-group/mdlm-owt')
  net = loader.load(out, 'teacher')
  assert net.model_cfg.kind == 'esm' and net.model_cfg.n_blocks == 2
  want = nnx.to_flat_state(nnx.state(model, nnx.Param))
  got = dict(nnx.to_flat_state(net.params))
  assert set(got) == {p for p, _ in want}
  for p, v in want:
    np.testing.assert_array_equal(np.asarray(got[p][...]), np.asarray(v[...]))
  x = jnp.asarray(np.random.default_rng(0).integers(4, 29, (2, 12)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(net.model()(x, jnp.zeros(2))),
                                np.asarray(model(x, jnp.zeros(2))))
  with pytest.raises(loader.CheckpointError, match='not a discriminator'):
    loader.load(out, 'discriminator')
  # distill takes model kind, sizes and ESM fields from such a teacher
  dcfg = protein_cfg(tmp_path, tokenizer='esm', length=12)
  tcfg = distill_loop.teacher_config(dcfg, net)
  assert tcfg.model.kind == 'esm' and tcfg.model.hidden_size == 32
  assert tcfg.model.esm.pad_token_id == 1 and tcfg.model.length == 12
  built = models.build(tcfg.model).cfg
  for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                'intermediate_size', 'layer_norm_eps', 'mask_token_id', 'pad_token_id',
                'token_dropout', 'emb_layer_norm_before', 'rope_theta', 'rope_inv_freq'):
    assert getattr(built, field) == getattr(cfg, field), field


# ------------------------------------------------------------------------------------ smoke


@needs_emboss
def test_smoke_pipeline_reports_protein_metrics(tmp_path, monkeypatch):
  from configs import protein as presets   # pylint: disable=import-outside-toplevel
  cfg = presets.get_config('smoke')
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.model.length = 48
  cfg.mesh.data = 1
  cfg.pretrain.num_steps, cfg.pretrain.eval_every, cfg.checkpoint.every = 20, 20, 20
  cfg.distill.num_iterations = 4
  cfg.sample.batch_size = cfg.sample.num_samples = cfg.eval.num_samples = 8
  cfg.eval.protein_reference = 64
  cfg.sweep.samplers = 'ancestral'
  cfg.sweep.nfes = cfg.sweep.teacher_nfes = '2,4'
  monkeypatch.setattr(judges, 'load_judge', lambda *a, **k: pytest.fail('a judge was loaded'))
  work = str(tmp_path / 'run')
  out = cli.run_job(cfg, work)
  assert out['distill']['complete'] and out['sweep']['rows'] == 4
  rows = json.load(open(os.path.join(work, 'sweep', 'results.json')))
  assert [(r['model'], r['nfe']) for r in rows] == [('teacher', 2), ('teacher', 4),
                                                     ('student', 2), ('student', 4)]
  table = open(os.path.join(work, 'sweep', 'results.md')).read()
  assert 'comp. JS' in table and 'teacher NELBO/tok' in table and 'Gen PPL' not in table.split(
      'Reference:')[0]
  assert os.path.getsize(os.path.join(work, 'sweep', 'curve.png')) > 1000
  # Recompute one row from its samples: reference = the first training rows, teacher = the run's.
  tok = protein.get_protein_tokenizer('protein')
  ref_rows = np.asarray(pipeline.load_blocks(cfg.data, 48, 'train')[:64])
  ref = protein.protein_strings(ref_rows, tok).sequences
  assert pmetrics.composition_divergence(ref, ref)['js'] == 0.0
  row = rows[2]
  sample_file = os.path.join(work, 'samples', 'sweep_student_ancestral_nfe2_float32_seed0.jsonl')
  ids = np.asarray([json.loads(line)['ids'] for line in open(sample_file)], np.int32)
  gen = protein.protein_strings(ids, tok).sequences
  comp = pmetrics.composition_divergence(gen, ref)
  assert row['composition_js'] == pytest.approx(comp['js'], rel=1e-12)
  assert row['composition_kl'] == pytest.approx(comp['kl'], rel=1e-12)
  assert row['length_ks'] == pytest.approx(pmetrics.ks_statistic([len(s) for s in gen],
                                                                 [len(s) for s in ref]))
  teacher = loader.load(os.path.join(work, 'teacher'), 'teacher')
  nelbo = pmetrics.denoiser_nelbo(teacher.model(), ids, 27, num_t=cfg.eval.nelbo_draws,
                                  seed=0, batch_size=8)
  assert np.isfinite(row['teacher_nelbo'])
  assert row['teacher_nelbo'] == pytest.approx(nelbo['per_token'], rel=1e-5)
  refline = out['sweep']['reference']
  assert 0.0 <= refline['composition_js'] < 0.05 and np.isfinite(refline['teacher_nelbo'])
  # a second sweep reuses every row (resume key) and loads no judge either
  again = cli.run_job(_with_job(cfg, 'sweep'), work)
  assert again['reused'] == 4 and again['computed'] == 0


def _with_job(cfg, job):
  cfg = copy.deepcopy(cfg)
  cfg.job = job
  return cfg


def test_results_md_explains_its_columns_and_names_short_rows():
  """results.md says what `ended`, `identity` and `seconds` are, and names the rows whose
  proteins end after a few residues (they look best by NELBO per position)."""
  from didi_jax.evaluation import protein_sweep  # pylint: disable=import-outside-toplevel
  from configs import protein as presets         # pylint: disable=import-outside-toplevel
  cfg = presets.get_config('smoke')
  base = {'precision': 'float32', 'student_forwards': 5, 'seconds': 1.5}
  rows = [dict(base, model='teacher', sampler='ancestral', nfe=4, mean_length=60.0),
          dict(base, model='student', sampler='rgas', nfe=4, mean_length=4.0),
          dict(base, model='student', sampler='rgas', nfe=8, mean_length=37.0),
          dict(base, model='student', sampler='rgas', nfe=16, mean_length=14.9)]
  ref = {'num_reference': 64, 'num_rows': 8, 'mean_length': 60.0}
  text = protein_sweep.markdown(rows, cfg, ref, [])
  for phrase in ('ended = fraction of rows in which the protein ended',
                 'identity = mean positional identity of pairs',
                 "seconds = wall time of drawing the row's samples, compilation excluded"):
    assert phrase in text
  short = [ln for ln in text.splitlines() if ln.startswith('Short proteins:')]
  assert len(short) == 1                          # below a quarter of the data's 60 residues
  assert short[0].startswith('Short proteins: student rgas at 4 NFE, student rgas at 16 NFE '
                             "end after 4–15 residues on average (mean len), far below the "
                             "data's 60")
  assert 'curve.png' in short[0]
  assert not any(ln.startswith('Short proteins:') for ln in
                 protein_sweep.markdown(rows[:1], cfg, ref, []).splitlines())
