r"""Throughput / MFU benchmarks: pretrain step, DiDi iteration, ancestral and RGAS sampling.

  python -m didi_jax.bench all --size small --length 1024            # the H100 run (reference rows: BENCHMARKS.md)
  python -m didi_jax.bench train --size tiny --length 32 --batch 8 --iters 2 --warmup 1
  python -m didi_jax.bench sample --size demo --steps 8,16,32 --sparse --json bench.jsonl
  python -m didi_jax.bench distill --config=configs/demo.py       # a preset's model and recipe

Networks get random weights of the requested size, or of a config file's model with
`--config` (as `python -m didi_jax.main --config`: model, distillation recipe, mesh and batches
from the file; no checkpoint or data is read). Every workload is
compiled ahead of time (compile seconds reported separately), run `--warmup` times, then timed
for `--iters` iterations, each ended by `block_until_ready`; the table shows the median.

Workloads and their model FLOPs (2 FLOPs per multiply-accumulate; attention 4·L²·d per layer
per forward, as in `sampling/cost.py`; rematerialisation is not counted):
  train    `pretrain.Trainer.train_step` at B×L: 3 × forward per sequence (forward + backward),
           = 6 × matmul params + 12·L·d·layers per token (small, L=1024: 0.854 GFLOP/token).
  distill  one `distill.make_distill_step` iteration, B data rows × G samples = N rows:
           student 3 × (1 + N) forwards (the all-[MASK] first step runs on one row, docs/method.md §7.4;
           backward = 2 × forward), teacher (1 + N) forwards (KL terms), discriminator forward on
           2N rows + backward on 2N rows (2 × the trainable blocks and head: frozen blocks need no
           gradient), reward pass on N rows (its trainable blocks and head: the frozen blocks'
           output is shared with the update when distill.dropout = 0, docs/method.md §7.4).
  sample   ancestral sampling at B=64 with N steps (+ noise removal), measured student forwards:
           forwards × B × (trunk + attention) + projected rows × 2·d·V. `--sparse` adds the
           reveal-only path (`sampler.sparse_reveal`), whose projected rows are measured.
  rgas     16-step RGAS at B=64 (docs/method.md §8.3, M = 4): `cost.sampler_cost('rgas')` × B.
Tokens/s: B·L per second (train, samplers); for distill the N·L student tokens per second.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from didi_jax import config as config_lib
from didi_jax import hostmem
from didi_jax.distill import didi as distill
from didi_jax import models
from didi_jax import parallel
from didi_jax.checkpoint import loader
from didi_jax.models.discriminator import Spectral
from didi_jax.sampling import cost as cost_lib
from didi_jax.sampling import runner
from didi_jax.train import distill_state as ds
from didi_jax.train import pretrain

WORKLOADS = ('train', 'distill', 'sample', 'rgas')
SIZES = ('tiny', 'demo', 'small', 'medium', 'large')
DEFAULT_LENGTH = {'tiny': 64, 'demo': 256, 'small': 1024, 'medium': 1024, 'large': 1024}
GPT2_VOCAB = 50258           # GPT-2 BPE + [MASK]
BYTE_VOCAB = 258             # bytes + EOS + [MASK] (the CPU demo)
DEFAULT_BATCH = {'train': 32, 'distill': 8, 'sample': 64, 'rgas': 64}
BASELINES = ('none', 'torch', 'torch-eager')
TORCH_WORKLOADS = ('train', 'sample')   # workloads with a PyTorch baseline (bench_torch.py)
TORCH_IMPLS = ('torch eager', 'torch.compile')
TERA = 1e12
GIGA = 1e9

# Dense bf16 peaks (TFLOP/s per chip, vendor specs). Matched against `device_kind` in order.
BF16_PEAK_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100', 989.4), ('H200', 989.4), ('GH200', 989.4),
    ('B200', 2250.0), ('A100', 312.0), ('L4', 121.0), ('A10', 125.0),
    ('TPU v6', 918.0), ('TPU v5p', 459.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5', 459.0),  # JAX names a v5p chip 'TPU v5' (a v5e is 'TPU v5 lite', matched above)
    ('TPU v4', 275.0), ('TPU v3', 123.0),
)
# True float32 (no TF32: our float32 mode uses Precision.HIGHEST) where it differs from bf16.
FP32_PEAK_TFLOPS = (('H100 PCIe', 51.0), ('H100', 67.0), ('H200', 67.0), ('A100', 19.5))
# Measured practical ceilings (BENCHMARKS.md reference rows: bf16 8192³ matmul through JAX on one H100 80GB).
PRACTICAL_CEILING_TFLOPS = (('H100', 802.0),)
# CPU rough peak: cores × CPU_GHZ × FLOPs per cycle per core (two FMA pipes: 64 fp32 with
# AVX-512, 32 with AVX2, 16 otherwise). Override with --peak_tflops.
CPU_GHZ = 2.5

# The reference rows of BENCHMARKS.md (one H100 80GB; small DiT, L = 1024). `match` keys must all agree.
REFERENCES = (
    dict(match=dict(workload='train', size='small', length=1024, batch=32),
         tok_s=254e3, name='torch.compile',
         text='ref (H100): torch eager 161k tok/s, torch.compile 254k tok/s (0.129 s); plain JAX '
              'cuDNN attention 248k, XLA attention 131k, masked-only projection 277k; '
              'target >= 1.6x torch.compile = 406k tok/s'),
    dict(match=dict(workload='sample', size='small', length=1024, batch=64, steps=16,
                    sparse=False),
         tok_s=32.1e3, name='torch.compile',
         text='ref (H100): torch eager 23.0k tok/s, torch.compile 32.1k tok/s (2.04 s); plain JAX '
              'Gumbel-max 59k; target >= 4x torch.compile = 128k tok/s'),
    dict(match=dict(workload='sample', size='small', length=1024, batch=64, steps=16,
                    sparse=True),
         tok_s=32.1e3, name='torch.compile',
         text='ref (H100): reveal-only probe 112k tok/s (0.585 s) = 3.5x torch.compile 32.1k; '
              'target >= 4x = 128k tok/s'),
    dict(match=dict(workload='sample', size='small', length=1024, batch=64, steps=8,
                    sparse=True),
         tok_s=211e3, name='the reveal-only probe',
         text='ref (H100): reveal-only probe, 8 steps, 211k tok/s (0.310 s)'),
    dict(match=dict(workload='rgas', size='small', length=1024, steps=16),
         tok_s=6.7e3, name='torch eager RGAS',
         text='ref (H100): PyTorch eager RGAS 6.7k tok/s at B=32, 74 GB (B=64 does not fit in '
              '80 GB); target >= 4x = 26.8k tok/s at B=64 within 40 GB'),
    dict(match=dict(workload='distill', size='small', length=1024, batch=8, group=4),
         tok_s=None, name='',
         text='target (H100): one DiDi iteration at B*G = 32 under 0.25 s'),
)


# ============================================================================ FLOPs


def train_flops_per_token(model_cfg, length: Optional[int] = None) -> float:
  """6 × matmul params + 12·L·d·layers (attention): 3 × the forward per token."""
  L = int(model_cfg.length if length is None else length)
  return 3.0 * cost_lib.student_forward_flops(model_cfg, L) / L


def distill_flops(model_cfg, batch: int, group: int, unfreeze_blocks: int,
                  kl_on: bool = True, shared_prefix: bool = False) -> dict:
  """Model FLOPs of one DiDi iteration, by part (see the module docstring); `shared_prefix`:
  the reward pass runs only the trainable blocks and the head (`distill.shares_disc_prefix`)."""
  n = batch * group
  f_s = cost_lib.student_forward_flops(model_cfg)
  f_d = cost_lib.disc_forward_flops(model_cfg)
  trunk = cost_lib.trunk_dense_flops(model_cfg) + cost_lib.attention_flops(model_cfg)
  frac = unfreeze_blocks / max(1, int(model_cfg.n_blocks))
  d_bwd = 2.0 * (frac * trunk + cost_lib.disc_head_flops(model_cfg))
  parts = {
      'student_fwd_bwd': 3.0 * (1 + n) * f_s,
      'teacher_fwd': (1 + n) * f_s if kl_on else 0.0,
      'disc_fwd': 2 * n * f_d,
      'disc_bwd': 2 * n * d_bwd,
      'reward_fwd': n * (frac * trunk + cost_lib.disc_head_flops(model_cfg) if shared_prefix
                         else f_d),
  }
  parts['total'] = sum(parts.values())
  return parts


def sample_flops(model_cfg, batch: int, forwards: float, projected_rows: float) -> float:
  """Executed FLOPs of an ancestral run: trunks on every forward, the output layer per row."""
  L = int(model_cfg.length)
  trunk = cost_lib.trunk_dense_flops(model_cfg, L) + cost_lib.attention_flops(model_cfg, L)
  per_row = cost_lib.output_layer_flops(model_cfg, 1)
  return forwards * batch * trunk + projected_rows * per_row


# ============================================================================ devices


def _lookup(table, kind: str) -> Optional[float]:
  for key, value in table:
    if key.lower() in kind.lower():
      return value
  return None


def cpu_model_name() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def cpu_flops_per_cycle() -> int:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((l for l in f if l.startswith('flags')), '').split()
  except OSError:
    flags = []
  if 'avx512f' in flags:
    return 64
  if 'avx2' in flags and 'fma' in flags:
    return 32
  return 16


def cpu_peak_tflops() -> float:
  return (os.cpu_count() or 1) * CPU_GHZ * GIGA * cpu_flops_per_cycle() / TERA


@dataclasses.dataclass
class DeviceInfo:
  platform: str
  kind: str
  count: int
  peak_tflops: float           # per device, for the dtype benchmarked
  peak_source: str
  ceiling_tflops: Optional[float]   # measured practical ceiling (H100: 802), per device

  @property
  def label(self) -> str:
    return f'{self.count}x {self.kind}'


def device_info(dtype: str, peak_override: Optional[float] = None) -> DeviceInfo:
  dev = jax.devices()[0]
  plat, count = dev.platform, jax.device_count()
  if plat == 'cpu':
    kind = f'{cpu_model_name()} ({os.cpu_count()} cores)'
    peak, src = cpu_peak_tflops(), (f'rough: {os.cpu_count()} cores x {CPU_GHZ} GHz x '
                                    f'{cpu_flops_per_cycle()} FLOP/cycle')
    # Fake devices (--xla_force_host_platform_device_count) share the same cores.
    peak /= count
  else:
    kind = dev.device_kind
    peak = None
    if dtype == 'float32':
      peak = _lookup(FP32_PEAK_TFLOPS, kind)
    peak = peak if peak is not None else _lookup(BF16_PEAK_TFLOPS, kind)
    src = 'vendor dense spec' if peak is not None else 'unknown device: pass --peak_tflops'
    peak = peak or float('nan')
  ceiling = _lookup(PRACTICAL_CEILING_TFLOPS, kind) if (plat != 'cpu' and dtype == 'bfloat16') \
      else None
  if peak_override:
    peak, src = float(peak_override), '--peak_tflops'
  return DeviceInfo(plat, kind, count, peak, src, ceiling)


# ============================================================================ timing


@dataclasses.dataclass
class Timing:
  seconds: list
  compile_seconds: float
  memory_gb: Optional[float]


def _memory_gb(compiled) -> Optional[float]:
  """XLA's per-program estimate: arguments + outputs + temporaries − aliased (donated)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30
  except Exception:  # pylint: disable=broad-except
    return None


