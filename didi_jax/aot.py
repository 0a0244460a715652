r"""Ahead-of-time check of a job on a TPU topology, from any machine: does it fit, how fast.

  python -m didi_jax.aot --config=configs/owt.py --topology=v5p:4x4x4 [--num_slices=2] \
      [--job=pretrain|distill|sample] [--json=FILE] [--config.a.b=VALUE ...]
  python -m didi_jax.aot --config=configs/owt.py:teacher --topology=v5e-256
  python -m didi_jax.aot --config=configs/demo.py:smoke --topology=local --measure

The job's REAL step is built by the code the run uses (`pretrain.Trainer.train_step`,
`distill_loop.Distiller.step` around `distill.make_distill_step` (with distill.method='sdtt',
`sdtt_loop.SdttDistiller.step`), `sampling.runner`'s sample
function for ancestral / RGAS) with the same mesh (`parallel.make_mesh`), shardings, donation and
dtypes, then lowered with abstract inputs only (`jax.ShapeDtypeStruct`s carrying their shardings;
parameters from `nnx.eval_shape`: nothing the size of the model is allocated) and compiled for
the topology's devices, which the `libtpu` wheel describes without a TPU
(`pip install -e '.[tpu]'`). It prints one table — per-device arguments, outputs, donated
(aliased) bytes, temporaries and their total against the chip's HBM; the compiler's FLOPs and
bytes accessed per step; a roofline ESTIMATE of step time and tokens/s from the chip's published
peak bf16 FLOP/s and HBM bandwidth (communication ignored); compile time — and a verdict: fits,
or does not fit with the one-line fix (the largest batch by linear scaling of temporaries,
rematerialisation, an fsdp mesh). Exit status 0 fits, 1 does not fit, 2 bad configuration.

`--topology` is a libtpu name (`v5e:2x2`, `v5p:4x4x4`, `v4:2x2x4`, `v6e:2x4`, ...), one of the
accelerator names of `TOPOLOGY_ALIASES` (`v5p-128`, `v5e-256`, ...), or `local` (the attached
devices; with `--measure` one step then runs on random inputs and the device's measured peak
memory is shown next to the compiler's figure). `--num_slices=N` compiles for N slices joined
over the data-centre network; the mesh's `data` axis then spans the slices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional

# libtpu reads these when it is loaded (at the first topology description): no metadata-server
# probe (it times out off Google Cloud), and no lock file that would let one process at a time
# describe topologies.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# pylint: disable=wrong-import-position
import copy  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from didi_jax import bench  # noqa: E402
from didi_jax import config as config_lib  # noqa: E402
from didi_jax.distill import didi as distill  # noqa: E402
from didi_jax import errors  # noqa: E402
from didi_jax import models  # noqa: E402
from didi_jax import parallel  # noqa: E402
from didi_jax.checkpoint import loader  # noqa: E402
from didi_jax.models.discriminator import Spectral  # noqa: E402
from didi_jax.sampling import cost as cost_lib  # noqa: E402
from didi_jax.sampling import runner  # noqa: E402
from didi_jax.distill import sdtt  # noqa: E402
from didi_jax.train import distill_loop  # noqa: E402
from didi_jax.train import family  # noqa: E402
from didi_jax.train import pretrain  # noqa: E402

GiB = 1024 ** 3
JOBS = ('pretrain', 'distill', 'sample')
BATCH_KEYS = {'pretrain': 'pretrain.batch_size', 'distill': 'distill.batch_size',
              'sample': 'sample.batch_size'}
SDTT_BATCH_KEY = 'distill.sdtt.batch_size'


def batch_key(cfg, job: str) -> str:
  """The config key of the job's global batch (SDTT has its own)."""
  if job == 'distill' and family.method(cfg) == 'sdtt':
    return SDTT_BATCH_KEY
  return BATCH_KEYS[job]


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU / vendor documentation)."""
  name: str
  hbm_bytes: int             # HBM capacity
  peak_flops: float          # dense bf16 FLOP/s
  hbm_bandwidth: float       # bytes/s


CHIPS = {
    'v4': Chip('TPU v4', 32 * GiB, 275e12, 1200e9),
    'v5e': Chip('TPU v5e', 16 * GiB, 197e12, 819e9),
    'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 2765e9),
    'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1640e9),
}
# device_kind as the TPU runtime (and libtpu's descriptions) report it -> CHIPS key.
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
                'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}
# Cloud accelerator types (v4 / v5p count TensorCores, 2 per chip; v5e / v6e count chips).
TOPOLOGY_ALIASES = {
    'v4-8': 'v4:2x2x1', 'v4-16': 'v4:2x2x2', 'v4-32': 'v4:2x2x4', 'v4-64': 'v4:2x4x4',
    'v4-128': 'v4:4x4x4',
    'v5e-1': 'v5e:1x1', 'v5e-4': 'v5e:2x2', 'v5e-8': 'v5e:2x4', 'v5e-16': 'v5e:4x4',
    'v5e-32': 'v5e:4x8', 'v5e-64': 'v5e:8x8', 'v5e-128': 'v5e:8x16', 'v5e-256': 'v5e:16x16',
    'v5p-8': 'v5p:2x2x1', 'v5p-16': 'v5p:2x2x2', 'v5p-32': 'v5p:2x2x4', 'v5p-64': 'v5p:2x4x4',
    'v5p-128': 'v5p:4x4x4', 'v5p-256': 'v5p:4x4x8',
    'v6e-1': 'v6e:1x1', 'v6e-4': 'v6e:2x2', 'v6e-8': 'v6e:2x4', 'v6e-16': 'v6e:4x4',
    'v6e-64': 'v6e:8x8', 'v6e-256': 'v6e:16x16',
}


class AotError(ValueError):
  """A configuration that cannot be compiled for the target; one line naming the fix."""


# ============================================================================ topology


@dataclasses.dataclass
class Target:
  name: str                  # what was asked (--topology)
  topology: str              # libtpu topology name, or 'local'
  devices: list
  num_slices: int
  platform: str
  device_kind: str
  chip: Optional[Chip]

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


@contextlib.contextmanager
def _quiet_stderr():
  """libtpu writes start-up warnings straight to file descriptor 2; keep them for errors only."""
  captured = tempfile.TemporaryFile(mode='w+b')
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(captured.fileno(), 2)
  box = {'text': ''}
  try:
    yield box
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    captured.seek(0)
    box['text'] = captured.read().decode(errors='replace')
    captured.close()


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology (libtpu's description; no TPU needed)."""
  kwargs = {}
  if topology.split(':')[0] == 'v4':
    kwargs['chip_config_name'] = 'megacore'       # one device per chip, as v4 VMs run
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  try:
    with _quiet_stderr() as log:
      desc = topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs)
  except ModuleNotFoundError as e:
    raise AotError(f'describing TPU topologies needs the libtpu wheel: pip install -e '
                   f"'.[tpu]' ({e})") from None
  except Exception as e:  # pylint: disable=broad-except
    text = ' '.join(str(e).split())
    if 'libtpu' in text.lower() and ('not found' in text.lower() or 'no module' in text.lower()):
      raise AotError("describing TPU topologies needs the libtpu wheel: pip install -e '.[tpu]'"
                     ) from None
    extra = f' with num_slices={num_slices}' if num_slices > 1 else ''
    raise AotError(f'libtpu cannot describe topology {topology!r}{extra}: {text[:300]} (names '
                   f'look like v5e:2x2, v5p:4x4x4, v4:2x2x4, or {", ".join(list(TOPOLOGY_ALIASES)[:4])}, '
                   '...)') from None
  del log
  return list(desc.devices)


