"""Benchmark CLI and launch scripts: syntax, usage, FLOP formulas, a tiny benchmark run, and a
real 2-process x 2-device CPU pre-training run through launch/local/multiprocess_cpu.sh."""
import glob
import json
import os
import subprocess
import sys

import pytest

from didi_jax import bench
from didi_jax import config as config_lib
from didi_jax.sampling import cost as cost_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'launch', '**', '*.sh'), recursive=True)
                 + glob.glob(os.path.join(ROOT, 'launch', '**', '*.sbatch'), recursive=True))
MP_SCRIPT = os.path.join(ROOT, 'launch', 'local', 'multiprocess_cpu.sh')
FAST_XLA = '--xla_backend_optimization_level=0'     # compile time dominates these tiny runs
# Messages that mean jax.distributed itself could not start here (not a didi_jax bug).
DISTRIBUTED_START_FAILURES = ('DEADLINE_EXCEEDED', 'Failed to connect', 'failed to connect',
                              'Address already in use', 'Barrier timed out',
                              'UNAVAILABLE: ', 'Gloo is not available')


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'DIDI_', 'TPU_'))}
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = FAST_XLA           # one CPU device unless a caller adds more
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


# ============================================================================ scripts


def test_launch_scripts_exist():
  names = {_rel(p) for p in SCRIPTS}
  assert {'launch/local/multiprocess_cpu.sh', 'launch/gpu/slurm.sbatch',
          'launch/tpu/pod.sh'} <= names
  for readme in ('launch/gpu/README.md', 'launch/tpu/README.md'):
    assert os.path.exists(os.path.join(ROOT, readme)), readme


@pytest.mark.parametrize('script', SCRIPTS, ids=_rel)
def test_script_syntax_and_strict_mode(script):
  proc = subprocess.run(['bash', '-n', script], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  with open(script, encoding='utf-8') as f:
    text = f.read()
  assert text.startswith('#!/usr/bin/env bash')
  assert 'set -euo pipefail' in text
  assert 'usage' in text.lower()


@pytest.mark.parametrize('script,args', [
    ('launch/local/multiprocess_cpu.sh', ['-h']),
    ('launch/gpu/slurm.sbatch', ['--help']),
    ('launch/tpu/pod.sh', ['--help']),
])
def test_script_help(script, args):
  proc = subprocess.run(['bash', os.path.join(ROOT, script)] + args, capture_output=True,
                        text=True, env=_env(), check=False, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('usage:')


@pytest.mark.parametrize('script,args,message', [
    ('launch/local/multiprocess_cpu.sh', [], 'no arguments for didi_jax.main'),
    ('launch/local/multiprocess_cpu.sh', ['-n', 'x', '--', '--config=c'], 'non-negative'),
    ('launch/gpu/slurm.sbatch', [], 'not inside a SLURM job'),
    ('launch/tpu/pod.sh', ['run'], 'set TPU_NAME ZONE PROJECT'),
    ('launch/tpu/pod.sh', ['deploy'], "unknown action 'deploy'"),
])
def test_script_refuses_bad_invocation(script, args, message):
  proc = subprocess.run(['bash', os.path.join(ROOT, script)] + args, capture_output=True,
                        text=True, env=_env(), check=False, timeout=30)
  assert proc.returncode == 2
  assert message in proc.stderr


def test_pod_dry_run_quotes_arguments():
  env = _env(TPU_NAME='t', ZONE='z', PROJECT='p', DRY_RUN='1')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch/tpu/pod.sh'), 'run', '--',
                         '--config.sample.name=a b'], capture_output=True, text=True, env=env,
                        check=False, timeout=30)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert '--worker=all' in out and 'didi_jax.main --config=configs/owt.py' in out
  assert 'DIDI_COORDINATOR=WORKER0_IP:8476 DIDI_NUM_PROCESSES=2' in out
  assert r'--config.sample.name=a\\ b' in out


# ============================================================================ bench: formulas


def test_train_flops_match_design():
  # BENCHMARKS.md: 6 x 123.5M matmul params + 12·L·d·layers ≈ 0.85 GFLOP/token (small, L=1024).
  small = config_lib.model_config('small')
  per_token = bench.train_flops_per_token(small)
  matmul_params = 12 * cost_lib.block_macs_per_token(small) + 768 * 50258
  assert matmul_params == pytest.approx(123.5e6, rel=1e-3)
  assert per_token == pytest.approx(6 * matmul_params + 12 * 1024 * 768 * 12)
  assert per_token == pytest.approx(0.854e9, rel=1e-3)


def test_sample_flops_match_spec_cost_table():
  # Dense 16-step ancestral: 17 forwards of 291.65 GFLOP = 4.96 TFLOP/sample (docs/method.md §9).
  small = config_lib.model_config('small')
  dense = bench.sample_flops(small, batch=1, forwards=17, projected_rows=17 * 1024)
  assert dense == pytest.approx(cost_lib.sampler_cost(small, 'ancestral', 16).flops)
  assert dense / 1e12 == pytest.approx(4.96, abs=0.01)
  sparse = bench.sample_flops(small, batch=1, forwards=17, projected_rows=17 * 1024 * 1.3 / 16)
  out_layer = cost_lib.output_layer_flops(small)                 # 79.05 G of the 291.65 G
  assert dense - sparse == pytest.approx(17 * out_layer * (1 - 1.3 / 16))