def time_program(jitted, args: tuple, *, warmup: int, iters: int,
                 next_args: Callable[[tuple, Any], tuple]) -> tuple[Timing, Any]:
  """Compiles `jitted` for `args`, runs warm-up + timed iterations; returns (timing, last out).

  `next_args(args, out)` gives the next call's arguments (threads donated state through).
  """
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = _memory_gb(compiled)
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(compiled(*args))
    args = next_args(args, out)
  seconds = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - t0)
    args = next_args(args, out)
  return Timing(seconds, compile_s, mem), out


# ============================================================================ workloads


def bench_config(size: str, length: int, vocab: int, dtype: str, attention: str):
  cfg = config_lib.base_config()
  cfg.model = config_lib.model_config(size, vocab_size=vocab, length=length)
  cfg.model.compute_dtype = dtype
  cfg.model.attention_impl = attention
  if vocab != GPT2_VOCAB:
    cfg.data.tokenizer = 'byte'
    cfg.data.source = 'shakespeare'
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  return cfg


def load_config_file(spec: str):
  """The ConfigDict of `PATH` or `PATH:PRESET`: the file's get_config(PRESET), as
  `python -m didi_jax.main --config` reads it."""
  path, _, preset = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config file {path!r} (e.g. configs/demo.py)')
  module_spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def config_batch(cfg, workload: str) -> int:
  """A config's batch for a workload: pretrain, distill (data rows B) or sample batch."""
  section = {'train': 'pretrain', 'distill': 'distill'}.get(workload, 'sample')
  return int(cfg[section].batch_size)