def make_target(topology: str, num_slices: int = 1) -> Target:
  if num_slices < 1:
    raise AotError(f'--num_slices={num_slices} must be at least 1')
  if topology == 'local':
    if num_slices != 1:
      raise AotError('--num_slices applies to TPU topologies, not --topology=local')
    devices = jax.devices()
    kind = devices[0].device_kind
    return Target('local', 'local', devices, 1, devices[0].platform, kind, _local_chip(devices))
  name = TOPOLOGY_ALIASES.get(topology, topology)
  if ':' not in name:
    raise AotError(f'--topology={topology!r} is not a TPU topology: use e.g. v5p:4x4x4, v5e:16x16, '
                   f'an accelerator type ({", ".join(sorted(TOPOLOGY_ALIASES)[:6])}, ...) or local')
  devices = tpu_devices(name, num_slices)
  kind = devices[0].device_kind
  key = DEVICE_KINDS.get(kind)
  return Target(topology, name, devices, num_slices, 'tpu', kind,
                CHIPS[key] if key else None)


def _local_chip(devices) -> Optional[Chip]:
  key = DEVICE_KINDS.get(devices[0].device_kind)
  if key:
    return CHIPS[key]
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return Chip(devices[0].device_kind, int(stats['bytes_limit']), float('nan'), float('nan'))
  return None


