"""A bad day ends in one line with nothing lost (`didi_jax/checkpoint/manager.py`,
`didi_jax/train/loop.py`): a full disk during a checkpoint save, and a damaged newest checkpoint,
for the toy loop (exact values) and for every stage of the real `pipeline` (pretrain, distill,
the loader that the sweep and sample jobs read through).

The full disk is injected where orbax writes in its background thread (the JSON item's write
raises OSError(ENOSPC) for one step), so the error travels the path a real one takes; the damage
is a data file of the newest step overwritten with 100 random bytes.
"""
import errno
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

from didi_jax import errors, jobs
from didi_jax import main as cli
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import manager as manager_lib
from tests import test_train_loop as toy
from tests.test_cli import ROOT, read_metrics, smoke_cfg

NOISE = ('Traceback', 'Event loop is closed', 'Errno 28', 'does not match this config')


def full_disk_save_fn(failing: set):
  """orbax's JSON item write, failing as a full disk does for the steps in `failing` (names)."""
  original = json_handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).split('.')[0] in failing:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await original(self, x, directory)
  return save_fn


@pytest.fixture
def disk_full_at(monkeypatch):
  """disk_full_at(step): from now on, saving `step` fails as a full disk does, in orbax's
  background write (the path a real ENOSPC takes); disk_full_at(None): space freed."""
  failing = set()
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', full_disk_save_fn(failing))
  return lambda step: failing.add(str(step)) if step is not None else failing.clear()


def damage(checkpoints: str, step: int, what: str = 'arrays') -> None:
  """Overwrites the array data files of `step` (what='arrays') or its data-iterator record
  (what='iterator') with 100 random bytes (a disk or copy gone wrong)."""
  files = glob.glob(os.path.join(checkpoints, str(step), 'state', 'd', '*') if what == 'arrays'
                    else os.path.join(checkpoints, str(step), 'data', 'metadata'))
  assert files
  for f in files:
    with open(f, 'wb') as fh:
      fh.write(np.random.default_rng(0).bytes(100))


def async_toy(monkeypatch):
  class Async(manager_lib.Manager):
    def __init__(self, directory, async_save=True, **kw):
      super().__init__(directory, async_save=True, **kw)
  monkeypatch.setattr(toy, 'Manager', Async)


def logged_steps(path) -> list:
  with open(path, encoding='utf-8') as f:
    return [r['step'] for r in map(json.loads, f) if 'loss' in r]


# ------------------------------------------------------------------------------ the toy loop


def test_full_disk_is_one_line_and_the_same_command_resumes_exactly(tmp_path, monkeypatch,
                                                                    capfd, disk_full_at):
  async_toy(monkeypatch)
  disk_full_at(8)                                  # saves at 4, 8, 10: the second one fails
  with pytest.raises(errors.DiskFullError) as e:
    toy.run(tmp_path)
  message = str(e.value)
  assert 'no space left' in message and 'step 8' in message and 'step 4' in message
  assert 'free space and run the same command' in message and '\n' not in message
  err = capfd.readouterr().err
  assert not err, err                               # the one line is the exception's message
  assert [s for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()] == ['4']
  disk_full_at(None)                                # space freed; the same command again
  first, out, _ = toy.run(tmp_path)
  assert first == 4 and out.complete
  assert out.last_periodic == {'seen_total': 55.0}  # 1 + ... + 10: no batch lost or repeated
  assert logged_steps(tmp_path / 'metrics.jsonl') == [3, 6, 9, 10]


@pytest.mark.parametrize('what', ['arrays', 'iterator'])
def test_damaged_newest_step_is_named_and_the_intact_one_resumes(tmp_path, capfd, what):
  toy.run(tmp_path)                                 # steps 4, 8, 10
  damage(str(tmp_path / 'checkpoints'), 10, what)
  capfd.readouterr()
  first, out, _ = toy.run(tmp_path, total=12)
  err = capfd.readouterr().err
  warnings = [ln for ln in err.splitlines() if ln.startswith('warning:')]
  assert len(warnings) == 1 and 'step 10 is damaged' in warnings[0], err
  assert 'using step 8' in warnings[0] and 'checkpoints.damaged' in warnings[0]
  assert not any(n in err for n in NOISE), err
  assert first == 8 and out.last_periodic == {'seen_total': 78.0}   # 1 + ... + 12, exactly
  assert os.listdir(tmp_path / 'checkpoints.damaged') == ['10']     # kept, not deleted
  assert logged_steps(tmp_path / 'metrics.jsonl') == [3, 6, 9, 12]   # once each, new cadence