def _tokens(key, batch: int, length: int, vocab: int) -> np.ndarray:
  return np.asarray(jax.random.randint(key, (batch, length), 0, vocab - 1), np.int32)


def run_train(cfg, batch: int, warmup: int, iters: int) -> dict:
  with cfg.unlocked():
    cfg.pretrain.batch_size = batch
  with tempfile.TemporaryDirectory() as workdir:
    trainer = pretrain.Trainer(cfg, workdir)
  state = trainer.fresh_state()
  params = _nondegenerate(state['params'])
  state = dict(state, params=params, ema=jax.tree.map(jnp.copy, params))
  host_params = jax.device_get(params)     # the step donates the state: keep the start weights
  x = parallel.global_batch(trainer.mesh, _tokens(jax.random.PRNGKey(1), batch,
                                                  cfg.model.length, cfg.model.vocab_size))
  timing, _ = time_program(trainer.train_step, (state, x, trainer.run_key), warmup=warmup,
                           iters=iters, next_args=lambda a, out: (out[0],) + a[1:])
  L = cfg.model.length
  return dict(timing=timing, flops=batch * L * train_flops_per_token(cfg.model),
              tokens=batch * L, shape=f'B={batch} L={L}', batch=batch, params=host_params,
              forwards=1)


def _nondegenerate(params):
  """Every all-zero parameter (the zero-initialised adaLN and output layers) gets small random
  values, so that a parity check of logits compares something (timing does not depend on it)."""
  leaves, treedef = jax.tree.flatten(params)

  @jax.jit
  def fill(leaves):
    return [jnp.where(jnp.all(a == 0), 0.02 * jax.random.normal(jax.random.PRNGKey(i), a.shape,
                                                                 a.dtype), a)
            for i, a in enumerate(leaves)]
  return jax.tree.unflatten(treedef, fill(leaves))


