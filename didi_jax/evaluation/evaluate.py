"""The `evaluate` job (docs/method.md §10): Gen PPL, entropy and validation NELBO of one sampler setting.

Scores `eval.samples_file` when set, otherwise draws `eval.num_samples` fresh samples with the
configured sampler and network (seed `eval.seed`) and writes them to WORKDIR/samples first.
Writes WORKDIR/eval/<name>.json with every setting that moves a number, and prints one line.

The helpers (`judge_scores`, `sample_quality`, `data_reference`, `validation_nelbo`,
`cost_fields`) are shared with the `sweep` job.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from didi_jax import artifacts, parallel, samples
from didi_jax.data import pipeline
from didi_jax.evaluation import judges, metrics
from didi_jax.train import pretrain

COST_KEYS = ('nfe', 'student_forwards', 'disc_forwards', 'disc_backwards', 'network_evaluations',
             'flops', 'tflops_per_sample')
Z_95 = 1.959963984540054     # two-sided 95% normal quantile (NELBO interval from its SE)


# ------------------------------------------------------------------------------------- helpers


def judge_scores(judge: judges.Judge, texts: Sequence[str], group_size: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(nll_sum_S, count_S) with one `score_texts` call per group of `group_size` texts.

  A call pads to its longest row, which decides the official pad-counting corner case (see
  judges.py), so groups mirror the sampling batches as the official evaluation does.
  """
  if group_size < 1:
    raise ValueError(f'judge group size {group_size} must be positive: set '
                     '--config.sample.batch_size to a positive value')
  nll, count = [], []
  for start in range(0, len(texts), group_size):
    n_S, c_S = judge.score_texts(list(texts[start:start + group_size]), batch_size)
    nll.append(n_S)
    count.append(c_S)
  if not nll:
    raise ValueError('no texts to score: draw samples first (eval.num_samples > 0)')
  return np.concatenate(nll), np.concatenate(count)


def sample_quality(judge: judges.Judge, ids_SxL: np.ndarray, texts: Sequence[str], *,
                   group_size: int, judge_batch_size: int, n_bootstrap: int,
                   seed: int, per_sample: Optional[dict] = None) -> dict:
  """metrics.summarize of judged texts plus judge-free statistics of the model ids. A
  `per_sample` dict receives the judge's per-sample arrays ('nll_sum', 'count')."""
  nll_S, count_S = judge_scores(judge, texts, group_size, judge_batch_size)
  if per_sample is not None:
    per_sample.update(nll_sum=nll_S, count=count_S)
  out = metrics.summarize(nll_S, count_S, np.asarray(ids_SxL), n_bootstrap=n_bootstrap,
                          seed=seed)
  out['gen_ppl_ci'] = list(out['gen_ppl_ci'])
  out['entropy_ci'] = list(out['entropy_ci'])
  return out


def data_reference(cfg, length: int, num_blocks: int, n_bootstrap: int, seed: int,
                   judge: Optional[judges.Judge] = None, group_size: int = 0,
                   judge_batch_size: int = 0) -> dict:
  """The data reference: unigram entropy of `num_blocks` validation blocks of `length` tokens
  and, when a `judge` is given, its Gen PPL of the same blocks decoded to text (what a perfect
  generator would score under this judge and context)."""
  blocks = pipeline.eval_batches(cfg.data, int(length), int(num_blocks), 1)[0]
  ent_S = samples.unigram_entropy(blocks)
  out = {'entropy': float(np.mean(ent_S)),
         'entropy_ci': list(metrics.bootstrap_ci(lambda x: float(np.mean(x)), [ent_S],
                                                 n_bootstrap, seed)),
         'num_blocks': int(blocks.shape[0]), 'length': int(length),
         'source': cfg.data.source, 'tokenizer': cfg.data.tokenizer}
  if judge is not None:
    q = sample_quality(judge, blocks, samples.decode_all(cfg, blocks),
                       group_size=int(group_size) or int(blocks.shape[0]),
                       judge_batch_size=int(judge_batch_size) or int(blocks.shape[0]),
                       n_bootstrap=n_bootstrap, seed=seed)
    out['gen_ppl'], out['gen_ppl_ci'] = q['gen_ppl'], q['gen_ppl_ci']
  return out


