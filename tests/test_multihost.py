"""Multi-host runs equal single-host ones: a real two-process `jax.distributed` job on localhost
(2 processes x 4 CPU devices, started by launch/local/multiprocess_cpu.sh) against one process
with 8 devices, on a text file the test writes (no corpus, no network).

Both run the real jobs through `didi_jax.main.run_job` — 3 pre-training steps, then 3
distillation iterations from that teacher — and then, in the same processes:
  * the rows each process places of a global batch (fresh, and after restoring the iterator
    from the checkpoint as a resumed run does), for the test to check that their union is the
    global batch with no row twice;
  * grouped reward normalisation on rewards sharded over both hosts, with groups that straddle
    the host boundary;
  * (two processes only) the one-process checkpoint restored onto a different mesh shape.
The test also restores the two-process checkpoint in this single process on another mesh.

Run as a module (`python -m tests.test_multihost --text=... --workdir=...`) this file is the
worker every process executes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP_SCRIPT = os.path.join(ROOT, 'launch', 'local', 'multiprocess_cpu.sh')
FAST_XLA = '--xla_backend_optimization_level=0'      # compile time dominates these tiny runs
GROUPED_N, GROUPED_G = 24, 8      # 3 rows per device; rows 0-11 on host 0: group 1 straddles
RESTORE_MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}
DONE = 'DONE'
WAIT_S = 400


# ============================================================================ shared set-up


def write_text(path: str, n_words: int = 30000, seed: int = 0) -> None:
  """A deterministic English-like text: enough for 16-row batches of 32 bytes."""
  words = ('the of and to in is was that with for as on his her by it at from be this which '
           'king queen lord love night day sword crown river house heart speak give time').split()
  rng = np.random.RandomState(seed)
  lines = []
  for _ in range(n_words // 12):
    lines.append(' '.join(words[i] for i in rng.randint(0, len(words), 12)).capitalize() + '.')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def _demo_module():
  spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs',
                                                                             'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_config(text_path: str, cache_dir: str):
  """configs/demo.py:smoke on the test's text, sized for 8 devices and 3 + 3 steps."""
  cfg = _demo_module().get_config('smoke')
  cfg.job = 'pretrain'
  cfg.data.source = 'text'
  cfg.data.paths = text_path
  cfg.data.cache_dir = cache_dir
  cfg.model.length = 32
  cfg.pretrain.batch_size = 16
  cfg.pretrain.num_steps = 3
  cfg.pretrain.log_every = 1
  cfg.pretrain.eval_every = 3
  cfg.pretrain.eval_batches = 1
  cfg.pretrain.eps = 1.0      # Adam on float-noise gradients of zero-initialised weights would
  cfg.distill.optim.student.eps = 1.0   # amplify layout-dependent rounding into the losses
  cfg.distill.optim.disc.eps = 1.0
  cfg.checkpoint.every = 3
  cfg.distill.batch_size = 8
  cfg.distill.group_size = 2
  cfg.distill.num_iterations = 3
  cfg.distill.log_every = 1
  cfg.distill.sample_every = 3      # periodic samples (runner.generate) on the global mesh
  cfg.distill.sample_count = 8
  return cfg


def with_mesh(cfg, mesh: dict):
  import copy  # pylint: disable=import-outside-toplevel
  cfg = copy.deepcopy(cfg)
  for k, v in mesh.items():
    cfg.mesh[k] = v
  return cfg


def flat_params(tree) -> dict:
  from didi_jax.checkpoint.manager import flatten  # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v) for k, v in flatten(tree).items()}


# ============================================================================ worker


def _local_rows(global_array) -> tuple[np.ndarray, np.ndarray]:
  """(global row indices, rows) that this process's devices hold, each row once."""
  rows = {}
  for shard in global_array.addressable_shards:
    sl = shard.index[0]
    start = sl.start or 0
    data = np.asarray(shard.data)
    for i in range(data.shape[0]):
      rows.setdefault(start + i, data[i])
  index = np.asarray(sorted(rows), np.int64)
  return index, np.stack([rows[i] for i in index])