def _random_teacher_params(model_cfg, seed: int = 0):
  return _nondegenerate(jax.jit(lambda: nnx.state(models.build(model_cfg, seed=seed),
                                                  nnx.Param))())


def run_distill(cfg, batch: int, group: int, warmup: int, iters: int) -> dict:
  unfreeze = min(int(cfg.distill.disc_unfreeze_blocks), int(cfg.model.n_blocks))
  with cfg.unlocked():
    cfg.distill.batch_size, cfg.distill.group_size = batch, group
    cfg.distill.disc_unfreeze_blocks = unfreeze
  mesh = parallel.make_mesh(cfg.mesh)
  teacher = parallel.shard_params(mesh, _random_teacher_params(cfg.model))
  state = jax.jit(lambda tp: ds.init_distill_state(cfg, tp, jax.random.PRNGKey(1)))(teacher)
  state = jax.device_put(state, parallel.param_shardings(mesh, state))
  student_gd, disc_gd = ds.make_graphdefs(cfg)
  step = jax.jit(distill.make_distill_step(cfg, student_gd, disc_gd), donate_argnums=0)
  L = cfg.model.length
  x = parallel.global_batch(mesh, _tokens(jax.random.PRNGKey(2), batch, L,
                                          cfg.model.vocab_size))
  key = jax.random.PRNGKey(3)
  timing, _ = time_program(step, (state, teacher, x, key), warmup=warmup, iters=iters,
                           next_args=lambda a, out: (out[0],) + a[1:])
  d = cfg.distill
  flops = distill_flops(cfg.model, batch, group, unfreeze, distill.kl_enabled(d),
                        distill.shares_disc_prefix(d))
  return dict(timing=timing, flops=flops['total'], flops_parts=flops, tokens=batch * group * L,
              shape=f'B={batch} G={group} L={L}', batch=batch, group=group)


def _networks(cfg, with_disc: bool):
  model_cfg = cfg.model
  gd = models.split_abstract(model_cfg)[0]
  den = loader.Network('student_ema', model_cfg, gd, _random_teacher_params(model_cfg))
  disc = None
  if with_disc:
    dgd = models.split_abstract(model_cfg, 'discriminator')[0]

    def init():
      _, p, s = nnx.split(models.build(model_cfg, 'discriminator', seed=1), nnx.Param, Spectral)
      return p, s
    params, spectral = jax.jit(init)()
    disc = loader.Network('discriminator', model_cfg, dgd, params, spectral)
  return den, disc


def run_sampler(cfg, kind: str, batch: int, steps: int, sparse: bool, warmup: int,
                iters: int) -> dict:
  with cfg.unlocked():
    s = cfg.sampler
    s.kind, s.steps, s.sparse_reveal = kind, int(steps), bool(sparse)
  mesh = parallel.make_mesh(cfg.mesh)
  den, disc = _networks(cfg, kind == 'rgas')
  L, mask_id = int(cfg.model.length), int(cfg.model.vocab_size) - 1
  params = parallel.shard_params(mesh, den.params)
  dparams = None
  if disc is not None:
    dparams = (parallel.shard_params(mesh, disc.params),
               jax.device_put(disc.spectral, parallel.replicated(mesh)))
  fn = runner.make_sample_fn(cfg.sampler, den, disc, batch_size=batch, length=L, mask_id=mask_id)
  x_init = parallel.global_batch(mesh, np.full((batch, L), mask_id, np.int32))
  base = jax.random.PRNGKey(0)
  counter = iter(range(1, 1 << 30))
  timing, out = time_program(
      fn, (params, dparams, base, x_init), warmup=warmup, iters=iters,
      next_args=lambda a, _: (a[0], a[1], jax.random.fold_in(base, next(counter)), a[3]))
  stats = {k: np.asarray(v) for k, v in jax.device_get(out[1]).items()}
  forwards = float(stats['student_forwards'])
  hits = float(stats.get('cache_hits', 0))
  if kind == 'rgas':
    r = cfg.sampler.rgas
    c = cost_lib.sampler_cost(cfg.model, 'rgas', int(steps), num_candidates=int(r.num_candidates),
                              rerank_ratio=float(r.rerank_ratio), cache_hits=int(hits),
                              noise_removal=cfg.sampler.noise_removal != 'none')
    flops = c.flops * batch
    shape = f'B={batch} L={L} N={steps} M={int(r.num_candidates)}'
  else:
    rows = float(stats['projected_rows']) if sparse else forwards * batch * L
    flops = sample_flops(cfg.model, batch, forwards, rows)
    shape = f'B={batch} L={L} N={steps}' + (' sparse' if sparse else '')
  extra = {'student_forwards': forwards, 'cache_hits': hits}
  if sparse:
    extra.update(projected_rows=float(stats['projected_rows']),
                 dense_fallbacks=float(stats['dense_fallbacks']))
  return dict(timing=timing, flops=flops, tokens=batch * L, shape=shape, batch=batch,
              steps=int(steps), sparse=bool(sparse), stats=extra, params=den.params,
              forwards=int(forwards))


