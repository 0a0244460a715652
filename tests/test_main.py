"""What users hit at the command line: stops between and within pipeline stages, one-line errors
for bad files and workdirs, every config value checked before any work, and the API on run
directories, and runs that start without libtpu's failed TPU probe (tests for
`didi_jax/main.py`, `jobs.py`, `errors.py`, `artifacts.py`, `api.py`, `__init__.py`)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import didi_jax
from didi_jax import api, artifacts, errors, jobs
from didi_jax.checkpoint import loader
from didi_jax import config as config_lib
from didi_jax import main as cli
from didi_jax.train import common
from tests.test_cli import ROOT, env, read_metrics, smoke_cfg


# ------------------------------------------------------------------------------- pipeline stops


def stop_in_flag(instance: int, at_call: int):
  """A StopFlag class whose `instance`-th object (1-based, one per stage) asks to stop at its
  `at_call`-th check, as if SIGTERM arrived during that stage."""
  class Flag(common.StopFlag):
    made = 0

    def __init__(self):
      super().__init__()
      Flag.made += 1
      self.index, self.calls = Flag.made, 0

    def should_stop(self, step=0, sync_every=10):
      self.calls += 1
      return self.index == instance and self.calls >= at_call
  return Flag


def test_a_stopped_stage_ends_the_pipeline_and_a_rerun_resumes_it(tmp_path, monkeypatch):
  over = {'job': 'pipeline', 'pretrain.num_steps': 4, 'distill.num_iterations': 4,
          'distill.batch_size': 2, 'distill.log_every': 1, 'distill.sample_every': 0,
          'checkpoint.every': 100}
  work = str(tmp_path / 'run')
  swept = []
  monkeypatch.setattr(jobs, 'sweep_job', lambda cfg, w: swept.append(w) or {'rows': 0})
  # 1. SIGTERM during the teacher's pre-training: nothing after it runs.
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(1, 2))
  out = cli.run_job(smoke_cfg(tmp_path, **over), work)
  assert out['stopped'] == 'pretrain' and out['pretrain']['step'] == 2
  assert 'distill' not in out and not swept
  assert loader.checkpoint_dir(work) is None                 # no distillation checkpoint
  # 2. Re-run: the teacher finishes; SIGTERM during distillation: no sweep of a partial student.
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(2, 2))
  out = cli.run_job(smoke_cfg(tmp_path, **over), work)
  assert out['pretrain']['step'] == 4 and out['pretrain']['complete']
  assert out['stopped'] == 'distill' and out['distill']['step'] == 2 and not swept
  # 3. Re-run: distillation resumes from iteration 2 and the sweep runs once, at the end.
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(0, 1))
  out = cli.run_job(smoke_cfg(tmp_path, **over), work)
  assert 'stopped' not in out and out['distill']['complete'] and swept == [work]
  assert sorted(read_metrics(work, 'd_loss')) == [1, 2, 3, 4]     # each iteration once
  assert sorted(read_metrics(os.path.join(work, 'teacher'))) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- bad files


def _bad_files(tmp_path):
  good = os.path.join(ROOT, 'didi_jax', 'assets', 'demo_teacher', 'teacher.safetensors')
  blob = open(good, 'rb').read()
  rng = np.random.default_rng(0)
  files = {'empty.ckpt': b'', 'random.ckpt': rng.bytes(4096), 'empty.safetensors': b'',
           'random.safetensors': rng.bytes(4096), 'truncated.safetensors': blob[:len(blob) // 3],
           'truncated.ckpt': b'PK\x03\x04' + rng.bytes(100)}
  paths = {}
  for name, data in files.items():
    paths[name] = str(tmp_path / name)
    with open(paths[name], 'wb') as f:
      f.write(data)
  return paths


def test_unreadable_teacher_files_are_user_errors(tmp_path):
  for name, path in _bad_files(tmp_path).items():
    with pytest.raises(errors.CheckpointError) as info:
      loader.load(path, 'teacher')
    message = str(info.value)
    assert path in message and '\n' not in message.strip(), (name, message)


def test_truncated_teacher_gives_one_line_at_the_cli(tmp_path):
  path = _bad_files(tmp_path)['truncated.safetensors']
  out = subprocess.run(
      [sys.executable, '-m', 'didi_jax.main', '--config=configs/demo.py:smoke',
       f'--workdir={tmp_path}/w', '--config.job=distill', f'--config.teacher.checkpoint={path}'],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  lines = [ln for ln in out.stderr.splitlines() if ln.startswith('error:')]
  assert len(lines) == 1 and 'truncated.safetensors' in lines[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


# ------------------------------------------------------------------------------- workdirs


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(errors.WorkdirError, match='is a file'):
    artifacts.ensure_workdir(str(a_file))
  with pytest.raises(errors.WorkdirError, match='cannot be written'):
    artifacts.ensure_workdir(str(a_file / 'below'))         # parent is a file
  with pytest.raises(errors.WorkdirError, match='cannot be written'):
    artifacts.ensure_workdir('/proc/didi_jax_no_such_dir')  # a read-only file system
  fresh = tmp_path / 'new' / 'run'
  assert artifacts.ensure_workdir(str(fresh)) == str(fresh) and fresh.is_dir()
  assert os.listdir(fresh) == []                            # the probe file is removed
  out = subprocess.run(
      [sys.executable, '-m', 'didi_jax.main', '--config=configs/demo.py:smoke',
       f'--workdir={a_file}'], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith('error: --workdir')
  assert 'Traceback' not in out.stderr


# ------------------------------------------------------------------------------- early checks


@pytest.mark.parametrize('key,value,fragment', [
    ('sample.batch_size', -8, 'sample.batch_size=-8'),
    ('sample.num_samples', 0, 'sample.num_samples=0'),
    ('distill.batch_size', -2, 'distill.batch_size=-2'),
    ('distill.group_size', 0, 'distill.group_size=0'),
    ('eval.judge_batch_size', 0, 'eval.judge_batch_size=0'),
    ('pretrain.eval_every', 0, 'pretrain.eval_every=0'),
    ('checkpoint.every', -1, 'checkpoint.every=-1'),
    ('distill.label_smoothing', 0.5, 'distill.label_smoothing=0.5'),
    ('sampler.rgas.h_start', -1.0, 'sampler.rgas.h_start=-1.0'),
    ('distill.optim.disc.warmup_steps', 0, 'distill.optim.disc.warmup_steps=0'),
    ('sweep.nfes', '8,x', 'sweep.nfes'),
    ('sweep.samplers', 'ancestral,beam', "'beam'"),
    ('sweep.frontier_temperatures', '0.8,0', 'sweep.frontier_temperatures'),
    ('eval.mauve_buckets', -1, 'eval.mauve_buckets=-1'),
    ('eval.mauve_scaling', 0.0, 'eval.mauve_scaling=0.0'),
    ('eval.mauve_feature', 'max', "eval.mauve_feature='max'"),
])
def test_every_value_is_checked_before_any_work(key, value, fragment):
  from configs import demo
  cfg = demo.get_config('smoke')
  node = cfg
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match=fragment.replace('.', r'\.').replace('[', r'\[')):
    config_lib.validate(cfg)


def test_every_range_checked_field_exists_and_defaults_pass():
  cfg = config_lib.base_config()
  for key in config_lib._RANGES:     # pylint: disable=protected-access
    config_lib._get(cfg, key)        # pylint: disable=protected-access
  from configs import demo, owt
  for c in (demo.get_config(''), demo.get_config('smoke'), owt.get_config('')):
    config_lib.validate(c)


def test_float64_sampling_needs_x64_before_any_work():
  from configs import demo
  cfg = demo.get_config('smoke')
  cfg.sampler.precision = 'float64'
  if jax.config.jax_enable_x64:
    pytest.skip('this process runs with 64-bit JAX enabled')
  with pytest.raises(errors.ConfigError, match='JAX_ENABLE_X64'):
    config_lib.validate(cfg)
  cfg.job = 'pretrain'                   # a pre-training run never samples
  config_lib.validate(cfg)


def test_user_error_classes_share_one_base():
  from didi_jax.checkpoint import importer, manager, torch_ckpt
  from didi_jax.data import packing, sources
  for cls in (config_lib.ConfigError, sources.DataError, packing.PackingError,
              importer.CheckpointError, manager.CheckpointError, torch_ckpt.TorchFormatError,
              errors.WorkdirError):
    assert issubclass(cls, errors.UserError), cls
  assert importer.CheckpointError is manager.CheckpointError


# ------------------------------------------------------------------------------- API on run dirs


def test_api_loads_run_directories(tmp_path):
  work = str(tmp_path / 'teacher')
  cli.run_job(smoke_cfg(tmp_path, **{'job': 'pretrain', 'pretrain.num_steps': 2}), work)
  den = api.load_denoiser(work)
  net = loader.load(work, 'teacher')
  L = net.model_cfg.length
  ids = jax.random.randint(jax.random.key(0), (2, L), 0, net.model_cfg.vocab_size)
  sigma = jnp.zeros((2,))
  want = np.asarray(net.model()(ids, sigma), np.float32)
  np.testing.assert_allclose(np.asarray(den(ids, sigma), np.float32), want, rtol=1e-5,
                             atol=1e-5)
  assert float(np.abs(want).max()) > 0
  raw = api.load_denoiser(work, weights='raw')
  assert not np.allclose(np.asarray(raw(ids, sigma)), want)    # raw weights differ from EMA
  with pytest.raises(ValueError, match='pre-training run'):
    api.load_discriminator(work)


def test_rerun_after_a_kill_logs_each_step_once(tmp_path):
  """A SIGKILL after step 3 was logged but before its checkpoint: the re-run resumes at 2 and
  logs 3 again, so the stale row must go (not appear twice)."""
  work = str(tmp_path / 'run')
  over = {'job': 'pretrain', 'checkpoint.every': 2}
  cli.run_job(smoke_cfg(tmp_path, **over, **{'pretrain.num_steps': 2}), work)
  with open(os.path.join(work, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 3, "loss": 123.0}\n{"step": 4, "lo')      # killed mid-write
  cli.run_job(smoke_cfg(tmp_path, **over, **{'pretrain.num_steps': 4}), work)
  steps = [json.loads(line)['step'] for line in open(os.path.join(work, 'metrics.jsonl'),
                                                      encoding='utf-8') if '"loss"' in line]
  assert steps == [1, 2, 3, 4]
  assert read_metrics(work)[3] != 123.0


# ------------------------------------------------------------------------------- libtpu noise


LIBTPU_NOISE = ('Failed to find host bounds', 'E0000', 'INVALID_ARGUMENT',
                'Source Location Trace', 'TPU_WORKER_HOSTNAMES')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='the lock file brings '
                    'libtpu; without it there is no probe to silence')
def test_cpu_runs_start_clean_with_libtpu_installed(tmp_path):
  """The README's first command installs libtpu; on a machine without a TPU a run's stderr
  must not open with libtpu's failed probe. (ALLOW_MULTIPLE_LIBTPU_LOAD lets the probe run even
  while another process holds libtpu's lock file, as a fresh machine would.)"""
  environment = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  environment.update(PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD='1',
                     XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = subprocess.run([sys.executable, '-m', 'didi_jax.generate', '--checkpoint=demo',
                        '--prompt=ROMEO:', '--length=8', '--nfe=1'], cwd=str(tmp_path),
                       env=environment, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert not any(n in out.stderr for n in LIBTPU_NOISE), out.stderr
  assert out.stderr.startswith('1 sample(s) in')                 # the job's own first line
  probe = ('import didi_jax, jax, os; print(os.environ["JAX_PLATFORMS"], '
           'jax.default_backend())')
  out = subprocess.run([sys.executable, '-c', probe], cwd=str(tmp_path), env=environment,
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ['cpu', 'cpu'] and not out.stderr, out.stderr
  # What the user sets is left alone.
  assert didi_jax.platforms_without_tpu() is None              # conftest set JAX_PLATFORMS