def _dump_batches(cfg, pre_dir: str, out_dir: str, pid: int) -> None:
  from didi_jax import parallel  # pylint: disable=import-outside-toplevel
  from didi_jax.checkpoint.manager import Manager  # pylint: disable=import-outside-toplevel
  from didi_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from didi_jax.train import pretrain  # pylint: disable=import-outside-toplevel
  L, B = cfg.model.length, cfg.pretrain.batch_size
  trainer = pretrain.Trainer(cfg, pre_dir)
  fresh = pipeline.TrainIterator(cfg.data, L, B, seed=cfg.data.shuffle_seed)
  # The resume path of pretrain.run: restore (state, iterator state), then the next batch.
  mngr = Manager(os.path.join(pre_dir, 'checkpoints'), async_save=False)
  _, data_state, _ = mngr.restore(trainer.abstract_state_sharded())
  mngr.close()
  resumed = pipeline.TrainIterator(cfg.data, L, B, seed=cfg.data.shuffle_seed)
  resumed.set_state(data_state)
  for name, it in (('fresh', fresh), ('resumed', resumed)):
    index, rows = _local_rows(parallel.global_batch(trainer.mesh, next(it)))
    np.savez(os.path.join(out_dir, f'rows_{name}_p{pid}.npz'), index=index, rows=rows,
             position=json.dumps(data_state if name == 'resumed' else {}))


def _grouped_advantages(out_dir: str, pid: int) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from didi_jax import parallel  # pylint: disable=import-outside-toplevel
  from didi_jax.distill import didi as distill  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  r_N = np.random.RandomState(3).normal(size=GROUPED_N).astype(np.float32) * 2.0
  r = parallel.global_batch(mesh, r_N)
  adv = jax.jit(lambda x: distill.group_advantages(x, GROUPED_G, 3.0),
                out_shardings=parallel.batch_sharding(mesh, 1))(r)
  full = np.asarray(multihost_utils.process_allgather(adv, tiled=True))
  hosts = np.asarray(multihost_utils.process_allgather(
      np.asarray(_local_rows(r)[0], np.int64)))
  if pid == 0:
    np.savez(os.path.join(out_dir, 'grouped.npz'), rewards=r_N, advantages=full, hosts=hosts)