# ============================================================================ PyTorch baseline


def torch_baseline(workload: str, cfg, res: dict, warmup: int, iters: int,
                   impls: Sequence[str] = TORCH_IMPLS) -> list:
  """(impl, result or error text) for torch eager and torch.compile on `res`'s weights and shapes.

  Checks the logits against ours once (bench_torch.check_parity) before timing anything.
  """
  from didi_jax import bench_torch as bt  # pylint: disable=import-outside-toplevel
  device = bt.default_device()
  autocast = bt.autocast_dtype(cfg.model.compute_dtype)
  m = cfg.model
  B, L, mask_id = res['batch'], int(m.length), int(m.vocab_size) - 1
  model = bt.from_jax(m, res['params'], device)
  # The parity check runs in float32 whatever is timed (bf16 autocast and our bf16 matmuls
  # round differently): the same weights must give the same logits.
  m32 = m.copy_and_resolve_references()
  with m32.unlocked():
    m32.compute_dtype = 'float32'
  gd = models.split_abstract(m32)[0]
  fwd = jax.jit(lambda p, x, s: nnx.merge(gd, p)(x, s))
  ids = _tokens(jax.random.PRNGKey(5), min(B, 4), L, int(m.vocab_size))
  sigma = np.linspace(0.0, 2.0, ids.shape[0]).astype(np.float32)
  err = bt.check_parity(model, lambda x, s: fwd(res['params'], x, s), ids, sigma)
  out = []
  for impl in impls:
    try:
      model.train(workload == 'train')
      net = model if impl == 'torch eager' else bt.compiled(model)
      counted = bt.Counted(net)
      calls = []
      if workload == 'train':
        x = bt.tokens(B, L, int(m.vocab_size), device)
        step = bt.make_train_step(model, cfg.pretrain, mask_id, autocast=autocast,
                                  forward=counted)
        fn = lambda: calls.append(step(x) is not None)
      else:
        fn = lambda: calls.append(bt.ancestral_sample(
            counted, B, L, mask_id, res['steps'], device=device, autocast=autocast)[1])
      t = bt.time_fn(fn, warmup=warmup, iters=iters, device=device)
      work = dict(torch_forwards=(len(counted.shapes) if workload == 'train' else sum(calls))
                  / len(calls), jax_forwards=res['forwards'],
                  torch_shapes=sorted({str(s) for s in counted.shapes}))
      out.append((impl, dict(res, timing=Timing(t['seconds'], t['first_s'], None),
                             parity_rel_err=err, torch_device=device, work=work)))
    except Exception as e:  # pylint: disable=broad-except
      msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
      out.append((impl, f'{type(e).__name__}: {msg}'))
  return out


# ============================================================================ table


def reference_for(row: dict) -> Optional[dict]:
  for ref in REFERENCES:
    if all(row.get(k) == v for k, v in ref['match'].items()):
      return ref
  return None