def check_target_config(cfg, job: str, target: Target) -> None:
  """One-line errors for settings the target cannot run."""
  if target.platform != 'tpu':
    return
  if job in ('distill', 'sample') and cfg.sampler.precision == 'float64':
    raise AotError('--config.sampler.precision=float64 is not supported on TPU (no 64-bit '
                   'floats): use --config.sampler.precision=float32')
  if cfg.model.attention_impl == 'cudnn':
    raise AotError("--config.model.attention_impl=cudnn is a GPU kernel: use "
                   "--config.model.attention_impl=auto (or xla) on TPU")


# ============================================================================ programs


@dataclasses.dataclass
class Program:
  """A job's jitted step and its abstract (sharded) arguments."""
  job: str
  jitted: Any
  args: tuple
  mesh: Any
  global_batch: int
  tokens_per_step: int
  donated: str                               # what the step donates (or 'nothing')
  state_bytes: int                           # bytes of the donated arguments, whole mesh
  concrete: Optional[Callable[[], tuple]] = None   # real inputs (for --measure)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, sh: _sds(a.shape, a.dtype, sh), tree, shardings)


def _key_sds(mesh):
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return _sds(key.shape, key.dtype, parallel.replicated(mesh))


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _random_ids(cfg, batch: int) -> np.ndarray:
  high = int(cfg.model.vocab_size) - 1
  return np.random.RandomState(0).randint(0, high, (batch, int(cfg.model.length))).astype(np.int32)


def _batch_program(cfg, job: str, step, mesh, state, fresh, run_key, batch: int, what: str,
                   concrete: bool) -> Program:
  """A step(state, ids_BxL, key) program (pretraining's and SDTT's)."""
  B, L = batch, int(cfg.model.length)
  args = (state, _sds((B, L), jnp.int32, parallel.batch_sharding(mesh)), _key_sds(mesh))

  def make():
    return (fresh(), parallel.global_batch(mesh, _random_ids(cfg, B)), run_key)
  return Program(job, step, args, mesh, B, B * L, what, _nbytes(state),
                 make if concrete else None)


def build_pretrain(cfg, devices, concrete: bool = False) -> Program:
  trainer = pretrain.Trainer(cfg, '', devices=devices)
  return _batch_program(cfg, 'pretrain', trainer.train_step, trainer.mesh,
                        trainer.abstract_state_sharded(), trainer.fresh_state, trainer.run_key,
                        int(cfg.pretrain.batch_size), 'the train state (argument 0)', concrete)


def _random_teacher(cfg):
  model = models.build(cfg.model, seed=int(cfg.seed))
  return loader.Network('teacher', cfg.model, nnx.graphdef(model), nnx.state(model, nnx.Param))


def build_distill(cfg, devices, concrete: bool = False) -> Program:
  if cfg.distill.get('memory_saving', 'auto') == 'auto':
    # 'auto' reads the backend of this process (a CPU host here): resolve it for the target.
    with cfg.unlocked():
      cfg.distill.memory_saving = 'off' if devices[0].platform == 'cpu' else 'on'
  runner = family.runner(cfg, _random_teacher(cfg) if concrete else None, devices=devices)
  if family.method(cfg) == 'sdtt':             # the round's teacher is inside the state
    return _batch_program(cfg, 'distill', runner.step, runner.mesh, runner.abstract_sharded(),
                          runner.fresh_state, runner.run_key, int(cfg.distill.sdtt.batch_size),
                          'the distillation state (argument 0)', concrete)
  B, L, G = int(cfg.distill.batch_size), int(cfg.model.length), int(cfg.distill.group_size)
  state = runner.abstract_sharded()
  teacher = _with_shardings(distill_loop.abstract_teacher_params(cfg), runner.teacher_sh)
  # The loop passes data rows, or (real_source='teacher_samples') a zero batch of the same shape.
  args = (state, teacher, _sds((B, L), jnp.int32, parallel.batch_sharding(runner.mesh)),
          _key_sds(runner.mesh))

  def make():
    return (runner.fresh_state(), runner.teacher_params,
            parallel.global_batch(runner.mesh, _random_ids(cfg, B)), runner.run_key)
  return Program('distill', runner.step, args, runner.mesh, B, B * G * L,
                 'the distillation state (argument 0)', _nbytes(state),
                 make if concrete else None)