def _restore_other(cfg, other_dir: str, out_dir: str, pid: int) -> None:
  """The other run's checkpoint restored across these processes onto RESTORE_MESH."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from didi_jax.checkpoint.manager import Manager, flatten  # pylint: disable=import-outside-toplevel
  from didi_jax.train import pretrain  # pylint: disable=import-outside-toplevel
  deadline = time.time() + WAIT_S
  while not os.path.exists(os.path.join(other_dir, DONE)):
    if time.time() > deadline:
      raise TimeoutError(f'{other_dir} never finished')
    time.sleep(0.5)
  trainer = pretrain.Trainer(with_mesh(cfg, RESTORE_MESH), other_dir)
  mngr = Manager(os.path.join(other_dir, 'pretrain', 'checkpoints'), async_save=False)
  state, _, _ = mngr.restore(trainer.abstract_state_sharded())
  mngr.close()
  specs = {k: str(v.sharding.spec) for k, v in flatten(state['params']).items()}
  gathered = multihost_utils.process_allgather(state['params'], tiled=True)
  if pid == 0:
    np.savez(os.path.join(out_dir, 'restored_other.npz'), **flat_params(gathered))
    with open(os.path.join(out_dir, 'restored_specs.json'), 'w', encoding='utf-8') as f:
      json.dump(specs, f)


def worker(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--text', required=True)
  p.add_argument('--workdir', required=True)
  p.add_argument('--restore_from', default='')
  args = p.parse_args(argv)
  from didi_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.maybe_initialize_distributed()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from didi_jax.main import run_job  # pylint: disable=import-outside-toplevel
  pid = jax.process_index()
  cfg = make_config(args.text, os.path.join(args.workdir, 'cache'))
  pre_dir = os.path.join(args.workdir, 'pretrain')
  summary = {'pretrain': run_job(cfg, pre_dir)}
  dcfg = with_mesh(cfg, {})
  dcfg.job = 'distill'
  dcfg.teacher.checkpoint = pre_dir
  summary['distill'] = run_job(dcfg, os.path.join(args.workdir, 'distill'))
  _dump_batches(cfg, pre_dir, args.workdir, pid)
  _grouped_advantages(args.workdir, pid)
  if args.restore_from:
    _restore_other(cfg, args.restore_from, args.workdir, pid)
  multihost_utils.sync_global_devices('didi_multihost_done')
  if pid == 0:
    with open(os.path.join(args.workdir, DONE), 'w', encoding='utf-8') as f:
      json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
                 'summary': summary}, f, default=str)


# ============================================================================ the test


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'DIDI_', 'TPU_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''),
             XLA_FLAGS=f'{FAST_XLA} --xla_force_host_platform_device_count={devices}',
             PYTHON=sys.executable)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def _metrics(path: str) -> dict:
  out = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row['step'], {}).update(row)
  return out


def _run_both(tmp):
  """Starts the one-process reference and the two-process job together; waits for both."""
  text = os.path.join(tmp, 'corpus.txt')
  write_text(text)
  one, two = os.path.join(tmp, 'one'), os.path.join(tmp, 'two')
  os.makedirs(one)
  os.makedirs(two)
  ref = subprocess.Popen(
      [sys.executable, '-m', 'tests.test_multihost', f'--text={text}', f'--workdir={one}'],
      cwd=ROOT, env=_env(8), stdout=open(os.path.join(tmp, 'one.log'), 'w'),
      stderr=subprocess.STDOUT)
  mp = subprocess.run(
      ['bash', MP_SCRIPT, '-n', '2', '-k', '4', '-t', str(WAIT_S + 200), '-l',
       os.path.join(tmp, 'logs'), '-m', 'tests.test_multihost', '--', f'--text={text}',
       f'--workdir={two}', f'--restore_from={one}'],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=WAIT_S + 300, check=False)
  ref_rc = ref.wait(timeout=WAIT_S + 300)
  return text, one, two, ref_rc, mp


def _log(tmp, name):
  path = os.path.join(tmp, name)
  return open(path, encoding='utf-8', errors='replace').read()[-3000:] if os.path.exists(path) \
      else ''


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('multihost'))
  t0 = time.time()
  text, one, two, ref_rc, mp = _run_both(tmp)
  logs = _log(tmp, 'one.log') + _log(tmp, 'logs/process_1.log')
  assert ref_rc == 0, ('one-process run failed', logs)
  assert mp.returncode == 0, ('two-process run failed', mp.stdout[-3000:], mp.stderr[-3000:],
                              logs)
  return dict(tmp=tmp, text=text, one=one, two=two, seconds=time.time() - t0, mp=mp)


def test_two_processes_joined_one_job(runs):
  one = json.load(open(os.path.join(runs['one'], DONE), encoding='utf-8'))
  two = json.load(open(os.path.join(runs['two'], DONE), encoding='utf-8'))
  assert (one['processes'], one['devices']) == (1, 8)
  assert (two['processes'], two['devices']) == (2, 8)
  assert 'multiprocess_cpu: 2 processes x 4 CPU devices' in runs['mp'].stdout
  meta = json.load(open(os.path.join(runs['two'], 'pretrain', 'checkpoints', '3', 'meta',
                                     'metadata'), encoding='utf-8'))
  assert meta['devices'] == 8
  print(f'multi-host runs took {runs["seconds"]:.0f} s')


@pytest.mark.parametrize('job,keys', [
    ('pretrain', ('loss', 'grad_norm')),
    ('distill', ('d_loss', 'grad_norm_disc', 'grad_norm_student', 'student_loss', 'pg_loss',
                 'd_acc_real', 'd_acc_fake', 'reward_mean', 'entropy', 'masked_frac',
                 'sample_nfe8_entropy', 'sample_nfe16_entropy')),
])
def test_losses_equal_single_process(runs, job, keys):
  m1 = _metrics(os.path.join(runs['one'], job, 'metrics.jsonl'))
  m2 = _metrics(os.path.join(runs['two'], job, 'metrics.jsonl'))
  assert sorted(m1) == sorted(m2) and {1, 2, 3} <= set(m1)
  for step in (1, 2, 3):
    for k in keys:
      if k not in m1[step]:
        continue
      assert m2[step][k] == pytest.approx(m1[step][k], rel=1e-5, abs=1e-6), (job, step, k)
    assert np.isfinite(m1[step][keys[0]])
  if job == 'pretrain':
    assert m2[3]['valid_nelbo'] == pytest.approx(m1[3]['valid_nelbo'], rel=1e-5)
  # Steps differ from one another (the runs trained; equality is not a constant).
  assert len({round(m1[s][keys[0]], 6) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize('name', ['fresh', 'resumed'])
def test_union_of_local_batches_is_the_global_batch(runs, name):
  from didi_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = make_config(runs['text'], os.path.join(runs['tmp'], 'cache_ref'))
  ref = pipeline.TrainIterator(cfg.data, cfg.model.length, cfg.pretrain.batch_size,
                               seed=cfg.data.shuffle_seed)
  if name == 'resumed':      # the checkpoint at step 3: the next batch is the 4th
    for _ in range(3):
      next(ref)
  want = next(ref)
  parts = [np.load(os.path.join(runs['two'], f'rows_{name}_p{p}.npz')) for p in (0, 1)]
  index = np.concatenate([p['index'] for p in parts])
  assert len(index) == len(set(index.tolist())) == want.shape[0]     # no row twice, none missing
  got = np.zeros_like(want)
  got[index] = np.concatenate([p['rows'] for p in parts])
  np.testing.assert_array_equal(got, want)
  assert all(len(p['index']) == want.shape[0] // 2 for p in parts)   # each host its half
  single = np.load(os.path.join(runs['one'], f'rows_{name}_p0.npz'))
  np.testing.assert_array_equal(single['rows'], want)
  if name == 'resumed':
    assert json.loads(str(parts[0]['position']))['index'] == 3


def test_per_host_iterators_partition_the_global_batch(runs):
  from didi_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = make_config(runs['text'], os.path.join(runs['tmp'], 'cache_ref'))
  L, B = cfg.model.length, cfg.pretrain.batch_size
  glob = pipeline.TrainIterator(cfg.data, L, B, seed=5)
  hosts = [pipeline.TrainIterator(cfg.data, L, B, seed=5, process_index=p, process_count=2)
           for p in (0, 1)]
  for step in range(4):
    if step == 2:            # resume every host from a saved position
      states = [h.get_state() for h in hosts]
      hosts = [pipeline.TrainIterator(cfg.data, L, B, seed=0, process_index=p, process_count=2)
               for p in (0, 1)]
      for h, s in zip(hosts, states):
        h.set_state(s)
    np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), next(glob))


def test_grouped_normalisation_keeps_groups_across_hosts(runs):
  from didi_jax.distill import didi as distill  # pylint: disable=import-outside-toplevel
  d = np.load(os.path.join(runs['two'], 'grouped.npz'))
  r, adv = d['rewards'], d['advantages']
  # The same function on one device, unsharded: what the sharded two-host result must equal.
  cpu = jax.devices()[0]
  want = np.asarray(distill.group_advantages(jax.device_put(r, cpu), GROUPED_G, 3.0))
  np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-6)
  # The layout really splits group 1 (rows 8..15) between the hosts ...
  host0 = set(d['hosts'][0].tolist())
  assert host0 == set(range(12)) and not set(range(8, 16)) <= host0
  # ... and statistics over each host's rows (groups cut at the host boundary) would differ.
  per_host = np.concatenate([
      np.asarray(distill.group_advantages(jax.device_put(r[:12], cpu), 4, 3.0)),
      np.asarray(distill.group_advantages(jax.device_put(r[12:], cpu), 4, 3.0))])
  assert np.abs(adv - per_host).max() > 0.1
  assert np.abs(want.reshape(-1, GROUPED_G).mean(1)).max() < 1e-5      # zero mean per group


def _restore_here(cfg, run_dir: str, mesh: dict):
  from didi_jax.checkpoint.manager import Manager  # pylint: disable=import-outside-toplevel
  from didi_jax.train import pretrain  # pylint: disable=import-outside-toplevel
  trainer = pretrain.Trainer(with_mesh(cfg, mesh), run_dir)
  mngr = Manager(os.path.join(run_dir, 'pretrain', 'checkpoints'), async_save=False)
  state, data, _ = mngr.restore(trainer.abstract_state_sharded())
  mngr.close()
  return state, data


def test_two_process_checkpoint_restores_in_one_process_on_another_mesh(runs):
  cfg = make_config(runs['text'], os.path.join(runs['tmp'], 'cache_ref'))
  mesh = {'data': 1, 'fsdp': 4, 'tensor': 2}
  two, data_two = _restore_here(cfg, runs['two'], mesh)
  one, data_one = _restore_here(cfg, runs['one'], {'data': -1, 'fsdp': 1, 'tensor': 1})
  assert data_two == data_one and data_two['index'] == 3
  assert int(two['step']) == int(one['step']) == 3
  a, b = flat_params(two['params']), flat_params(one['params'])
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(two['params'])}
  assert any('fsdp' in s for s in specs) and any('tensor' in s for s in specs)


def test_one_process_checkpoint_restores_in_two_processes_on_another_mesh(runs):
  cfg = make_config(runs['text'], os.path.join(runs['tmp'], 'cache_ref'))
  restored = np.load(os.path.join(runs['two'], 'restored_other.npz'))
  one, _ = _restore_here(cfg, runs['one'], {'data': -1, 'fsdp': 1, 'tensor': 1})
  want = flat_params(one['params'])
  assert sorted(restored.files) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(restored[k], want[k], err_msg=k)     # a restore is exact
  specs = json.load(open(os.path.join(runs['two'], 'restored_specs.json'), encoding='utf-8'))
  assert any('fsdp' in s for s in specs.values()) and any('tensor' in s for s in specs.values())


# ============================================================================ launch scripts


def _launch_scripts():
  out = []
  for base, _, files in os.walk(os.path.join(ROOT, 'launch')):
    for name in files:
      path = os.path.join(base, name)
      with open(path, 'rb') as f:
        if f.read(2) == b'#!' or name.endswith(('.sh', '.sbatch')):
          out.append(path)
  return sorted(out)


def test_launch_scripts_pass_shellcheck():
  import shutil  # pylint: disable=import-outside-toplevel
  scripts = _launch_scripts() + [os.path.join(ROOT, '.ci', 'run')]
  assert {os.path.relpath(p, ROOT) for p in scripts} >= {
      'launch/local/multiprocess_cpu.sh', 'launch/gpu/slurm.sbatch', 'launch/tpu/pod.sh'}
  if shutil.which('shellcheck') is None:
    if os.environ.get('CI'):
      pytest.fail('shellcheck is not installed: .ci/run installs it (apt-get install shellcheck)')
    pytest.skip('shellcheck is not installed (apt-get install shellcheck)')
  proc = subprocess.run(['shellcheck', '--shell=bash', '--severity=info'] + scripts,
                        capture_output=True, text=True, check=False, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:]


def _fake_bin(tmp_path, name: str) -> str:
  """A `name` command that prints its arguments and the DIDI_/MEGASCALE_ variables it sees."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  script = bindir / name
  script.write_text('#!/usr/bin/env bash\necho "' + name + ' $*"\n'
                    'env | grep -E "^(DIDI_|JAX_LOCAL)" | sort || true\n')
  script.chmod(0o755)
  return str(bindir)