def _context(workload: str, args, dev: DeviceInfo) -> dict:
  ctx = dict(workload=workload, size=args.size, length=args.length, vocab=args.vocab,
             dtype=args.dtype, attention=args.attention, device=dev.label, platform=dev.platform,
             iters=args.iters, warmup=args.warmup, peak_tflops=dev.peak_tflops * dev.count,
             peak_source=dev.peak_source, jax_version=jax.__version__,
             time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  if dev.platform == 'cpu' and hasattr(os, 'getloadavg'):
    ctx['loadavg'] = [round(x, 2) for x in os.getloadavg()]   # shared machines: record the load
  if dev.platform == 'cpu':
    ctx['allocator'] = hostmem.allocator()       # malloc's cost is part of every CPU number
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      ctx['device_peak_gb'] = stats['peak_bytes_in_use'] / 2**30  # process peak so far
  except Exception:  # pylint: disable=broad-except
    pass
  return ctx


def error_row(workload: str, error: str, args, dev: DeviceInfo) -> dict:
  return dict(_context(workload, args, dev), shape='', error=error)


def make_row(workload: str, res: dict, args, dev: DeviceInfo) -> dict:
  t = res['timing']
  med = statistics.median(t.seconds)
  tflops = res['flops'] / med / TERA
  peak_total = dev.peak_tflops * dev.count
  row = dict(
      _context(workload, args, dev), shape=res['shape'],
      seconds_median=med, seconds_min=min(t.seconds), seconds=t.seconds,
      tokens_per_s=res['tokens'] / med, tflop_per_iter=res['flops'] / TERA,
      tflops=tflops, mfu=tflops / peak_total if peak_total == peak_total else None,
      mfu_ceiling=(tflops / (dev.ceiling_tflops * dev.count)) if dev.ceiling_tflops else None,
      compile_s=t.compile_seconds, memory_gb=t.memory_gb)
  for k in ('batch', 'group', 'steps', 'sparse', 'stats', 'flops_parts', 'parity_rel_err',
            'torch_device', 'work'):
    if k in res:
      row[k] = res[k]
  return row


def _fmt_tok(x: float) -> str:
  if x >= 1e6:
    return f'{x / 1e6:.2f}M'
  if x >= 1e4:
    return f'{x / 1e3:.1f}k'
  return f'{x:.0f}'


def _fmt_s(x: float) -> str:
  return f'{x:.4f}' if x < 1 else f'{x:.3f}'


def format_table(rows: Sequence[dict], dev: DeviceInfo) -> str:
  """A Markdown table plus notes (references, formulas)."""
  show_ceiling = any(r.get('mfu_ceiling') is not None for r in rows)
  head = ['workload', 'shape', 's/iter (median)', 'tokens/s', 'TFLOP/iter', 'TFLOP/s',
          f'MFU (peak {rows[0]["peak_tflops"]:.3g})' if rows else 'MFU']
  if show_ceiling:
    head.append(f'MFU (measured ceiling {dev.ceiling_tflops * dev.count:.0f})')
  head += ['compile s', 'mem GB (XLA est.)', 'device']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    if 'error' in r:
      cells = [r['workload'] + _impl(r), f'FAILED: {r["error"]}'] + [''] * (len(head) - 3) + [r['device']]
      lines.append('| ' + ' | '.join(cells) + ' |')
      continue
    cells = [r['workload'] + _impl(r), r['shape'], _fmt_s(r['seconds_median']), _fmt_tok(r['tokens_per_s']),
             f'{r["tflop_per_iter"]:.4g}', f'{r["tflops"]:.3g}',
             f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a']
    if show_ceiling:
      cells.append(f'{100 * r["mfu_ceiling"]:.1f}%' if r['mfu_ceiling'] is not None else 'n/a')
    cells += [f'{r["compile_s"]:.1f}',
              f'{r["memory_gb"]:.2f}' if r['memory_gb'] is not None else 'n/a', r['device']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = [f'peak: {dev.peak_tflops:.4g} TFLOP/s per device ({dev.peak_source}); dtype '
           f'{rows[0]["dtype"] if rows else "?"}, attention {rows[0]["attention"] if rows else "?"}'
           f'; median of {rows[0]["iters"] if rows else 0} timed iterations after '
           f'{rows[0]["warmup"] if rows else 0} warm-up.']
  if rows and rows[0].get('loadavg'):
    notes.append(f'load average at the start: {rows[0]["loadavg"]} on {os.cpu_count()} CPUs '
                 '(a shared machine slows every number)')
  if rows and rows[0].get('allocator'):
    notes.append(f'host allocator: {rows[0]["allocator"]} (didi_jax.hostmem)')
  on_h100 = 'h100' in dev.kind.lower()
  for r in rows:
    ref = reference_for(r) if 'error' not in r else None
    if ref is None:
      continue
    note = f'{r["workload"]} {r["shape"]}: {ref["text"]}'
    if on_h100 and ref['tok_s']:
      note += f'; this run = {r["tokens_per_s"] / ref["tok_s"]:.2f}x {ref["name"]}'
    elif on_h100 and r['workload'] == 'distill':
      note += f'; this run {r["seconds_median"]:.3f} s'
    elif not on_h100:
      note += ' (H100 numbers: not comparable on this device)'
    notes.append(note)
  for r in rows:
    if 'speedup' in r:
      w = r['work']
      notes.append(
          f'{r["workload"]} {r["shape"]}: {r["impl"]} {r["seconds_median"]:.3f} s/iter = '
          f'**{r["speedup"]:.2f}x** our time (> 1: ours is faster; same process, same weights, '
          f'logits max rel. error {r["parity_rel_err"]:.1e}; network calls per iteration ours '
          f'{w["jax_forwards"]:g} / torch {w["torch_forwards"]:g} on {", ".join(w["torch_shapes"])}'
          f'; torch on {r["torch_device"]}, "compile s" = its first call)')
  for r in rows:
    if r['workload'] == 'distill' and 'flops_parts' in r:
      p = r['flops_parts']
      terms = ' + '.join(f'{k} {v / TERA:.4g}T' for k, v in p.items() if k != 'total')
      notes.append(f'distill FLOPs/iter = {terms} = {p["total"] / TERA:.4g}T')
    if r.get('stats'):
      s = r['stats']
      notes.append(f'{r["workload"]} {r["shape"]}: ' + ', '.join(
          f'{k} {v:g}' for k, v in s.items()))
  return '\n'.join(lines) + '\n\n' + '\n'.join(f'- {n}' for n in notes)


# ============================================================================ CLI


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: X)" only for real defaults (a None default's help says what happens)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m didi_jax.bench',
      description='Throughput / MFU of the pretrain step, the DiDi iteration and the samplers '
                  'on random-weight networks (see the module docstring for the FLOP formulas).',
      formatter_class=_HelpFormatter)
  p.add_argument('workload', choices=WORKLOADS + ('all',), help='what to time')
  p.add_argument('--size', choices=SIZES, default=None,
                 help='model size (config.MODEL_SIZES; default small)')
  p.add_argument('--length', type=int, default=None,
                 help='sequence length L (default: small/medium/large 1024, demo 256, tiny 64)')
  p.add_argument('--vocab', type=int, default=None,
                 help=f'vocabulary incl. [MASK] (default: {GPT2_VOCAB} for small and up, '
                      f'{BYTE_VOCAB} for tiny/demo)')
  p.add_argument('--batch', type=int, default=None,
                 help='batch for every selected workload (default: train 32, distill 8 data rows, '
                      'sample/rgas 64)')
  p.add_argument('--group', type=int, default=None,
                 help="distill: samples per data row G (default 4, or the config's)")
  p.add_argument('--config', type=str, default=None,
                 help='a config file, PATH or PATH:PRESET as for python -m didi_jax.main: its '
                      'model, distillation recipe, mesh and batches (pretrain, distill B and G, '
                      'sample) instead of --size/--length/--vocab; --batch, --group, --dtype and '
                      '--attention still override')
  p.add_argument('--steps', '--nfe', type=str, default='16',
                 help='sampler steps N (sample, rgas); a comma list gives one row each')
  p.add_argument('--sparse', action='store_true',
                 help='sample: also time the reveal-only path (sampler.sparse_reveal)')
  p.add_argument('--iters', type=int, default=5, help='timed iterations (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed iterations after compiling')
  p.add_argument('--dtype', choices=('bfloat16', 'float32'), default=None,
                 help='matmul dtype (default: float32 on CPU, bfloat16 elsewhere)')
  p.add_argument('--attention', choices=('xla', 'cudnn', 'auto'), default='auto',
                 help='jax.nn.dot_product_attention implementation (auto: JAX picks)')
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='peak TFLOP/s per device for MFU (default: vendor dense spec by device kind; '
                      f'CPU: rough cores x {CPU_GHZ} GHz x FLOP/cycle)')
  p.add_argument('--baseline', choices=BASELINES, default='none',
                 help='torch: after each train/sample row, time our PyTorch DiT (same weights, '
                      'logits checked equal first) eagerly and under torch.compile in the same '
                      "process, with the ratio (needs torch: pip install -e '.[bench]'); "
                      'torch-eager: the eager row only')
  p.add_argument('--json', type=str, default=None, help='append the rows to this JSONL file')
  args = p.parse_args(argv)
  args.file_cfg = None
  if args.config is not None:
    if (args.size, args.length, args.vocab) != (None, None, None):
      p.error('--config takes the model from the file: leave out --size, --length and --vocab')
    try:
      args.file_cfg = load_config_file(args.config)
    except Exception as e:  # pylint: disable=broad-except
      p.error(f'--config={args.config}: {type(e).__name__}: '
              f'{(str(e).strip().splitlines() or [""])[0]}')
    m = args.file_cfg.model
    args.size, args.length, args.vocab = args.config, int(m.length), int(m.vocab_size)
    if args.dtype is None:
      args.dtype = str(m.compute_dtype)
    if args.group is None:
      args.group = int(args.file_cfg.distill.group_size)
  if args.size is None:
    args.size = 'small'
  if args.group is None:
    args.group = 4
  if args.length is None:
    args.length = DEFAULT_LENGTH[args.size]
  if args.vocab is None:
    args.vocab = BYTE_VOCAB if args.size in ('tiny', 'demo') else GPT2_VOCAB
  if args.dtype is None:
    args.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  try:
    args.steps = [int(s) for s in str(args.steps).split(',') if s.strip()]
  except ValueError:
    p.error(f'--steps={args.steps!r}: use integers, e.g. --steps 16 or --steps 8,16,32')
  for name in ('iters', 'group', 'length', 'vocab'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1')
  if args.warmup < 0:
    p.error('--warmup must be >= 0')
  if args.batch is not None and args.batch < 1:
    p.error('--batch must be >= 1')
  if not args.steps or min(args.steps) < 1:
    p.error('--steps needs positive integers, e.g. --steps 16')
  if args.attention == 'cudnn' and jax.default_backend() != 'gpu':
    p.error('--attention=cudnn needs a GPU: use --attention=xla or auto')
  return args


def run(args: argparse.Namespace) -> list[dict]:
  dev = device_info(args.dtype, args.peak_tflops)
  workloads = WORKLOADS if args.workload == 'all' else (args.workload,)
  rows = []

  def cfg():
    if args.config is None:
      return bench_config(args.size, args.length, args.vocab, args.dtype, args.attention)
    c = copy.deepcopy(args.file_cfg)         # a copy: the runners change it
    c.model.compute_dtype = args.dtype
    if args.attention != 'auto':
      c.model.attention_impl = args.attention
    return c

  def batch(w):
    return args.batch or (config_batch(args.file_cfg, w) if args.file_cfg is not None
                          else DEFAULT_BATCH[w])

  for w in workloads:
    if w == 'train':
      jobs = [('train', lambda: run_train(cfg(), batch(w), args.warmup, args.iters))]
    elif w == 'distill':
      jobs = [('distill', lambda: run_distill(cfg(), batch(w), args.group, args.warmup,
                                              args.iters))]
    else:
      variants = [False, True] if (w == 'sample' and args.sparse) else [False]
      jobs = [(w, (lambda n=n, sp=sp, w=w: run_sampler(cfg(), 'rgas' if w == 'rgas' else
                                                       'ancestral', batch(w), n, sp,
                                                       args.warmup, args.iters)))
              for n in args.steps for sp in variants]
    for name, job in jobs:
      print(f'[bench] {name} ...', file=sys.stderr, flush=True)
      try:
        res = job()
        row = make_row(name, res, args, dev)
      except Exception as e:  # pylint: disable=broad-except
        # One workload failing (e.g. out of memory) must not lose the others' rows.
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f'[bench] {name} FAILED: {type(e).__name__}: {msg}', file=sys.stderr, flush=True)
        rows.append(error_row(name, f'{type(e).__name__}: {msg}', args, dev))
        continue
      _progress(row)
      rows.append(row)
      if args.baseline != 'none' and name in TORCH_WORKLOADS and not row.get('sparse'):
        rows += torch_rows(name, cfg(), res, row, args, dev)
  return rows