def _abstract_networks(cfg, concrete: bool):
  """(denoiser, discriminator or None) Networks for the sampler: abstract or random weights."""
  model_cfg = cfg.model
  build = (lambda f: f()) if concrete else nnx.eval_shape
  model = build(lambda: models.build(model_cfg, seed=int(cfg.seed)))
  gd, params = nnx.split(model, nnx.Param)
  role = cfg.sampler.network
  den = loader.Network('student_ema' if role == 'student_ema' else role, model_cfg, gd, params)
  disc = None
  if cfg.sampler.kind == 'rgas':
    dmodel = build(lambda: models.build(model_cfg, 'discriminator', seed=int(cfg.seed)))
    dgd, dparams, spectral = nnx.split(dmodel, nnx.Param, Spectral)
    disc = loader.Network('discriminator', model_cfg, dgd, dparams, spectral)
  return den, disc


def build_sample(cfg, devices, concrete: bool = False) -> Program:
  if cfg.sampler.kind == 'rgas' and cfg.sampler.network == 'teacher':
    raise AotError('RGAS needs a discriminator, which a teacher has not: use '
                   '--config.sampler.network=student_ema or --config.sampler.kind=ancestral')
  mesh = parallel.make_mesh(cfg.mesh, devices)
  B, L = int(cfg.sample.batch_size), int(cfg.model.length)
  mask_id = int(cfg.model.vocab_size) - 1
  runner.check_batch_size(mesh, B)
  den, disc = _abstract_networks(cfg, concrete)
  fn = runner.make_sample_fn(cfg.sampler, den, disc, batch_size=B, length=L, mask_id=mask_id)
  params_sh, dparams_sh = runner.network_shardings(mesh, den, disc)
  params = _with_shardings(den.params, params_sh)
  dparams = None if disc is None else _with_shardings((disc.params, disc.spectral), dparams_sh)
  x_init = _sds((B, L), jnp.int32, parallel.batch_sharding(mesh))
  args = (params, dparams, _key_sds(mesh), x_init)

  def make():
    p = jax.device_put(den.params, params_sh)
    d = None if disc is None else jax.device_put((disc.params, disc.spectral), dparams_sh)
    x = parallel.global_batch(mesh, np.full((B, L), mask_id, np.int32))
    return p, d, jax.random.PRNGKey(int(cfg.sample.seed)), x
  return Program('sample', fn, args, mesh, B, B * L, 'nothing', 0, make if concrete else None)


BUILDERS = {'pretrain': build_pretrain, 'distill': build_distill, 'sample': build_sample}


# ============================================================================ analysis


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def memory_report(compiled) -> dict:
  """Per-device bytes from the compiler: the arguments, outputs, aliased (donated arguments that
  the outputs reuse), temporaries, generated code, and their total."""
  m = compiled.memory_analysis()
  out = {'argument_bytes': int(m.argument_size_in_bytes),
         'output_bytes': int(m.output_size_in_bytes),
         'alias_bytes': int(m.alias_size_in_bytes),
         'temp_bytes': int(m.temp_size_in_bytes),
         'generated_code_bytes': int(m.generated_code_size_in_bytes)}
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                        + out['temp_bytes'] + out['generated_code_bytes'])
  out['source'] = 'compiled.memory_analysis()'
  return out


def roofline(flops: float, bytes_accessed: float, tokens: int, chip: Optional[Chip]) -> dict:
  """Step time = max(FLOPs / peak, bytes / bandwidth) per device (devices run in parallel,
  communication and overlap ignored): an estimate, not a measurement."""
  if chip is None or not np.isfinite(chip.peak_flops) or not np.isfinite(chip.hbm_bandwidth):
    return {'estimate': True, 'seconds_per_step': None, 'tokens_per_second': None,
            'bound': None}
  compute_s = flops / chip.peak_flops
  memory_s = bytes_accessed / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  return {'estimate': True, 'compute_seconds': compute_s, 'memory_seconds': memory_s,
          'seconds_per_step': step_s,
          'tokens_per_second': tokens / step_s if step_s > 0 else None,
          'bound': 'compute' if compute_s >= memory_s else 'memory'}


def _pow2_divisors(n: int):
  k = 2
  while k <= n:
    if n % k == 0:
      yield k
    k *= 2


