"""Drawing many samples from loaded networks: batching, sharding, jit, statistics, cost.

`generate` is what the `sample`, `evaluate`, `sweep` and `distill` (periodic samples) jobs call.
Batch b of a run uses key `fold_in(PRNGKey(seed), b)`, so samples depend only on (seed, batch
size, settings) — not on the number of devices: the batch is sharded over the mesh's batch axes
and JAX's partitionable PRNG gives identical draws on any layout.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from didi_jax import parallel
from didi_jax.models import dit
from didi_jax.sampling import categorical, cost as cost_lib
from didi_jax.sampling import sample_from_config
from jax.experimental import multihost_utils


@dataclasses.dataclass
class SampleResult:
  ids: np.ndarray               # (S, L) int32
  stats: dict                   # summed over batches: student_forwards, cache_hits, ...
  cost: dict                    # per sample (docs/method.md §9), from measured cache hits
  seconds: float                # wall time of sampling (compile excluded)
  compile_seconds: float
  settings: dict                # everything that moves a number


def sampler_settings(sampler_cfg, network: str, nfe: int) -> dict:
  s = sampler_cfg
  out = {'sampler': s.kind, 'network': network, 'nfe': int(nfe),
         'regime': categorical.Regime.from_config(s).as_dict(),
         'sigma': s.student_sigma, 'output': s.student_output, 'noise_removal': s.noise_removal,
         'cache': bool(s.cache), 'top_p': float(s.top_p), 'temperature': float(s.temperature),
         'sparse_reveal': bool(s.get('sparse_reveal', False))}
  if s.kind == 'rgas':
    out['rgas'] = s.rgas.to_dict()
  return out


# XLA:CPU compile options for the forward-only sampler programs (same math; float32 results may
# differ in the last bits), chosen by the tokens each device computes per forward (batch x length
# / devices). Below CPU_EIGEN_TOKENS: matrix products alone in YNNPACK library calls, elementwise
# work (LayerNorm, adaLN, broadcasts) left to XLA's own fusions instead of fused into the library
# calls. From CPU_EIGEN_TOKENS on: no library at all, every product in XLA's Eigen runtime, which
# splits the (batch x heads)-batched attention products over the cores where the library runs
# each on one thread. Measured on the 2-core CPU (BENCHMARKS.md, 16-step sampler, L=256): B=8
# 0.89 s library vs 1.00 s Eigen; B=16 2.07 vs 2.07 (the preset's model: 1.41 vs 1.35); B=32
# 4.38 vs 4.10; B=64 9.05 vs 8.28 s.
CPU_FORWARD_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
CPU_EIGEN_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}
CPU_EIGEN_TOKENS = 4096


def forward_compiler_options(tokens_per_device: int = 0) -> dict | None:
  """XLA compile options for a forward-only sampler program on this process's backend: on a CPU,
  `CPU_EIGEN_OPTIONS` from `CPU_EIGEN_TOKENS` tokens per device and forward on, else
  `CPU_FORWARD_OPTIONS`; elsewhere None (XLA defaults)."""
  if jax.default_backend() != 'cpu':
    return None
  return dict(CPU_EIGEN_OPTIONS if tokens_per_device >= CPU_EIGEN_TOKENS else CPU_FORWARD_OPTIONS)


def make_sample_fn(sampler_cfg, denoiser, disc=None, *, batch_size: int, length: int,
                   mask_id: int):
  """A jitted fn(params, disc_params, key, x_init) -> (ids, stats) for the given networks."""
  gd = denoiser.graphdef
  dgd = disc.graphdef if disc is not None else None

  def fn(params, dparams, key, x_init):
    model = nnx.merge(gd, params)
    denoise = lambda x, s: model(x, s)  # noqa: E731
    disc_fn = None
    if dgd is not None:
      dmodel = nnx.merge(dgd, *dparams)
      disc_fn = dmodel      # RGAS calls it with soft_input='probs' on its soft input
    return sample_from_config(sampler_cfg, key, batch_size, length, mask_id,
                              denoise_fn=denoise, disc_fn=disc_fn,
                              features_fn=lambda x, s: model.features(x, s),
                              project_fn=model.projection,
                              x_init=x_init)
  options = forward_compiler_options(batch_size * length // jax.device_count())

  def traced(*args):
    # Without XLA's library reductions (either CPU option set) the attention's row max runs fast
    # only by halving (models.dit.row_max_by_halving).
    with dit.row_max_by_halving(options is not None):
      return fn(*args)
  return jax.jit(traced, compiler_options=options)


def host_value(x) -> np.ndarray:
  """The whole value of a jax.Array on this host, also when its shards live on other processes
  (multi-host: every process gets every row)."""
  if getattr(x, 'is_fully_addressable', True) or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_batch_size(mesh, batch_size: int) -> None:
  div = parallel.batch_divisor(mesh)
  if batch_size % div:
    raise ValueError(f'sample batch size {batch_size} is not divisible by the {div} devices of '
                     f'the batch axes: use a multiple of {div} (--config.sample.batch_size)')


def network_shardings(mesh, denoiser, disc=None):
  """(denoiser params, (disc params, disc spectral) or None) shardings, as `generate` lays the
  networks out (parameters by the rules table, spectral vectors replicated)."""
  params_sh = parallel.param_shardings(mesh, denoiser.params)
  if disc is None:
    return params_sh, None
  rep = parallel.replicated(mesh)
  return params_sh, (parallel.param_shardings(mesh, disc.params),
                     jax.tree.map(lambda _: rep, disc.spectral))


def generate(sampler_cfg, denoiser, disc=None, *, num_samples: int, batch_size: int,
             seed: int, mesh=None, log_every: int = 0) -> SampleResult:
  """Draws `num_samples` sequences with `sampler_cfg` from `denoiser` (a loader.Network)."""
  if sampler_cfg.kind == 'rgas' and disc is None:
    raise ValueError("sampler.kind='rgas' needs a discriminator: sample a distillation run's "
                     "student, or use --config.sampler.kind=ancestral")
  categorical.check_precision(sampler_cfg.precision)
  model_cfg = denoiser.model_cfg
  length, mask_id = int(model_cfg.length), int(model_cfg.vocab_size) - 1
  mesh = mesh or parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  check_batch_size(mesh, batch_size)
  params_sh, dparams_sh = network_shardings(mesh, denoiser, disc)
  params = jax.device_put(denoiser.params, params_sh)
  dparams = None if disc is None else jax.device_put((disc.params, disc.spectral), dparams_sh)
  fn = make_sample_fn(sampler_cfg, denoiser, disc, batch_size=batch_size, length=length,
                      mask_id=mask_id)
  n_batches = -(-num_samples // batch_size)
  base = jax.random.PRNGKey(seed)
  x_init = parallel.global_batch(mesh, np.full((batch_size, length), mask_id, np.int32))
  outs, totals = [], {}
  t_compile = time.time()
  fn = fn.lower(params, dparams, base, x_init).compile()
  compile_s = time.time() - t_compile
  t0 = time.time()
  for b in range(n_batches):
    ids, stats = fn(params, dparams, jax.random.fold_in(base, b), x_init)
    ids = host_value(ids)
    stats = jax.tree.map(host_value, stats)
    if sampler_cfg.noise_removal != 'none' and int(stats['masked_remaining']) != 0:
      raise RuntimeError(f'{int(stats["masked_remaining"])} [MASK] tokens survived noise '
                         'removal: this is a bug, please report it')
    outs.append(ids)
    for k, v in stats.items():
      v = np.asarray(v)
      if v.ndim == 0:
        totals[k] = totals.get(k, 0) + v.item()
    if log_every and (b + 1) % log_every == 0:
      print(f'  sampled {(b + 1) * batch_size}/{n_batches * batch_size}', flush=True)
  seconds = time.time() - t0
  ids_all = np.concatenate(outs)[:num_samples]
  hits_per_batch = totals.get('cache_hits', 0) / n_batches
  kind = 'rgas' if sampler_cfg.kind == 'rgas' else 'ancestral'
  c = cost_lib.sampler_cost(
      model_cfg, kind, int(sampler_cfg.steps),
      num_candidates=int(sampler_cfg.rgas.num_candidates),
      rerank_ratio=float(sampler_cfg.rgas.rerank_ratio), cache_hits=hits_per_batch,
      noise_removal=sampler_cfg.noise_removal != 'none')
  totals = {k: v / n_batches for k, v in totals.items()}     # per batch = per sample (batched)
  return SampleResult(ids=ids_all, stats=totals, cost=c.as_dict(), seconds=seconds,
                      compile_seconds=compile_s,
                      settings=sampler_settings(sampler_cfg, denoiser.role,
                                                int(sampler_cfg.steps)))


def tokens_per_second(res: SampleResult) -> float:
  return float(res.ids.size / max(res.seconds, 1e-9))