def test_distill_flops_formula():
  small = config_lib.model_config('small')
  parts = bench.distill_flops(small, batch=8, group=4, unfreeze_blocks=4)
  f_s = cost_lib.student_forward_flops(small)
  f_d = cost_lib.disc_forward_flops(small)
  assert parts['student_fwd_bwd'] == pytest.approx(3 * 33 * f_s)
  assert parts['teacher_fwd'] == pytest.approx(33 * f_s)
  assert parts['disc_fwd'] == pytest.approx(64 * f_d)
  assert parts['reward_fwd'] == pytest.approx(32 * f_d)
  assert parts['total'] == pytest.approx(sum(v for k, v in parts.items() if k != 'total'))
  assert parts['total'] / 1e12 == pytest.approx(68.25, abs=0.05)
  no_kl = bench.distill_flops(small, 8, 4, 4, kl_on=False)
  assert no_kl['teacher_fwd'] == 0
  # The frozen 8 of 12 blocks' output shared with the update: the reward pass runs 4 + the head.
  shared = bench.distill_flops(small, 8, 4, 4, shared_prefix=True)
  trunk = cost_lib.trunk_dense_flops(small) + cost_lib.attention_flops(small)
  assert shared['reward_fwd'] == pytest.approx(32 * (trunk / 3 + cost_lib.disc_head_flops(small)))
  assert {k: v for k, v in shared.items() if k not in ('reward_fwd', 'total')} == {
      k: v for k, v in parts.items() if k not in ('reward_fwd', 'total')}


def _fake_row(dev, **kw):
  row = dict(workload='train', size='small', length=1024, batch=32, shape='B=32 L=1024',
             seconds_median=0.1, tokens_per_s=327680.0, tflop_per_iter=28.0, tflops=280.0,
             mfu=280.0 / dev.peak_tflops, mfu_ceiling=280.0 / 802.0, compile_s=30.0,
             memory_gb=20.0, device=dev.label, dtype='bfloat16', attention='auto', iters=5,
             warmup=2, peak_tflops=dev.peak_tflops)
  row.update(kw)
  return row


def test_table_on_h100_compares_with_design_references():
  dev = bench.DeviceInfo('gpu', 'NVIDIA H100 80GB HBM3', 1, 989.4, 'vendor dense spec', 802.0)
  rows = [_fake_row(dev),
          _fake_row(dev, workload='sample', batch=64, steps=16, sparse=False,
                    shape='B=64 L=1024 N=16', tokens_per_s=64200.0),
          _fake_row(dev, workload='distill', batch=8, group=4, shape='B=8 G=4 L=1024',
                    seconds_median=0.3)]
  table = bench.format_table(rows, dev)
  assert 'tokens/s' in table.splitlines()[0]
  assert 'MFU (measured ceiling 802)' in table.splitlines()[0]
  assert '1.29x torch.compile' in table           # 327.7k / 254k
  assert '2.00x torch.compile' in table           # 64.2k / 32.1k
  assert 'under 0.25 s; this run 0.300 s' in table


def test_table_shows_a_failed_workload_and_keeps_the_others():
  dev = bench.DeviceInfo('cpu', 'Some CPU (2 cores)', 1, 0.32, 'rough', None)
  args = bench.parse_args(['rgas', '--size', 'tiny'])
  rows = [_fake_row(dev, mfu_ceiling=None),
          bench.error_row('rgas', 'XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory', args, dev)]
  table = bench.format_table(rows, dev)
  assert '| train | B=32 L=1024 |' in table
  assert '| rgas | FAILED: XlaRuntimeError: RESOURCE_EXHAUSTED' in table
  assert 'measured ceiling' not in table
  assert 'not comparable on this device' in table


def test_cli_help_and_defaults(capsys):
  with pytest.raises(SystemExit) as e:
    bench.parse_args(['--help'])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in ('--size', '--length', '--batch', '--steps', '--iters', '--dtype', '--attention',
               '--sparse', '--warmup', '--peak_tflops', '--json', '--baseline'):
    assert flag in text
  # Flags whose default is None describe it in words: no "(default: None)" after them.
  assert '(default: None)' not in text and '(default: False)' not in text
  assert '(default: 5)' in text and '(default: none)' in text
  args = bench.parse_args(['all', '--size', 'demo', '--steps', '8,16,32'])
  assert (args.length, args.vocab, args.steps, args.dtype) == (256, 258, [8, 16, 32], 'float32')
  args = bench.parse_args(['all', '--size', 'small'])
  assert (args.length, args.vocab) == (1024, 50258)
  with pytest.raises(SystemExit):
    bench.parse_args(['train', '--steps', 'x'])