def test_every_step_damaged_or_another_config_is_one_line_and_moves_nothing(tmp_path, capfd):
  toy.run(tmp_path, total=4)                        # step 4 only
  mngr = manager_lib.Manager(str(tmp_path / 'checkpoints'), async_save=False)
  wrong = {'step': np.zeros((), np.int32), 'total': np.zeros((3,), np.float32)}
  with pytest.raises(errors.CheckpointError, match='does not match this config'):
    mngr.restore(wrong)                             # the config's fault: not damage
  damage(str(tmp_path / 'checkpoints'), 4)
  with pytest.raises(manager_lib.CheckpointDamaged, match='every checkpoint') as e:
    mngr.restore({'step': np.zeros((), np.int32), 'total': np.zeros((), np.float32)})
  assert 'fresh --workdir' in str(e.value) and '\n' not in str(e.value)
  mngr.close()
  assert os.listdir(tmp_path / 'checkpoints') == ['4']
  assert not any(n in capfd.readouterr().err for n in NOISE)


# ------------------------------------------------------------------------------ the real jobs


PIPELINE = {'job': 'pipeline', 'pretrain.num_steps': 3, 'distill.num_iterations': 3,
            'distill.batch_size': 2, 'distill.log_every': 1, 'distill.sample_every': 0,
            'checkpoint.every': 2}                  # saves at 2 and 3


def params(work: str, role: str) -> dict:
  return jax.tree.map(np.asarray, dict(nnx.to_flat_state(loader.load(work, role).params)))


def assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_damaged_newest_step_in_every_pipeline_stage(tmp_path, monkeypatch, capfd):
  """pretrain and distill resume from their newest intact step (exactly: the same final
  networks and each step logged once); the loader (sweep, sample) reads the intact step."""
  work = str(tmp_path / 'run')
  teacher = os.path.join(work, 'teacher')
  swept = []
  monkeypatch.setattr(jobs, 'sweep_job', lambda cfg, w: swept.append(w) or {'rows': 0})
  cli.run_job(smoke_cfg(tmp_path, **PIPELINE), work)
  want_teacher, want_student = params(teacher, 'teacher'), params(work, 'student_ema')
  damage(os.path.join(teacher, 'checkpoints'), 3)
  damage(os.path.join(work, 'checkpoints'), 3)
  capfd.readouterr()
  loader.load(work, 'student_ema')                  # a reader: warns, moves nothing
  err = capfd.readouterr().err
  assert 'step 3 is damaged' in err and 'using step 2' in err and 'moved' not in err, err
  out = cli.run_job(smoke_cfg(tmp_path, **PIPELINE), work)
  err = capfd.readouterr().err
  warnings = [ln for ln in err.splitlines() if ln.startswith('warning:')]
  assert len(warnings) == 2 and all('step 3 is damaged' in w for w in warnings), err
  assert not any(n in err for n in NOISE), err
  assert out['pretrain']['complete'] and out['distill']['complete'] and swept == [work, work]
  assert_same(params(teacher, 'teacher'), want_teacher)
  assert_same(params(work, 'student_ema'), want_student)
  assert sorted(read_metrics(teacher)) == [1, 2, 3]
  assert sorted(read_metrics(work, 'd_loss')) == [1, 2, 3]


# `python -m didi_jax.main` with the disk full at one step, as a user runs it.
MAIN_WITH_FULL_DISK = (
    'import sys\n'
    'from orbax.checkpoint._src.handlers import json_checkpoint_handler as h\n'
    'from didi_jax import main\n'
    'from tests.test_bad_day import full_disk_save_fn\n'
    'h.JsonCheckpointHandler._save_fn = full_disk_save_fn({sys.argv.pop(1)})\n'
    'main.run_cli()\n')