@pytest.mark.parametrize('tasks,per_gpu', [('1', False), ('8(x2)', True)])
def test_slurm_process_per_node_or_per_gpu(tmp_path, tasks, per_gpu):
  bindir = _fake_bin(tmp_path, 'srun')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'DIDI_', 'JAX_LOC'))}
  env.update(PATH=bindir + os.pathsep + env['PATH'], SLURM_JOB_ID='42', SLURM_NNODES='2',
             SLURM_NTASKS_PER_NODE=tasks, DIDI_REPO=ROOT, WORKDIR=str(tmp_path / 'run'),
             VENV=str(tmp_path / 'novenv'))
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu', 'slurm.sbatch'),
                         '--config.seed=3'], capture_output=True, text=True, env=env,
                        check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr
  n = tasks.split('(')[0]
  assert f'srun --ntasks-per-node={n} --kill-on-bad-exit=1 bash -c' in proc.stdout
  assert '--config=configs/owt.py' in proc.stdout and '--config.seed=3' in proc.stdout
  assert ('one GPU each' in proc.stdout) == per_gpu
  assert ('DIDI_PER_GPU=1' in proc.stdout) == per_gpu


def test_pod_queued_resource_and_multislice_dry_run():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'DIDI_'))}
  env.update(TPU_NAME='t', ZONE='z', PROJECT='p', DRY_RUN='1', NUM_SLICES='2',
             ACCELERATOR_TYPE='v5p-128', RUNTIME_VERSION='rt', QR_FLAGS='--spot')
  pod = os.path.join(ROOT, 'launch', 'tpu', 'pod.sh')
  create = subprocess.run(['bash', pod, 'create'], capture_output=True, text=True, env=env,
                          check=False, timeout=60)
  assert create.returncode == 0, create.stderr
  assert ('gcloud compute tpus queued-resources create t-qr --node-count=2 --node-prefix=t '
          '--zone=z --project=p --accelerator-type=v5p-128 --runtime-version=rt --spot') \
      in create.stdout
  run = subprocess.run(['bash', pod, 'run', '--', '--config.seed=3'], capture_output=True,
                       text=True, env=env, check=False, timeout=60)
  assert run.returncode == 0, run.stderr
  for i in (0, 1):
    assert f'tpu-vm ssh t-{i} --zone=z --project=p --worker=all' in run.stdout
    assert f'MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={i}' in run.stdout
    assert f'DIDI_PROCESS_ID=$(( {i} * 2 + worker ))' in run.stdout
  assert run.stdout.count('DIDI_COORDINATOR=WORKER0_IP:8476 DIDI_NUM_PROCESSES=4') == 2
  bad = subprocess.run(['bash', pod, 'create'], capture_output=True, text=True,
                       env={k: v for k, v in env.items() if k != 'RUNTIME_VERSION'},
                       check=False, timeout=60)
  assert bad.returncode == 2 and 'RUNTIME_VERSION' in bad.stderr


if __name__ == '__main__':
  worker()