def validation_nelbo(cfg, network, *, num_batches: int, batch_size: int, seed: int,
                     mesh=None) -> dict:
  """MC estimate of the validation NELBO of a DiT `network` (antithetic t, fixed keys).

  Each batch gives one per-token NELBO; `nelbo_se` is their standard error across batches and
  `ppl_ci` is exp(nelbo ± 1.96·se).
  """
  if network.model_cfg.get('kind', 'dit') != 'dit':
    raise ValueError(f'validation NELBO needs a DiT network, not {network.model_cfg.kind!r}')
  ncfg = copy.deepcopy(cfg)
  with ncfg.unlocked():
    ncfg.model = copy.deepcopy(network.model_cfg)
    ncfg.pretrain.antithetic = True
  mesh = mesh or parallel.make_mesh(cfg.mesh)
  div = parallel.batch_divisor(mesh)
  if batch_size % div:
    raise ValueError(f'NELBO batch size {batch_size} is not divisible by the {div} devices of '
                     f'the batch axes: use a multiple of {div} (--config.sample.batch_size)')
  L = int(network.model_cfg.length)
  batches = pipeline.eval_batches(cfg.data, L, batch_size, num_batches)
  step = jax.jit(pretrain.make_eval_step(ncfg, network.graphdef))
  params = parallel.shard_params(mesh, network.params)
  key = jax.random.PRNGKey(seed)
  per_batch, total, count = [], 0.0, 0.0
  for i, b in enumerate(batches):
    s, c = step(params, parallel.global_batch(mesh, b), jax.random.fold_in(key, i))
    s, c = float(s), float(c)
    per_batch.append(s / max(c, 1.0))
    total += s
    count += c
  nelbo = total / max(count, 1.0)
  se = float(np.std(per_batch, ddof=1) / np.sqrt(len(per_batch))) if len(per_batch) > 1 \
      else float('nan')
  ci = [float(np.exp(min(nelbo - Z_95 * se, 50.0))), float(np.exp(min(nelbo + Z_95 * se, 50.0)))]
  return {'nelbo': nelbo, 'nelbo_se': se, 'ppl': float(np.exp(min(nelbo, 50.0))),
          'ppl_ci': ci, 'batches': len(per_batch), 'batch_size': int(batch_size),
          'antithetic': True, 'seed': int(seed), 'network': network.role,
          'source': network.source}


def cost_fields(cost: Optional[dict]) -> dict:
  """The §9 per-sample cost numbers (None where unknown)."""
  cost = cost or {}
  return {k: cost.get(k) for k in COST_KEYS}


def _judge_fields(cfg, judge_name: str) -> dict:
  return {'judge': judge_name, 'judge_context': int(cfg.eval.judge_context),
          'judge_batch_size': int(cfg.eval.judge_batch_size),
          'judge_group_size': int(cfg.sample.batch_size)}


# ----------------------------------------------------------------------------------------- job