def test_cli_config_file_gives_model_recipe_and_batches(capsys):
  demo = os.path.join(ROOT, 'configs', 'demo.py')
  args = bench.parse_args(['distill', '--config', demo])
  want = bench.load_config_file(demo)
  assert (args.length, args.vocab, args.dtype, args.group) == (256, 258, 'float32', 4)
  assert want.model.hidden_size == 192 and want.distill.disc_unfreeze_blocks == 2
  assert bench.config_batch(args.file_cfg, 'distill') == want.distill.batch_size == 4
  assert bench.config_batch(args.file_cfg, 'train') == want.pretrain.batch_size
  assert bench.config_batch(args.file_cfg, 'rgas') == want.sample.batch_size
  smoke = bench.parse_args(['train', '--config', demo + ':smoke', '--group', '2'])
  assert smoke.file_cfg.model.hidden_size == 64 and smoke.group == 2   # the smoke preset's
  for spec, extra, fragment in ((demo, ['--size', 'demo'], 'leave out --size'),
                                ('/nonexistent.py', [], "no config file '/nonexistent.py'"),
                                (demo + ':nope', [], "unknown preset 'nope'")):
    with pytest.raises(SystemExit):
      bench.parse_args(['distill', '--config', spec] + extra)
    assert fragment in capsys.readouterr().err


def test_device_peaks():
  assert bench._lookup(bench.BF16_PEAK_TFLOPS, 'NVIDIA H100 80GB HBM3') == pytest.approx(989.4)
  assert bench._lookup(bench.BF16_PEAK_TFLOPS, 'NVIDIA H100 PCIe') == pytest.approx(756.0)
  assert bench._lookup(bench.BF16_PEAK_TFLOPS, 'TPU v5 lite') == pytest.approx(197.0)
  assert bench._lookup(bench.BF16_PEAK_TFLOPS, 'TPU v5') == pytest.approx(459.0)   # v5p
  assert bench._lookup(bench.BF16_PEAK_TFLOPS, 'TPU v6 lite') == pytest.approx(918.0)
  assert bench.cpu_peak_tflops() > 0


# ============================================================================ bench: a real run


def test_bench_train_tiny_prints_table(tmp_path):
  out = tmp_path / 'bench.jsonl'
  cmd = [sys.executable, '-m', 'didi_jax.bench', 'train', '--size', 'tiny', '--length', '32',
         '--batch', '8', '--iters', '2', '--warmup', '1', '--json', str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False,
                        timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = next(l for l in lines if l.startswith('| workload'))
  assert 'tokens/s' in header and 's/iter (median)' in header and 'MFU' in header
  row = next(l for l in lines if l.startswith('| train |'))
  assert 'B=8 L=32' in row
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 1 and rows[0]['workload'] == 'train'
  assert rows[0]['tokens_per_s'] > 0 and len(rows[0]['seconds']) == 2
  assert rows[0]['tflop_per_iter'] == pytest.approx(
      8 * 32 * bench.train_flops_per_token(config_lib.model_config('tiny', 258, 32)) / 1e12)


# ============================================================================ multi-process CPU


def test_multiprocess_cpu_pretrain_writes_checkpoint(tmp_path):
  # A corpus the test writes (a fresh machine has no cached Shakespeare and must not download).
  corpus = tmp_path / 'corpus.txt'
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta']
  corpus.write_text('\n\n'.join(' '.join(words[(i * 7 + j) % 8] for j in range(40))
                                 for i in range(200)), encoding='utf-8')
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  cmd = ['bash', MP_SCRIPT, '-n', '2', '-k', '2', '-l', str(logs), '-t', '240', '--',
         '--config=configs/demo.py:smoke', f'--workdir={workdir}', '--config.job=pretrain',
         '--config.data.source=text', f'--config.data.paths={corpus}',
         f'--config.data.cache_dir={tmp_path / "cache"}',
         '--config.pretrain.num_steps=4', '--config.pretrain.log_every=2',
         '--config.pretrain.eval_every=4', '--config.checkpoint.every=2']
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(PYTHON=sys.executable), capture_output=True,
                        text=True, check=False, timeout=300)
  log_text = ''.join(p.read_text(errors='replace') for p in sorted(logs.glob('process_*.log')))
  if proc.returncode != 0:
    reason = next((l.strip() for l in log_text.splitlines()
                   if any(s in l for s in DISTRIBUTED_START_FAILURES)), None)
    if reason is not None and not (workdir / 'checkpoints').exists():
      pytest.skip(f'jax.distributed could not start 2 local processes here: {reason[:300]}')
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], log_text[-4000:])
  assert 'multiprocess_cpu: 2 processes x 2 CPU devices' in proc.stdout
  # Both processes joined one 4-device job.
  assert '"complete": true' in proc.stdout
  for step in ('2', '4'):
    ckpt = workdir / 'checkpoints' / step
    assert (ckpt / 'state').is_dir(), sorted(p.name for p in (workdir / 'checkpoints').iterdir())
    assert (ckpt / 'data').is_dir() and (ckpt / 'meta').is_dir()
  meta = json.loads((workdir / 'checkpoints' / '4' / 'meta' / 'metadata').read_text())
  assert meta['devices'] == 4 and meta['job'] == 'pretrain'
  metrics = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert len(losses) == 2 and all(l == l and l > 0 for l in losses)   # one writer (process 0)
