"""The `ablate` job (didi_jax/ablation.py) and the byte-level judges (evaluation/judges.py).

Row construction, the table maths on synthetic results, the byte judge against a NumPy recount,
and a tiny end-to-end ablation that is stopped in its second distillation and resumed. Runtime:
about two minutes on 2 CPU cores.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo, owt
from didi_jax import ablation, compare, errors, jobs, models
from didi_jax import config as config_lib
from didi_jax import main as cli
from didi_jax.checkpoint import exporter
from didi_jax.checkpoint.manager import Manager
from didi_jax.distill import sdtt
from didi_jax.evaluation import frontier, judges
from didi_jax.sampling import cost as cost_lib
from didi_jax.train import common, pretrain
from tests.test_cli import read_metrics, smoke_cfg
from tests.test_main import stop_in_flag

TEXTS = ['To be, or not to be', 'ROMEO:<|endoftext|>Hi<|endoftext|>x',
         'a', 'Caf\u00e9 \u2014 ' * 3, '']


def flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_diff(a, b) -> set:
  fa, fb = flat(a.to_dict()), flat(b.to_dict())
  return {k for k in fa if fa[k] != fb[k]}


def technique_keys(names) -> set:
  return {k for n in names for k in ablation.BY_NAME[n].off}


# ------------------------------------------------------------------------------- rows


def test_chain_switches_the_documented_fields_in_the_papers_order():
  cfg = demo.get_config('')
  rows = ablation.chain_rows()
  assert [r.name for r in rows] == [
      'baseline', 'with_score_decomposition', 'with_coupled_time', 'with_omega',
      'with_pi_weighting', 'with_regularisation', 'full']
  assert ablation.CHAIN == ('score_decomposition', 'coupled_time', 'omega', 'pi_weighting',
                            'regularisation', 'rgas')
  full = ablation.row_config(cfg, rows[-1])
  assert full.sampler.kind == 'rgas' and config_diff(full, cfg) <= {'sampler.kind', 'job'}
  documented = {   # docs/ablation.md and README "Ablations": the off switch of each technique
      'score_decomposition': {'distill.score_decomposition': False},
      'coupled_time': {'distill.coupled_time': False},
      'omega': {'distill.omega.mode': 'constant'},
      'pi_weighting': {'distill.tau.a': 2.0, 'distill.tau.b': 2.0,
                       'distill.importance_weight': False},
      'regularisation': {'distill.kl.coef_hi': 0.0, 'distill.kl.coef_lo': 0.0,
                         'distill.entropy_coef': 0.0},
      'rgas': {'sampler.kind': 'ancestral'}}
  for i, row in enumerate(rows):
    rcfg = flat(ablation.row_config(cfg, row).to_dict())
    for j, name in enumerate(ablation.CHAIN):
      is_off = j >= i          # row i has the first i techniques on, the rest off
      for key, off in documented[name].items():
        if is_off:
          assert rcfg[key] == off, (row.name, key)
        else:
          assert rcfg[key] == flat(full.to_dict())[key], (row.name, key)
    if i:
      # Consecutive rows differ in exactly the switches of the technique turned on.
      prev = ablation.row_config(cfg, rows[i - 1])
      changed = config_diff(ablation.row_config(cfg, row), prev)
      want = {k for k in documented[ablation.CHAIN[i - 1]]
              if documented[ablation.CHAIN[i - 1]][k] != flat(full.to_dict())[k]}
      assert changed == want, (row.name, changed)


def test_leave_one_out_rows_differ_from_full_in_one_technique():
  cfg = demo.get_config('')
  full = ablation.row_config(cfg, ablation.Row('full', 'chain', '', ()))
  loo = ablation.loo_rows()
  assert [r.name for r in loo] == [f'no_{t.name}' for t in ablation.TECHNIQUES]
  for row in loo:
    (name,) = row.off
    changed = config_diff(ablation.row_config(cfg, row), full)
    assert changed and changed <= technique_keys([name]), (row.name, changed)
  picked = [r.name for r in ablation.select_rows(cfg)]
  assert 'no_group_norm' in picked and 'no_tau_per_group' in picked
  # configs/owt.py keeps the paper's τ per row: that leave-one-out row would equal full.
  ocfg = owt.get_config('ablate')
  assert 'no_tau_per_group' not in [r.name for r in ablation.select_rows(ocfg)]
  ocfg.ablation.rows = 'no_tau_per_group'
  with pytest.raises(errors.ConfigError, match='already off'):
    ablation.select_rows(ocfg)


def test_extra_rows_are_parsed_and_bad_ones_named():
  cfg = demo.get_config('ablate')
  cfg.ablation.rows = 'full'
  cfg.ablation.extra = ' beta3: distill.kl.beta=0.3, distill.group_norm=false ;anc:sampler.kind=ancestral'
  rows = ablation.select_rows(cfg)
  assert [r.name for r in rows] == ['full', 'beta3', 'anc']
  beta3 = ablation.row_config(cfg, rows[1])
  assert beta3.distill.kl.beta == 0.3 and beta3.distill.group_norm is False
  assert beta3.sampler.kind == 'rgas' and ablation.row_sampler(beta3) == 'rgas'
  assert ablation.row_sampler(ablation.row_config(cfg, rows[2])) == 'ancestral'
  # Equal training settings share one distillation (the sampler is not one of them).
  assert ablation.training_key(ablation.row_config(cfg, rows[2])) == ablation.training_key(
      ablation.row_config(cfg, rows[0]))
  # A row recorded before distill.reward_source / reward_judge existed is still recognised: at
  # their defaults they are not part of the key, at another value they are.
  full = ablation.row_config(cfg, rows[0])
  old_run = json.loads(json.dumps(full.to_dict()))
  del old_run['distill']['reward_source'], old_run['distill']['reward_judge']
  old_key = ablation.training_key(ml_collections.ConfigDict(old_run))
  assert ablation.training_key(full) == old_key
  full.distill.reward_source = 'judge'
  assert ablation.training_key(full) != old_key
  for extra, fragment in [('nocolon', 'before a colon'), ('x:distill.nope=1', 'unknown config key'),
                          ('x:distill.kl.beta', 'not key=value'), ('x:distill.kl.beta=a',
                                                                   'must be a number'),
                          ('x:model.length=8', 'not under'), ('x:', 'sets nothing'),
                          ('full:distill.kl.beta=0.1', 'is taken'),
                          ('x:distill.kl=1', 'is a section')]:
    cfg.ablation.extra = extra
    with pytest.raises(errors.ConfigError, match=fragment) as info:
      ablation.select_rows(cfg)
    assert '\n' not in str(info.value)
  cfg.ablation.extra = ''
  cfg.ablation.rows = 'chain,with_omga'
  with pytest.raises(errors.ConfigError, match="unknown row 'with_omga'"):
    ablation.select_rows(cfg)
  cfg.ablation.rows = 'chain'
  cfg.distill.omega.mode = 'constant'
  with pytest.raises(errors.ConfigError, match='omega is off'):
    ablation.select_rows(cfg)


def test_ablate_is_checked_before_any_work(tmp_path):
  cfg = demo.get_config('ablate')
  cfg.eval.extra_judges = ''
  cfg.ablation.extra = 'bad:distill.kl.beta=2'           # beta must lie in [0, 1]
  with pytest.raises(errors.ConfigError, match="ablation row 'bad'.*kl.beta"):
    jobs.check(cfg)
  cfg.ablation.extra = ''
  cfg.ablation.seeds = 0
  with pytest.raises(errors.ConfigError, match='ablation.seeds=0'):
    jobs.check(cfg)
  cfg.ablation.seeds = 1
  cfg.teacher.checkpoint = ''
  with pytest.raises(errors.ConfigError, match='teacher.checkpoint'):
    jobs.check(cfg)


# ------------------------------------------------------------------------------- table maths


def _res(row, seed, nfe, ppl, ci, ent=4.0):
  return {'row': row, 'seed': seed, 'nfe': nfe, 'sampler': 'rgas', 'entropy': ent,
          'entropy_ci': [ent - 0.1, ent + 0.1],
          'judges': {'j': {'gen_ppl': ppl, 'gen_ppl_ci': ci}, 'k': {'gen_ppl': 2 * ppl,
                                                                     'gen_ppl_ci': ci}}}


def test_table_maths_against_hand_computed_numbers():
  chain = {r.name: r for r in ablation.chain_rows()}
  loo = {r.name: r for r in ablation.loo_rows()}
  rows = [chain['baseline'], chain['with_coupled_time'], chain['full'], loo['no_omega']]
  results = [
      _res('baseline', 1, 8, 100.0, [90.0, 110.0]), _res('baseline', 2, 8, 120.0, [100.0, 130.0]),
      _res('with_coupled_time', 1, 8, 60.0, [50.0, 70.0]),
      _res('with_coupled_time', 2, 8, 70.0, [60.0, 80.0], ent=5.0),
      _res('full', 1, 8, 40.0, [35.0, 45.0]), _res('full', 2, 8, 44.0, [40.0, 50.0]),
      _res('no_omega', 1, 8, 50.0, [45.0, 55.0]), _res('no_omega', 2, 8, 54.0, [50.0, 60.0]),
      _res('baseline', 1, 16, 80.0, [70.0, 90.0]),
  ]
  entries = ablation.summarize(rows, results, ['j', 'k'])
  by = {(e['row'], e['nfe']): e for e in entries}
  assert [(e['row'], e['nfe']) for e in entries] == [
      ('baseline', 8), ('baseline', 16), ('with_coupled_time', 8), ('full', 8), ('no_omega', 8)]
  b = by[('baseline', 8)]['judges']['j']
  assert b['gen_ppl'] == pytest.approx(110.0) and b['gen_ppl_ci'] == pytest.approx([95.0, 120.0])
  assert b['seed_sd'] == pytest.approx(np.sqrt(200.0))          # (100, 120): sd = 14.142
  assert b['seed_range'] == [100.0, 120.0] and b['per_seed'] == [100.0, 120.0]
  assert b['delta_previous'] is None and b['previous'] is None
  assert b['delta_full']['abs'] == pytest.approx(110.0 - 42.0)
  assert b['delta_full']['rel'] == pytest.approx(110.0 / 42.0 - 1)
  c = by[('with_coupled_time', 8)]['judges']['j']
  assert c['gen_ppl'] == pytest.approx(65.0) and c['seed_sd'] == pytest.approx(np.sqrt(50.0))
  assert c['previous'] == 'baseline'                             # the previous chain row present
  assert c['delta_previous']['abs'] == pytest.approx(65.0 - 110.0)
  assert c['delta_previous']['rel'] == pytest.approx(65.0 / 110.0 - 1)
  assert by[('with_coupled_time', 8)]['entropy'] == pytest.approx(4.5)
  assert by[('with_coupled_time', 8)]['entropy_seed_sd'] == pytest.approx(np.sqrt(0.5))
  f = by[('full', 8)]['judges']['j']
  assert f['delta_previous']['abs'] == pytest.approx(42.0 - 65.0) and f['delta_full'] is None
  n = by[('no_omega', 8)]['judges']['j']
  assert n['delta_previous'] is None                              # not a chain row
  assert n['delta_full']['abs'] == pytest.approx(52.0 - 42.0)
  assert n['delta_full']['rel'] == pytest.approx(52.0 / 42.0 - 1)
  assert by[('no_omega', 8)]['judges']['k']['delta_full']['abs'] == pytest.approx(104.0 - 84.0)
  # NFE 16 has only the baseline (one seed): no spread, nothing to compare with.
  b16 = by[('baseline', 16)]['judges']['j']
  assert b16['seed_sd'] is None and b16['delta_full'] is None
  cfg = demo.get_config('ablate')
  md = ablation.markdown(entries, [], {'j': {'context': 8}, 'k': {'context': 9}}, cfg)
  assert '| with_coupled_time | 8 | 65.00 [55.00, 75.00] ±7.07 sd, 2 seeds (60.00–70.00) | ' \
         '-45.00 (-40.9%) vs baseline | +23.00 (+54.8%) |' in md
  assert md.count('## Gen PPL, judge') == 2


# ------------------------------------------------------------------------------- byte judge


def tiny_ar_config(length=24):
  cfg = config_lib.model_config('tiny', vocab_size=257, length=length)
  cfg.kind = 'ar'
  cfg.dropout = 0.0
  cfg.compute_dtype = 'float32'
  return cfg


@pytest.fixture(scope='module')
def ar_judges(tmp_path_factory):
  """A random-init byte-level AR model as an export (.safetensors) and as a pretrain run dir."""
  root = tmp_path_factory.mktemp('judges')
  mcfg = tiny_ar_config()
  model = models.build(mcfg, seed=3)
  path = str(root / 'judge.safetensors')
  exporter.save_ours(path, {'teacher': nnx.to_pure_dict(nnx.state(model, nnx.Param))},
                     model_cfg=mcfg)
  run = str(root / 'run')
  cfg = demo.get_config('teacher')
  cfg.model = tiny_ar_config(32)
  tx = pretrain.make_optimizer(cfg.pretrain)
  state = jax.jit(lambda: pretrain._fresh_state(cfg, tx, 5))()  # pylint: disable=protected-access
  mngr = Manager(os.path.join(run, 'checkpoints'), async_save=False)
  mngr.save(0, state, {}, pretrain.checkpoint_meta(cfg, 'pretrain'))
  mngr.close()
  return {'file': path, 'run': run, 'model': model, 'run_model': models.build(
      cfg.model, seed=5)}


def numpy_recount(model, texts, context):
  """Σ counted NLL and #counted per text, from the model's logits with NumPy (§10 rule)."""
  rows = []
  for t in texts:
    ids = []
    for i, part in enumerate(t.split('<|endoftext|>')):
      if i:
        ids.append(256)
      ids.extend(part.encode('utf-8'))
    rows.append(ids[:context])
  width = max(len(r) for r in rows)
  batch = np.full((len(rows), context), 256, np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
  logits = np.asarray(model(jnp.asarray(batch)), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll, count = [], []
  for i, r in enumerate(rows):
    total, n, eos_seen = 0.0, 0, 0
    for pos in range(width):
      tok = r[pos] if pos < len(r) else 256          # pad = EOS, up to the longest row
      eos_seen += tok == 256
      if pos == 0 or (tok == 256 and eos_seen > 1):
        continue
      total += -logp[i, pos - 1, tok]
      n += 1
    nll.append(total)
    count.append(n)
  return np.array(nll), np.array(count)


def test_byte_judge_counts_like_a_numpy_recount(ar_judges):
  judge = judges.load_judge(ar_judges['file'], 20)
  assert judge.eos_id == judge.pad_id == 256 and judge.context == 20
  nll, count = judge.score_texts(TEXTS, batch_size=2)
  want_nll, want_count = numpy_recount(ar_judges['model'], TEXTS, 20)
  np.testing.assert_array_equal(count, want_count)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
  assert list(count[1:3]) == [9, 1]     # 2nd EOS and pads not counted; 'a' counts its 1st pad
  # A pretrain run directory loads the same way (EMA weights), context 0 = the model length.
  eval_cfg = config_lib.base_config().eval
  eval_cfg.extra_judges = ar_judges['run']
  (run_judge,) = judges.load_extra_judges(eval_cfg)
  assert run_judge.context == 32
  nll2, count2 = run_judge.score_texts(TEXTS[:2])
  want2 = numpy_recount(ar_judges['run_model'], TEXTS[:2], 32)
  np.testing.assert_array_equal(count2, want2[1])
  np.testing.assert_allclose(nll2, want2[0], rtol=1e-5)


def test_demo_bytes_names_the_asset_and_its_recipe(monkeypatch, tmp_path):
  monkeypatch.setattr(judges, 'DEMO_JUDGE', str(tmp_path / 'missing.safetensors'))
  with pytest.raises(FileNotFoundError, match='configs/demo.py:judge.*convert'):
    judges.load_judge('demo-bytes', 16)
  cfg = demo.get_config('')
  cfg.job = 'sweep'
  with pytest.raises(errors.ConfigError, match='demo-bytes.*missing') as info:
    jobs.check(cfg)
  assert '\n' not in str(info.value)
  assert cfg.eval.judge == 'smollm2' and cfg.eval.extra_judges == 'demo-bytes'
  cfg.eval.extra_judges = 'smollm2'
  with pytest.raises(errors.ConfigError, match='repeats eval.judge'):
    jobs.check(cfg)
  cfg.eval.extra_judges = str(tmp_path / 'nope.safetensors')
  with pytest.raises(errors.ConfigError, match='is not a judge'):
    jobs.check(cfg)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('abl_teacher')
  work = str(root / 'teacher')
  cli.run_job(smoke_cfg(root, **{'job': 'pretrain', 'pretrain.num_steps': 4}), work)
  return root, work


def ablate_cfg(root, teacher, ar_judges):
  return smoke_cfg(root, **{
      'job': 'ablate', 'teacher.checkpoint': teacher, 'distill.num_iterations': 4,
      'distill.batch_size': 2, 'distill.log_every': 1, 'distill.sample_every': 0,
      'checkpoint.every': 100, 'ablation.rows': 'with_regularisation,full,no_omega',
      'sweep.models': 'teacher,student', 'sweep.nfes': '2', 'sweep.teacher_nfes': '2',
      'eval.judge': ar_judges['file'], 'eval.judge_context': 16,
      'eval.extra_judges': ar_judges['run'], 'eval.num_samples': 4, 'eval.bootstrap': 20,
      'eval.judge_batch_size': 4, 'sample.batch_size': 4})


def test_ablation_end_to_end_stop_and_resume(teacher_dir, ar_judges, monkeypatch, tmp_path):
  root, teacher = teacher_dir
  # Uninterrupted.
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(0, 1))
  work_a = str(tmp_path / 'a')
  out_a = cli.run_job(ablate_cfg(root, teacher, ar_judges), work_a)
  assert 'stopped' not in out_a
  assert out_a['distilled'] == [('with_regularisation', 1), ('no_omega', 1)]
  assert out_a['reused_runs'] == [('full', 1)]          # full = with_regularisation + RGAS
  table_a = json.load(open(out_a['table_json'], encoding='utf-8'))
  entries = {e['row']: e for e in table_a['entries']}
  assert list(entries) == ['with_regularisation', 'full', 'no_omega']
  assert entries['full']['sampler'] == 'rgas' and entries['with_regularisation']['sampler'] == \
      'ancestral'
  judge_names = [ar_judges['file'], ar_judges['run']]
  for e in entries.values():
    assert sorted(e['judges']) == sorted(judge_names)
    for rec in e['judges'].values():
      assert rec['gen_ppl_ci'][0] <= rec['gen_ppl'] <= rec['gen_ppl_ci'][1]
  assert entries['no_omega']['judges'][judge_names[0]]['delta_full'] is not None
  assert entries['full']['judges'][judge_names[0]]['previous'] == 'with_regularisation'
  assert [t['nfe'] for t in table_a['teacher']] == [2]
  md = open(out_a['table'], encoding='utf-8').read()
  assert md.count('## Gen PPL, judge') == 2 and 'Teacher (ancestral' in md
  assert os.path.getsize(out_a['plot']) > 1000
  rows_dir = os.path.join(work_a, 'ablation', 'rows')
  assert sorted(os.listdir(rows_dir)) == ['no_omega', 'with_regularisation']

  # Stopped at iteration 2 of the second distillation, then resumed.
  work_b = str(tmp_path / 'b')
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(2, 2))
  out = cli.run_job(ablate_cfg(root, teacher, ar_judges), work_b)
  assert out['stopped'] == 'no_omega' and out['step'] == 2
  second = os.path.join(work_b, 'ablation', 'rows', 'no_omega', 'seed1')
  first = os.path.join(work_b, 'ablation', 'rows', 'with_regularisation', 'seed1')
  assert ablation._latest_step(second) == 2               # pylint: disable=protected-access
  partial = json.load(open(out['table_json'], encoding='utf-8'))
  assert partial['entries'] == [] and 'stopped in row no_omega' in partial['notes'][0]
  assert not os.path.exists(os.path.join(work_b, 'ablation', ablation.CELLS))  # nothing judged
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(0, 1))
  cfg = ablate_cfg(root, teacher, ar_judges)
  cfg.ablation.stage = 'distill'
  out_d = cli.run_job(cfg, work_b)
  assert out_d['distilled'] == [('no_omega', 1)]          # the first row is not run again
  assert out_d['reused_runs'] == [('with_regularisation', 1), ('full', 1)]
  assert out_d['stage'] == 'distill' and out_d['cells_computed'] == 0
  assert not os.path.exists(os.path.join(work_b, 'ablation', ablation.CELLS))
  out_b = cli.run_job(ablate_cfg(root, teacher, ar_judges), work_b)
  assert out_b['distilled'] == []
  assert out_b['reused_runs'] == [('with_regularisation', 1), ('full', 1), ('no_omega', 1)]
  assert out_b['cells_computed'] == 4                     # teacher + three rows, judged once
  assert sorted(read_metrics(first, 'd_loss')) == [1, 2, 3, 4]     # each iteration once
  assert sorted(read_metrics(second, 'd_loss')) == [1, 2, 3, 4]
  table_b = json.load(open(out_b['table_json'], encoding='utf-8'))
  strip = lambda es: [{k: v for k, v in e.items()} for e in es]  # noqa: E731
  assert strip(table_b['entries']) == strip(table_a['entries'])
  # A third run reuses everything.
  out_c = cli.run_job(ablate_cfg(root, teacher, ar_judges), work_b)
  assert out_c['distilled'] == [] and out_c['cells_computed'] == 0
  # The same workdir with other switches for a row is refused before any work.
  cfg = ablate_cfg(root, teacher, ar_judges)
  cfg.distill.kl.beta = 0.25
  with pytest.raises(errors.ConfigError, match='other settings.*kl.beta'):
    cli.run_job(cfg, work_b)