def _progress(row: dict):
  print(f'[bench] {row["workload"]}{_impl(row)} {row["shape"]}: {row["seconds_median"]:.4f} '
        f's/iter, {_fmt_tok(row["tokens_per_s"])} tok/s (compile {row["compile_s"]:.1f} s)',
        file=sys.stderr, flush=True)


def _impl(row: dict) -> str:
  return f' ({row["impl"]})' if row.get('impl', 'jax') != 'jax' else ''


def torch_rows(name: str, cfg, res: dict, ours: dict, args, dev: DeviceInfo) -> list[dict]:
  """The PyTorch rows after our row `ours`; each carries `speedup` = its time / ours."""
  print(f'[bench] {name}: PyTorch baseline ...', file=sys.stderr, flush=True)
  rows = []
  impls = TORCH_IMPLS if args.baseline == 'torch' else TORCH_IMPLS[:1]
  try:
    results = torch_baseline(name, cfg, res, args.warmup, args.iters, impls)
  except Exception as e:  # pylint: disable=broad-except
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    results = [(impl, f'{type(e).__name__}: {msg}') for impl in impls]
  for impl, r in results:
    if isinstance(r, str):
      print(f'[bench] {name} ({impl}) FAILED: {r}', file=sys.stderr, flush=True)
      rows.append(dict(error_row(name, r, args, dev), impl=impl))
      continue
    row = dict(make_row(name, dict(r, stats=None), args, dev), impl=impl)
    del row['stats']                                     # the sampler statistics are ours
    row['compile_s'] = r['timing'].compile_seconds       # torch: the first call (compiles)
    row['speedup'] = row['seconds_median'] / ours['seconds_median']
    _progress(row)
    rows.append(row)
  return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  rows = run(args)
  dev = device_info(args.dtype, args.peak_tflops)
  print(format_table(rows, dev), flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'a', encoding='utf-8') as f:
      for r in rows:
        f.write(json.dumps(r, default=float) + '\n')
  return 1 if any('error' in r for r in rows) else 0


if __name__ == '__main__':
  sys.exit(main())