def run(cfg, workdir: str) -> dict:
  """The evaluate job; returns the written record (also WORKDIR/eval/<name>.json)."""
  e = cfg.eval
  den = None
  t_start = time.time()
  if e.samples_file:
    path = os.path.expanduser(e.samples_file)
    ids, texts, settings = samples.read_samples(path)
    name = os.path.splitext(os.path.basename(path))[0]
    cost, stats = settings.pop('cost', None), settings.pop('stats', None)
    seconds = settings.get('seconds')
    compile_seconds = settings.get('compile_seconds')
    seed = settings.get('seed')
    samples_path = path
  else:
    network = cfg.sampler.network
    nets = samples.load_sampling_networks(cfg, workdir, network, cfg.sampler.kind,
                                       cfg.sample.checkpoint)
    den = nets[0]
    # float64 sampling needs 64-bit JAX: scoped to the draw, so the judge is unaffected.
    x64 = jax.enable_x64(True) if cfg.sampler.precision == 'float64' else contextlib.nullcontext()
    with x64:
      res = samples.draw_samples(cfg, workdir, network=network, num_samples=int(e.num_samples),
                              batch_size=int(cfg.sample.batch_size), seed=int(e.seed),
                              explicit=cfg.sample.checkpoint, nets=nets)
      settings = dict(res.settings, x64=bool(jax.config.jax_enable_x64))
    name = cfg.sample.name or samples.sample_name(cfg.sampler, network, int(e.seed))
    samples_path = samples.write_samples(cfg, workdir, res, name)
    ids, texts = res.ids, samples.decode_all(cfg, res.ids)
    cost, stats = res.cost, res.stats
    seconds, compile_seconds, seed = res.seconds, res.compile_seconds, int(e.seed)

  judge = judges.load_judge(e.judge, int(e.judge_context))
  quality = sample_quality(judge, ids, texts, group_size=int(cfg.sample.batch_size),
                           judge_batch_size=int(e.judge_batch_size),
                           n_bootstrap=int(e.bootstrap), seed=int(e.seed))
  reference = data_reference(cfg, ids.shape[1], ids.shape[0], int(e.bootstrap), int(e.seed),
                             judge, int(cfg.sample.batch_size), int(e.judge_batch_size))
  nelbo, nelbo_note = _nelbo_for(cfg, workdir, den, settings)

  out = {'name': name, 'samples': samples_path, **_judge_fields(cfg, e.judge),
         'num_samples': int(ids.shape[0]), 'length': int(ids.shape[1]), 'seed': seed,
         'network': settings.get('network'), 'source': settings.get('source'),
         'sampler': settings.get('sampler'), 'regime': settings.get('regime'),
         'sigma': settings.get('sigma'), 'sampler_settings': settings,
         **cost_fields(cost), 'stats': stats,
         'seconds': seconds, 'compile_seconds': compile_seconds,
         'tokens_per_second': (float(ids.size / seconds) if seconds else None),
         **quality, 'data_entropy': reference, 'nelbo': nelbo, 'bootstrap': int(e.bootstrap),
         'eval_seconds': time.time() - t_start, 'jax_version': jax.__version__,
         'backend': jax.default_backend(), 'x64': settings.get('x64')}
  if nelbo_note:
    out['nelbo_note'] = nelbo_note
  path = os.path.join(workdir, 'eval', name + '.json')
  artifacts.write_json(path, out)
  lo, hi = out['gen_ppl_ci']
  line = (f'eval {name}: Gen PPL {out["gen_ppl"]:.2f} [{lo:.2f}, {hi:.2f}] ({e.judge}, '
          f'ctx {e.judge_context}, {out["num_samples"]} samples) | entropy '
          f'{out["entropy"]:.3f} (data: entropy {reference["entropy"]:.3f}, Gen PPL '
          f'{reference["gen_ppl"]:.2f})')
  if nelbo:
    line += f' | val NELBO {nelbo["nelbo"]:.3f}±{nelbo["nelbo_se"]:.3f} (PPL {nelbo["ppl"]:.2f})'
  print(line + f' -> {path}', flush=True)
  out['path'] = path
  return out


def _nelbo_for(cfg, workdir: str, den, settings: dict):
  """(NELBO record or None, note) for the evaluated DiT network; skipped when not loadable."""
  n = int(cfg.eval.nelbo_batches)
  if n <= 0:
    return None, 'eval.nelbo_batches <= 0: NELBO not computed'
  if den is None:
    source, network = settings.get('source'), settings.get('network')
    if not source or network not in ('teacher', 'student', 'student_ema'):
      return None, ('the samples file names no DiT network/source: NELBO not computed (evaluate '
                    'with fresh samples to get it)')
    try:
      den, _ = samples.load_sampling_networks(cfg, workdir, network, 'ancestral', source)
    except (FileNotFoundError, ValueError) as err:
      print(f'eval: NELBO skipped, {network} from {source} does not load: {err}', flush=True)
      return None, f'network did not load: {err}'
  return validation_nelbo(cfg, den, num_batches=n, batch_size=int(cfg.sample.batch_size),
                          seed=int(cfg.eval.seed)), ''