def verdict(cfg, program: Program, mem: dict, hbm: Optional[int], refused: bool = False) -> dict:
  """Fits or not; the largest global batch by linear scaling of temporaries; the one-line fix."""
  job = program.job
  key = batch_key(cfg, job)
  div = parallel.batch_divisor(program.mesh)
  rows = program.global_batch // div
  out = {'batch_key': key, 'batch_divisor': div, 'rows_per_device': rows}
  if hbm is None:
    out.update(fits=None, max_global_batch=None, fix=None,
               message='HBM capacity unknown for this device: no verdict')
    return out
  total, temp = mem['total_bytes'], mem['temp_bytes']
  fixed = total - temp
  per_row = temp / max(rows, 1)
  max_rows = int((hbm - fixed) // per_row) if per_row > 0 and hbm > fixed else 0
  out['max_global_batch'] = max_rows * div if max_rows >= 1 else 0
  fits = total <= hbm and not refused
  out['fits'] = fits
  used = f'{total / GiB:.2f} of {hbm / GiB:.2f} GiB per device'
  if fits:
    out['fix'] = None
    out['message'] = (f'fits ({used}); largest {key} by linear scaling of temporaries: '
                      f'~{out["max_global_batch"]} ({max_rows} per device)')
    return out
  fixes = []
  if max_rows >= 1:
    fixes.append(f'--config.{key}={max_rows * div} (the largest that fits by linear scaling of '
                 f'temporaries: {max_rows} per device)')
  if job != 'sample' and not cfg.model.get('remat', False):
    fixes.append('--config.model.remat=True (rematerialise the blocks in the backward pass)')
  if int(cfg.mesh.fsdp) == 1 and program.state_bytes:
    n = len(program.mesh.devices.flat)
    state_dev = mem['alias_bytes'] or program.state_bytes / n
    for k in _pow2_divisors(n):
      if total - state_dev + state_dev / k <= hbm:
        fixes.append(f'--config.mesh.fsdp={k} (shard parameters and optimiser states over {k} '
                     'devices)')
        break
  if not fixes:
    fixes.append('a larger topology or a smaller model (nothing above fits)')
  out['fix'] = ', or '.join(fixes)
  out['message'] = f'DOES NOT FIT ({used}): set {out["fix"]}'
  return out


LOOP_NOTES = {
    'pretrain': '',
    'distill': 'the compiler counts the fused loss loop (lax.map over position chunks) once',
    'sample': 'the compiler counts the sampler loop body (lax.scan over steps) once; the estimate '
              'multiplies its bytes by the steps',
}


def model_flops_per_step(cfg, job: str, batch: int) -> float:
  """Model FLOPs of one step, whole mesh (the formulas of `didi_jax.bench`, docs/method.md §9 costs)."""
  m = cfg.model
  if job == 'pretrain':
    return batch * int(m.length) * bench.train_flops_per_token(m)
  if job == 'distill' and family.method(cfg) == 'sdtt':
    return sdtt.flops_per_iteration(m, batch)
  if job == 'distill':
    d = cfg.distill
    return bench.distill_flops(m, batch, int(d.group_size), int(d.disc_unfreeze_blocks),
                               kl_on=distill.kl_enabled(d),
                               shared_prefix=distill.shares_disc_prefix(d))['total']
  s = cfg.sampler
  return batch * cost_lib.sampler_cost(
      m, s.kind, int(s.steps), num_candidates=int(s.rgas.num_candidates),
      rerank_ratio=float(s.rgas.rerank_ratio), noise_removal=s.noise_removal != 'none').flops


_OOM = re.compile(r'temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def compile_program(program: Program):
  """(compiled or None, lowering s, compile s, None or the TPU compiler's out-of-memory figures)."""
  t0 = time.time()
  lowered = program.jitted.lower(*program.args)
  t1 = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    found = _OOM.search(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not found:
      raise
    t, tu, a, au = found.groups()
    return None, t1 - t0, time.time() - t1, {
        'temp_bytes': int(float(t) * _UNITS[tu]), 'available_bytes': int(float(a) * _UNITS[au]),
        'message': ' '.join(str(e).split())[:400]}
  return compiled, t1 - t0, time.time() - t1, None


def _per_device_bytes(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None \
        else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def oom_memory_report(program: Program, oom: dict) -> dict:
  """Per-device memory when the TPU compiler refused the program: its temporaries figure, the
  arguments from their shardings, the donated outputs aliased (outputs ≈ the donated state)."""
  args = _per_device_bytes(program.args)
  donated = _per_device_bytes(program.args[0]) if program.state_bytes else 0
  out = {'argument_bytes': args, 'output_bytes': donated, 'alias_bytes': donated,
         'temp_bytes': oom['temp_bytes'], 'generated_code_bytes': 0,
         'source': 'the TPU compiler refused: ' + oom['message']}
  out['total_bytes'] = args + oom['temp_bytes']
  return out


def measure_peak(program: Program, compiled) -> Optional[int]:
  """Runs the compiled step once on random inputs; the devices' peak bytes in use (or None where
  the backend keeps no statistics, e.g. CPU)."""
  args = program.concrete()
  out = compiled(*args)
  jax.block_until_ready(out)
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def default_job(cfg) -> str:
  if cfg.job in JOBS:
    return cfg.job
  raise AotError(f'config.job={cfg.job!r} has no single step to compile: pass --job=pretrain, '
                 'distill or sample')


def confirm_batch(cfg, job: str, target: Target, first: int, tries: int = 3):
  """After the compiler refused a batch: compile at `first` (the linear-scaling estimate) and,
  while refused, at the estimate from that refusal (at most 0.9 x the last); the first batch that
  compiles, with its total bytes per device, or (None, None). Under memory pressure the compiler
  rematerialises, so a refusal's temporaries understate the cost per row: hence the check."""
  *sections, field = batch_key(cfg, job).split('.')
  batch = first
  for _ in range(tries):
    if batch < 1:
      break
    trial = copy.deepcopy(cfg)
    node = trial
    for section in sections:
      node = node[section]
    node[field] = batch
    program = BUILDERS[job](trial, target.devices)
    compiled, _, _, oom = compile_program(program)
    if oom is None:
      mem = memory_report(compiled)
      if target.chip is None or mem['total_bytes'] <= target.chip.hbm_bytes:
        return batch, mem['total_bytes']
      oom = {'temp_bytes': mem['temp_bytes'], 'available_bytes': target.chip.hbm_bytes}
    div = parallel.batch_divisor(program.mesh)
    rows = batch // div
    fixed = _per_device_bytes(program.args)
    per_row = oom['temp_bytes'] / rows
    estimate = int((oom['available_bytes'] - fixed) // per_row) * div if per_row > 0 else 0
    batch = min(estimate, int(0.9 * batch) // div * div)
  return None, None


def analyse(cfg, job: str, target: Target, *, measure: bool = False, config_name: str = '',
            confirm: bool = True):
  """Builds, lowers and compiles `job` for `target`; returns (report dict, compiled).

  When the compiler refuses the batch (out of HBM) and `confirm`, the suggested batch is checked
  by compiling it (`confirm_batch`)."""
  if job not in JOBS:
    raise AotError(f'--job={job!r} is not valid: use one of {list(JOBS)}')
  check_target_config(cfg, job, target)
  config_lib.validate(cfg)
  if measure and target.topology != 'local':
    raise AotError('--measure runs the step: it needs --topology=local (the attached devices)')
  try:
    program = BUILDERS[job](cfg, target.devices, concrete=measure)
  except ValueError as e:
    if isinstance(e, AotError):
      raise
    raise AotError(' '.join(str(e).split())) from None
  compiled, lower_s, compile_s, oom = compile_program(program)
  if oom is not None:            # the TPU compiler itself refused: it does not fit
    mem, cost = oom_memory_report(program, oom), {}
    if target.chip is not None:  # what the compiler says it can use of the chip's HBM
      target = dataclasses.replace(target, chip=dataclasses.replace(
          target.chip, hbm_bytes=oom['available_bytes']))
  else:
    mem = memory_report(compiled)
    cost = _cost(compiled)
  flops = float(cost.get('flops', 0.0))
  bytes_accessed = float(cost.get('bytes accessed', 0.0))
  n_dev = len(program.mesh.devices.flat)
  model_flops = model_flops_per_step(cfg, job, program.global_batch)
  # XLA's cost analysis counts a loop body once (the samplers' lax.scan over steps, the distill
  # loss's lax.map over position chunks): the estimate takes the larger of the compiler's FLOPs
  # and the model FLOPs, and for samplers the body's bytes times the steps.
  loops = int(cfg.sampler.steps) if job == 'sample' else 1
  est_flops = max(flops, model_flops / n_dev)
  est_bytes = bytes_accessed * loops
  chip = target.chip
  hbm = chip.hbm_bytes if chip else None
  report = {
      'job': job, 'config': config_name, 'topology': target.name,
      'topology_name': target.topology, 'num_slices': target.num_slices,
      'platform': target.platform, 'device_kind': target.device_kind,
      'chip': dataclasses.asdict(chip) if chip else None,
      'devices': len(target.devices), 'hosts': target.num_hosts,
      'mesh': dict(zip(parallel.AXES, (int(program.mesh.shape[a]) for a in parallel.AXES))),
      'global_batch': program.global_batch, 'length': int(cfg.model.length),
      'tokens_per_step': program.tokens_per_step, 'donated': program.donated,
      'donated_bytes': program.state_bytes,
      'compute_dtype': cfg.model.compute_dtype, 'remat': bool(cfg.model.get('remat', False)),
      'memory': dict(mem, hbm_bytes=hbm,
                     fraction_of_hbm=(mem['total_bytes'] / hbm) if hbm else None),
      'cost': {'flops_per_device': flops, 'bytes_accessed_per_device': bytes_accessed,
               'model_flops_per_step': model_flops,
               'estimate_flops_per_device': est_flops, 'estimate_bytes_per_device': est_bytes,
               'loop_note': '' if batch_key(cfg, job) == SDTT_BATCH_KEY else LOOP_NOTES[job]},
      'roofline': roofline(est_flops, est_bytes, program.tokens_per_step, chip),
      'lower_seconds': lower_s, 'compile_seconds': compile_s,
      'measured_peak_bytes': None, 'measured': False,
  }
  report['verdict'] = verdict(cfg, program, mem, hbm, refused=oom is not None)
  if oom is not None:
    report['compiler_refused'] = oom['message']
    v = report['verdict']
    if confirm and v['max_global_batch']:
      batch, total = confirm_batch(cfg, job, target, v['max_global_batch'])
      key = v['batch_key']
      v['confirmed_batch'], v['confirmed_total_bytes'] = batch, total
      first = f'--config.{key}={v["max_global_batch"]} '
      rest = v['fix'][v['fix'].index(first) + len(first):] if first in v['fix'] else ''
      rest = rest[rest.index(')') + 1:] if ')' in rest else rest
      if batch is not None:
        v['max_global_batch'] = batch
        v['fix'] = (f'--config.{key}={batch} (confirmed by a compile: {total / GiB:.2f} GiB per '
                    f'device)' + rest)
      else:
        v['max_global_batch'] = 0
        v['fix'] = rest.lstrip(', or ') or 'a larger topology or a smaller model'
      v['message'] = f'DOES NOT FIT ({mem["total_bytes"] / GiB:.2f} of {hbm / GiB:.2f} GiB per ' \
                     f'device): set {v["fix"]}'
  if measure and compiled is not None:
    report['measured_peak_bytes'] = measure_peak(program, compiled)
    report['measured'] = True
  return report, compiled


# ============================================================================ output


def _gib(x) -> str:
  if x is None:
    return 'n/a'
  return f'{x / GiB:.2f} GiB' if abs(x) >= GiB / 4 else f'{x / 2 ** 20:.1f} MiB'


def _num(x: Optional[float], unit: str = '') -> str:
  if x is None:
    return 'n/a'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.3g} {prefix}{unit}'
  return f'{x:.3g} {unit}'.rstrip()


def format_report(r: dict) -> str:
  m, c, rf, v = r['memory'], r['cost'], r['roofline'], r['verdict']
  chip = r['chip']
  mesh = ' x '.join(str(r['mesh'][a]) for a in parallel.AXES)
  where = f"{r['topology']}" + (f" ({r['topology_name']})" if r['topology_name'] not in
                                (r['topology'], 'local') else '')
  hbm = f" of {_gib(m['hbm_bytes'])} HBM ({100 * m['fraction_of_hbm']:.0f}%)" \
      if m['hbm_bytes'] else ' (HBM capacity unknown)'
  rows = [
      ('target', f"{where}: {r['devices']} x {r['device_kind']}, {r['hosts']} host(s), "
                 f"{r['num_slices']} slice(s)"),
      ('mesh (data x fsdp x tensor)', mesh),
      ('global batch', f"{r['global_batch']} ({v['rows_per_device']} per device) x L={r['length']}"
                       f", {r['tokens_per_step']:,} tokens/step, {r['compute_dtype']} matmuls"
                       + (', remat' if r['remat'] else '')),
      ('arguments / device', _gib(m['argument_bytes'])),
      ('outputs / device', _gib(m['output_bytes'])),
      (f"aliased / device (donated: {r['donated']})", '- ' + _gib(m['alias_bytes'])),
      ('temporaries / device', _gib(m['temp_bytes'])),
      ('generated code / device', _gib(m['generated_code_bytes'])),
      ('TOTAL / device', _gib(m['total_bytes']) + hbm),
  ]
  if 'compiler_refused' in r:
    rows += [('compiler', 'REFUSED (out of HBM); memory above: its temporaries figure, the '
                          'arguments from their shardings'),
             ('HBM the compiler can use / device', _gib(m['hbm_bytes']))]
  rows += [
      ('compiler FLOPs / step / device', _num(c['flops_per_device'], 'FLOP')),
      ('compiler bytes accessed / step / device', _num(c['bytes_accessed_per_device'], 'B')),
      ('model FLOPs / step / device (bench.py formulas)',
       _num(c['model_flops_per_step'] / r['devices'], 'FLOP')),
  ]
  if c['loop_note']:
    rows.append(('note', c['loop_note']))
  if rf['seconds_per_step'] is not None:
    rows += [('roofline step time (ESTIMATE)',
              f"{rf['seconds_per_step'] * 1e3:.3g} ms ({rf['bound']}-bound at "
              f"{_num(chip['peak_flops'], 'FLOP/s')} bf16, {_num(chip['hbm_bandwidth'], 'B/s')} HBM"
              ' per chip; no communication)'),
             ('roofline tokens/s (ESTIMATE)', _num(rf['tokens_per_second']))]
  else:
    rows += [('roofline (ESTIMATE)', 'n/a: no published peak for this device')]
  rows.append(('compile time', f"{r['compile_seconds']:.1f} s (lowering {r['lower_seconds']:.1f} s)"))
  if r['measured']:
    rows.append(('measured peak / device (one step, random inputs)',
                 _gib(r['measured_peak_bytes']) if r['measured_peak_bytes'] is not None
                 else 'n/a (this backend keeps no memory statistics)'))
  width = max(len(k) for k, _ in rows)
  lines = [f"didi_jax AOT: {r['job']} step of {r['config'] or 'the config'} "
           '(roofline figures are estimates, not measurements)',
           f"| {'per step':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
  lines += [f'| {k:<{width}} | {val} |' for k, val in rows]
  lines.append(f"verdict: {v['message']}")
  return '\n'.join(lines)


# ============================================================================ CLI


def _define_flags():
  config = config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/NAME.py[:PRESET]); override fields with '
      '--config.a.b=value.', lock_config=True)
  flags.DEFINE_string('topology', None, "TPU topology (v5p:4x4x4, v5e:16x16, v4:2x2x4, ...), an "
                      "accelerator type (v5p-128, v5e-256, ...) or 'local'.")
  flags.DEFINE_integer('num_slices', 1, 'TPU slices joined over the data-centre network.')
  flags.DEFINE_string('job', '', 'pretrain | distill | sample (default: config.job).')
  flags.DEFINE_string('json', '', 'Also write the report as JSON to this file.')
  flags.DEFINE_bool('measure', False, 'With --topology=local: run one step on random inputs and '
                    'report the measured peak memory.')
  flags.mark_flags_as_required(['config', 'topology'])
  return config


def _parse(argv, config_flag):
  try:
    rest = flags.FLAGS(argv)
    _ = config_flag.value.job                     # config files load lazily: fail now
    return rest
  except flags.Error as e:
    _fail(f'error: {" ".join(str(e).split())[:400]}')
  except OSError as e:
    _fail(f'error: cannot load the config: {" ".join(str(e).split())[:300]}')
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    key = str(e).strip('"\'')
    _fail(f'config error: unknown config key {key!r} in {" ".join(bad) or argv[1:]}: check '
          'the spelling against didi_jax/config.py')
  except ValueError as e:
    _fail(f'config error: {" ".join(str(e).split())}')
  return None


def _fail(message: str, code: int = 2):
  print(message, file=sys.stderr)
  sys.exit(code)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  config_flag = _define_flags()
  if any(a in ('-h', '--help', '--helpshort') for a in argv[1:]):
    print(__doc__.strip() + '\n\nflags:\n' + flags.FLAGS.module_help(sys.modules[__name__]))
    return 0
  rest = _parse(argv, config_flag)
  if len(rest) > 1:
    _fail(f'error: unexpected arguments {rest[1:]}: use --flag=value')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.topology != 'local' and not os.environ.get('JAX_PLATFORMS'):
    jax.config.update('jax_platforms', 'cpu')     # compile-only: start no accelerator runtime
  cfg = config_flag.value
  config_name = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  try:
    job = FLAGS.job or default_job(cfg)
    target = make_target(FLAGS.topology, FLAGS.num_slices)
    report, _ = analyse(cfg, job, target, measure=FLAGS.measure, config_name=config_name)
  except (AotError, errors.UserError) as e:
    _fail(f'config error: {" ".join(str(e).split())}')
  print(format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1, default=float)
  fits = report['verdict']['fits']
  return 1 if fits is False else 0


if __name__ == '__main__':
  sys.exit(main())