# ------------------------------------------------------------------------------- compare job


def test_compare_budget_matches_didis_training_flops():
  cfg = demo.get_config('compare')
  s = cfg.distill.sdtt
  per_sdtt = sdtt.flops_per_iteration(cfg.model, s.batch_size)
  # 5 forwards a row: two teacher forwards, the student's forward and its backward (2 forwards).
  assert per_sdtt == 5 * s.batch_size * cost_lib.student_forward_flops(cfg.model)
  r_it = compare.sdtt_round_iterations(cfg)
  total = compare.didi_flops(cfg)
  assert r_it * s.rounds * per_sdtt >= total > (r_it - 1) * s.rounds * per_sdtt
  cfg.compare.budget = 'iterations'
  assert compare.sdtt_round_iterations(cfg) == -(-cfg.distill.num_iterations // s.rounds)
  cfg.compare.budget = 'config'
  assert compare.sdtt_round_iterations(cfg) == s.round_iterations
  rows = {r.name: ablation.row_config(cfg, r) for r in compare.rows(cfg)}
  assert list(rows) == ['didi', 'didi_rgas', 'sdtt']
  assert [rows[n].sampler.kind for n in rows] == ['ancestral', 'rgas', 'ancestral']
  assert [rows[n].distill.method for n in rows] == ['didi', 'didi', 'sdtt']
  assert ablation.training_key(rows['didi']) == ablation.training_key(rows['didi_rgas'])


def test_compare_end_to_end_stop_in_sdtt_and_resume(teacher_dir, ar_judges, monkeypatch,
                                                    tmp_path):
  root, teacher = teacher_dir
  cfg = ablate_cfg(root, teacher, ar_judges)
  # DiDi: 3 iterations; SDTT: 'iterations' budget over 2 rounds -> 2 x 2 = 4 iterations. The
  # teacher's frontier at T=0.02 (the tiny teacher is near uniform) and 1 (the grid's teacher
  # row), and MAUVE.
  over = {'job': 'compare', 'compare.budget': 'iterations', 'distill.num_iterations': 3,
          'distill.sdtt.rounds': 2, 'distill.sdtt.teacher_steps': 8,
          'distill.sdtt.batch_size': 2, 'distill.sdtt.warmup_steps': 1,
          'sweep.frontier_temperatures': '0.02,1.0', 'eval.mauve': True}
  for k, v in over.items():
    ablation._set(cfg, k, v)                                # pylint: disable=protected-access
  work = str(tmp_path / 'c')
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(2, 3))   # in SDTT's second round
  out = cli.run_job(cfg, work)
  assert out['stopped'] == 'sdtt' and out['step'] == 3 and out['distilled'] == [
      ('didi', 1), ('sdtt', 1)]
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(0, 1))
  out = cli.run_job(cfg, work)
  assert out['distilled'] == [('sdtt', 1)] and out['reused_runs'] == [('didi', 1),
                                                                     ('didi_rgas', 1)]
  rows_dir = os.path.join(work, 'compare', 'rows')
  assert sorted(os.listdir(rows_dir)) == ['didi', 'sdtt']   # DiDi's two rows share one run
  assert sorted(read_metrics(os.path.join(rows_dir, 'sdtt', 'seed1'), 'loss')) == [1, 2, 3, 4]
  assert out['cells_computed'] == 5                 # teacher at T=1 and 0.02 + three rows
  table = json.load(open(out['table_json'], encoding='utf-8'))
  got = [(r['model'], r['sampler'], r['nfe'], r['temperature']) for r in table['rows']]
  assert got == [('teacher', 'ancestral', 2, 1.0), ('teacher', 'ancestral', 2, 0.02),
                 ('didi', 'ancestral', 2, 1.0), ('didi_rgas', 'rgas', 2, 1.0),
                 ('sdtt', 'ancestral', 2, 1.0)]
  judge_names = [ar_judges['file'], ar_judges['run']]
  for r in table['rows']:
    assert r['gen_ppl_ci'][0] <= r['gen_ppl'] <= r['gen_ppl_ci'][1]
    assert sorted(r['judges']) == sorted(judge_names)
    assert 0.0 <= r['mauve']['mauve'] <= 1.0 and r['mauve']['protocol']['num_samples'] == 4
  assert table['rows'][4]['source'].endswith(os.path.join('sdtt', 'seed1'))
  # Each student row's gap, per judge, is the frontier of the recorded teacher cells at the row's
  # entropy (an independent NumPy interpolation of the per-sample scores the cells point to).
  cells_dir = os.path.join(work, 'compare')

  def scores(r, j):
    with np.load(os.path.join(cells_dir, r['per_sample'])) as z:
      k = list(z['judges']).index(j)
      return z['nll_sum'][k], z['count'][k], z['entropy']

  def point(r, j):
    nll, count, ent = scores(r, j)
    return float(np.mean(ent)), float(np.exp(nll.sum() / count.sum()))

  teacher_rows = sorted(table['rows'][:2], key=lambda r: point(r, judge_names[0])[0])
  for r in table['rows'][2:]:
    for j in judge_names:
      (h0, g0), (h1, g1) = [point(t, j) for t in teacher_rows]
      assert h1 > h0 + 0.1                         # T=0.02 is a distinct point of the frontier
      h, g = point(r, j)
      f = np.exp(np.log(g0) + (h - h0) / (h1 - h0) * (np.log(g1) - np.log(g0)))
      rec = r['frontier'][j]
      np.testing.assert_allclose([rec['teacher_gen_ppl'], rec['gap'], rec['entropy']],
                                 [f, g - f, h], rtol=1e-6)
      assert rec['extrapolated'] == (not min(h0, h1) <= h <= max(h0, h1))
      # The interval: frontier.gap's bootstrap of those cells, eval.bootstrap resamples.
      want = frontier.gap(frontier.Samples(*scores(r, j)),
                          [frontier.Samples(*scores(t, j)) for t in teacher_rows],
                          n_bootstrap=cfg.eval.bootstrap, seed=cfg.eval.seed)
      assert rec['gap_ci'] == want['gap_ci'] and rec['verdict'] == want['verdict']
      assert rec['verdict'] in (('extrapolated',) if rec['extrapolated'] else
                                ('below', 'above', 'tie'))
  md = open(out['table'], encoding='utf-8').read()
  assert 'DiDi-Instruct against SDTT' in md and '| sdtt | ancestral |' in md
  assert '| didi_rgas | rgas |' in md and "compare.budget='iterations'" in md
  assert all(f'gap to teacher frontier {j} [95% CI]' in md for j in judge_names)
  assert '| MAUVE |' in md and 'T=0.02' in md
  sdtt_line = next(x for x in md.splitlines() if x.startswith('| sdtt | ancestral |'))
  gap = table['rows'][4]['frontier'][judge_names[0]]['gap']
  assert f'| {gap:.2f} [' in sdtt_line
  assert os.path.getsize(out['curve']) > 1000
  # The teacher's two temperatures keep two sample files.
  assert len(glob.glob(os.path.join(cells_dir, 'samples', 'ablation_teacher_*'))) == 2
  again = cli.run_job(cfg, work)
  assert again['distilled'] == [] and again['cells_computed'] == 0
  # A cell whose per-sample scores are gone is computed again (the gap needs them), not reused.
  os.remove(os.path.join(cells_dir, table['rows'][4]['per_sample']))
  again = cli.run_job(cfg, work)
  assert again['cells_computed'] == 1 and again['cells_reused'] == 4
  rows = json.load(open(again['table_json'], encoding='utf-8'))['rows']
  assert len(rows) == 5 and rows[4]['frontier'] == table['rows'][4]['frontier']
