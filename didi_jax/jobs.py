"""The table of jobs: pretrain, distill, sample, evaluate, sweep, the end-to-end pipeline, ablate,
compare.

Each job takes (config, workdir) and returns a summary dict; `didi_jax.main` dispatches through
`JOBS` and nothing else.
"""
from __future__ import annotations

import copy
import os

import numpy as np

from didi_jax import ablation, compare, samples
from didi_jax import config as config_lib
from didi_jax.distill import didi
from didi_jax.evaluation import distill_curve, evaluate, judges, metrics, sweep
from didi_jax.train import family, pretrain

# Jobs that load judges: their judge names (and the 'demo-bytes' asset) are checked up front.
JUDGING_JOBS = ('evaluate', 'sweep', 'ablate', 'compare')


def check(cfg) -> None:
  """Everything checked before any work: the config's own values (`config.validate`), then
  what the jobs' modules know (each judge resolves; the ablation's rows). ConfigError, one line."""
  config_lib.validate(cfg)
  if config_lib.is_protein(cfg) and cfg.job in ('evaluate', 'ablate', 'compare'):
    raise config_lib.ConfigError(f'job={cfg.job} judges text: for proteins run --config.job=sweep '
                                 '(the protein metrics per model and NFE)')
  if cfg.job in JUDGING_JOBS and not config_lib.is_protein(cfg):
    judges.check_judge_name(cfg.eval.judge, 'eval.judge')
    for name in config_lib.parse_list(cfg.eval.extra_judges, 'eval.extra_judges'):
      judges.check_judge_name(name, 'eval.extra_judges')
  if cfg.eval.mauve and cfg.job in ('sweep', 'pipeline', 'ablate', 'compare') and \
      not config_lib.is_protein(cfg):
    metrics.require_mauve()                  # the optional package, named with its pip command
  if cfg.job in ('distill', 'pipeline'):
    distill_curve.check(cfg)
    if didi.judge_rewarded(cfg.distill):
      judges.check_judge_name(cfg.distill.reward_judge, 'distill.reward_judge')
  if cfg.job == 'ablate':
    ablation.check(cfg)
  if cfg.job == 'compare':
    compare.check(cfg)


def sample_job(cfg, workdir: str) -> dict:
  """Draws sample.num_samples sequences and writes WORKDIR/samples/<name>.jsonl."""
  s = cfg.sample
  res = samples.draw_samples(cfg, workdir, network=cfg.sampler.network,
                             num_samples=s.num_samples, batch_size=s.batch_size, seed=s.seed,
                             explicit=s.checkpoint)
  name = s.name or samples.sample_name(cfg.sampler, cfg.sampler.network, s.seed)
  path = samples.write_samples(cfg, workdir, res, name)
  out = {'samples': path, 'num_samples': int(res.ids.shape[0]),
         'entropy': float(np.mean(samples.unigram_entropy(res.ids))),
         'tokens_per_second': float(res.ids.size / max(res.seconds, 1e-9)),
         'nfe': res.cost['nfe'], 'student_forwards': res.cost['student_forwards'],
         'disc_forwards': res.cost['disc_forwards']}
  print(f'wrote {out["num_samples"]} samples to {path} '
        f'({out["tokens_per_second"]:,.0f} tok/s, entropy {out["entropy"]:.3f})', flush=True)
  return out


def pretrain_job(cfg, workdir: str) -> dict:
  return pretrain.run(cfg, workdir)


def evaluate_job(cfg, workdir: str) -> dict:
  return evaluate.run(cfg, workdir)


def sweep_job(cfg, workdir: str) -> dict:
  return sweep.run(cfg, workdir)


def distill_job(cfg, workdir: str) -> dict:
  return family.run(cfg, workdir, curve=distill_curve.Curve, reward_judge=judges.reward_judge)


def _stopped(out: dict, stage: str, total: int) -> dict:
  """Ends the pipeline after a stage that was stopped (SIGTERM/SIGINT) before it finished."""
  print(f'== pipeline: {stage} stopped at step {out[stage].get("step")} of {total}; the later '
        'stages did not run. Run the same command again to resume.', flush=True)
  out['stopped'] = stage
  return out


def pipeline_job(cfg, workdir: str) -> dict:
  """Pretrain (only when no teacher is given) -> distill -> sweep, each resumable.

  A stage stopped by a signal ends the pipeline (the next stages would otherwise start from a
  half-trained network); running the command again resumes that stage and continues.
  """
  out = {}
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    if not cfg.teacher.checkpoint:
      tdir = os.path.join(workdir, 'teacher')
      print(f'== pipeline: pretrain a teacher in {tdir}', flush=True)
      tcfg = copy.deepcopy(cfg)
      tcfg.job = 'pretrain'
      out['pretrain'] = pretrain_job(tcfg, tdir)
      if not out['pretrain'].get('complete'):
        return _stopped(out, 'pretrain', cfg.pretrain.num_steps)
      cfg.teacher.checkpoint = tdir
    print(f'== pipeline: distill into {workdir}', flush=True)
    out['distill'] = distill_job(cfg, workdir)
    if not out['distill'].get('complete'):
      return _stopped(out, 'distill', family.total_iterations(cfg))
    print('== pipeline: NFE sweep', flush=True)
    out['sweep'] = sweep_job(cfg, workdir)
  return out


JOBS = {
    'pretrain': pretrain_job,
    'distill': distill_job,
    'sample': sample_job,
    'evaluate': evaluate_job,
    'sweep': sweep_job,
    'pipeline': pipeline_job,
    'ablate': ablation.run,
    'compare': compare.run,
}