def test_full_disk_in_pretraining_is_one_line_then_resumes_exactly(tmp_path, capfd):
  over = {'job': 'pretrain', 'pretrain.num_steps': 3, 'checkpoint.every': 1,
          'checkpoint.async_save': True}
  cfg = smoke_cfg(tmp_path, **over)
  ref = str(tmp_path / 'ref')
  cli.run_job(cfg, ref)
  work = str(tmp_path / 'run')
  flags = [f'--config.{k}={cfg[k.split(".")[0]][k.split(".")[1]]}' for k in (
      'job', 'data.source', 'data.paths', 'data.cache_dir', 'mesh.data', 'model.length',
      'pretrain.batch_size', 'pretrain.num_steps', 'pretrain.log_every', 'pretrain.eval_every',
      'checkpoint.every', 'checkpoint.async_save') if '.' in k] + ['--config.job=pretrain']
  environment = dict(os.environ, PYTHONPATH=ROOT,
                     XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = subprocess.run([sys.executable, '-c', MAIN_WITH_FULL_DISK, '3',
                        '--config=configs/demo.py:smoke', f'--workdir={work}'] + flags,
                       cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert out.stderr.startswith('error: no space left on the device while saving step 3 to ')
  assert out.stderr.count('\n') == 1, out.stderr          # one line, no traceback flood
  assert f'step 2 in {work}/checkpoints is intact; free space and run the same command' in \
      out.stderr
  steps = lambda: sorted(os.listdir(os.path.join(work, 'checkpoints')))  # noqa: E731
  assert [s for s in steps() if s.isdigit()] == ['1', '2']   # 3 unfinished: not a step
  capfd.readouterr()
  out = cli.run_job(cfg, work)                      # space freed: the same command again
  assert out['complete'] and 'resuming from' in capfd.readouterr().out
  assert steps()[-1] == '3' and all(s.isdigit() for s in steps())   # leftovers gone
  assert_same(params(work, 'teacher'), params(ref, 'teacher'))
  assert read_metrics(work) == read_metrics(ref)    # every step once, the same values


def _ci_run_with(tmp_path, avail_kib: dict, tmpdir: str):
  """`.ci/run` (a copy, in an empty tree) with `df` and `python3` faked: `df` answers from
  `avail_kib` ({path: (filesystem, free KiB)}), `python3` stands for the virtualenv step that
  follows the room check and only says it was reached (exit 7)."""
  tree = tmp_path / 'tree'
  (tree / '.ci').mkdir(parents=True)
  with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
    (tree / '.ci' / 'run').write_text(f.read())
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  table = '\n'.join(f'{p}) echo "{fs} 100 1 {kib} 1% {p}" ;;'
                    for p, (fs, kib) in avail_kib.items())
  (bindir / 'df').write_text('#!/usr/bin/env bash\nfor a in "$@"; do p="$a"; done\n'
                             'p="$(cd "$p" && pwd -P)"\necho "Filesystem 1K-blocks Used '
                             'Available Capacity Mounted"\ncase "$p" in\n' + table + '\n'
                             '*) echo "unknown path $p" >&2; exit 2 ;;\nesac\n')
  (bindir / 'python3').write_text('#!/usr/bin/env bash\necho "REACHED python3 $*"\nexit 7\n')
  for name in ('shellcheck', 'apt-get'):  # the install step, whatever the machine has
    (bindir / name).write_text('#!/usr/bin/env bash\nexit 0\n')
  for f in bindir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}', TMPDIR=tmpdir)
  return subprocess.run(['bash', str(tree / '.ci' / 'run')], capture_output=True, text=True,
                        env=env, check=False, timeout=60)


GiB = 1024 * 1024   # in KiB


@pytest.mark.parametrize('tree_free,tmp_free,same_fs,ok', [
    (4.0, None, True, True), (3.9, None, True, False),          # one filesystem: 4 GiB in all
    (3.0, 1.0, False, True), (2.9, 5.0, False, False), (9.0, 0.9, False, False),
    (3.0, 1.0, None, True)])                                    # TMPDIR missing: /tmp is used
def test_ci_run_checks_for_disk_room_first(tmp_path, tree_free, tmp_free, same_fs, ok):
  """A full disk stops CI with one line naming the fix before pip starts (the CI run of
  2026-12-07 died in pip with ENOSPC): 4 GiB where the tree and TMPDIR share a filesystem, else
  3 GiB for the tree and 1 GiB for TMPDIR (/tmp where TMPDIR is not a folder, as Python's
  tempfile does)."""
  tmpdir = tmp_path / 'tmpdir'
  tree = str((tmp_path / 'tree').resolve())
  avail = {tree: ('/dev/a', int(tree_free * GiB))}
  if same_fs is None:   # TMPDIR names no folder: the check must look at /tmp instead
    avail[os.path.realpath('/tmp')] = ('/dev/b', int(tmp_free * GiB))
  else:
    tmpdir.mkdir()
    avail[str(tmpdir.resolve())] = ('/dev/a', int(tree_free * GiB)) if same_fs else (
        '/dev/b', int(tmp_free * GiB))
  proc = _ci_run_with(tmp_path, avail, str(tmpdir))
  if ok:
    assert 'REACHED python3 -m venv .venv' in proc.stdout, proc.stderr
    assert proc.returncode == 7 and '.ci/run:' not in proc.stderr, proc.stderr
  else:
    assert proc.returncode == 1 and 'REACHED' not in proc.stdout, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('.ci/run: ') and 'free' in lines[0], lines
    assert ('TMPDIR' in lines[0]) == (tmp_free is not None and tmp_free < 1), lines
