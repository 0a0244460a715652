"""Jobs other than `pretrain` (which lives in train/pretrain.py): distill, sample, evaluate,
sweep and the end-to-end pipeline. Each takes (config, workdir) and returns a summary dict."""
from __future__ import annotations

import copy
import json
import os
import re

import numpy as np

from didi_jax import artifacts, networks, parallel
from didi_jax.data.tokenizers import get_tokenizer


def network_source(cfg, workdir: str, network: str, explicit: str = '') -> str:
  """Where network `network` comes from: an explicit source, else the teacher checkpoint for
  the teacher, else this workdir (a distillation run)."""
  if explicit:
    return explicit
  if network == 'teacher':
    if cfg.teacher.checkpoint:
      return cfg.teacher.checkpoint
    teacher_dir = os.path.join(workdir, 'teacher')
    if networks.checkpoint_dir(teacher_dir):
      return teacher_dir
    raise FileNotFoundError('no teacher: set --config.teacher.checkpoint=PATH (a pretrain '
                            'workdir, a checkpoint file or hf:ORG/NAME)')
  if networks.checkpoint_dir(workdir):
    return workdir
  raise FileNotFoundError(
      f'no {network} network: {workdir} holds no checkpoint; set --config.sample.checkpoint=... '
      '(or --config.teacher.checkpoint=... for the teacher)')


def load_sampling_networks(cfg, workdir: str, network: str, kind: str, explicit: str = ''):
  """(denoiser, discriminator or None) for sampler `kind` from the resolved source."""
  source = network_source(cfg, workdir, network, explicit)
  role = 'student_ema' if network == 'student_ema' else network
  den = networks.load(source, role, None if networks.checkpoint_dir(source) else cfg.model,
                      weights=cfg.teacher.weights)
  disc = None
  if kind == 'rgas':
    if network == 'teacher':
      raise ValueError("RGAS needs a discriminator, which a teacher has not: use "
                       "--config.sampler.kind=ancestral for the teacher")
    disc = networks.load(source, 'discriminator')
  _check_vocab(cfg, den.model_cfg)
  return den, disc


def _check_vocab(cfg, model_cfg):
  tok = get_tokenizer(cfg.data.tokenizer)
  if int(model_cfg.vocab_size) != tok.vocab_size + 1:
    raise ValueError(f'the network has vocabulary {model_cfg.vocab_size} but tokenizer '
                     f'{cfg.data.tokenizer!r} needs {tok.vocab_size + 1}: set '
                     '--config.data.tokenizer to the one the network was trained with')


def decode_all(cfg, ids_SxL: np.ndarray) -> list[str]:
  tok = get_tokenizer(cfg.data.tokenizer)
  return [tok.decode(row) for row in ids_SxL]


def sample_name(sampler_cfg, network: str, seed: int) -> str:
  s = sampler_cfg
  name = f'{network}_{s.kind}_nfe{s.steps}_{s.precision}_seed{seed}'
  if not s.cache:
    name += '_nocache'
  if s.top_p < 1:
    name += f'_topp{s.top_p:g}'
  return re.sub(r'[^A-Za-z0-9_.-]', '_', name)


def draw_samples(cfg, workdir: str, *, network: str, num_samples: int, batch_size: int,
                 seed: int, explicit: str = '', nets=None, mesh=None):
  from didi_jax.sampling import runner  # pylint: disable=import-outside-toplevel
  den, disc = nets or load_sampling_networks(cfg, workdir, network, cfg.sampler.kind, explicit)
  mesh = mesh or parallel.make_mesh(cfg.mesh)
  res = runner.generate(cfg.sampler, den, disc, num_samples=num_samples, batch_size=batch_size,
                        seed=seed, mesh=mesh)
  res.settings['source'] = den.source
  res.settings['seed'] = seed
  res.settings['num_samples'] = num_samples
  res.settings['seconds'] = res.seconds
  return res


def write_samples(cfg, workdir: str, res, name: str) -> str:
  texts = decode_all(cfg, res.ids)
  path = os.path.join(workdir, 'samples', name + '.jsonl')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for i, (row, text) in enumerate(zip(res.ids, texts)):
      rec = {'index': i, 'ids': row.tolist(), 'text': text}
      if i == 0:
        rec['settings'] = res.settings
        rec['stats'] = res.stats
        rec['cost'] = res.cost
      f.write(json.dumps(rec, default=artifacts.json_default) + '\n')
  os.replace(tmp, path)
  return path


def read_samples(path: str) -> tuple[np.ndarray, list[str], dict]:
  ids, texts, settings = [], [], {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      rec = json.loads(line)
      ids.append(rec['ids'])
      texts.append(rec['text'])
      if 'settings' in rec:
        settings = dict(rec['settings'], stats=rec.get('stats'), cost=rec.get('cost'))
  if not ids:
    raise ValueError(f'{path} holds no samples: regenerate it with --config.job=sample')
  return np.asarray(ids, np.int32), texts, settings


# ---------------------------------------------------------------------------------------- jobs


def sample_job(cfg, workdir: str) -> dict:
  """Draws sample.num_samples sequences and writes WORKDIR/samples/<name>.jsonl."""
  s = cfg.sample
  res = draw_samples(cfg, workdir, network=cfg.sampler.network, num_samples=s.num_samples,
                     batch_size=s.batch_size, seed=s.seed, explicit=s.checkpoint)
  name = s.name or sample_name(cfg.sampler, cfg.sampler.network, s.seed)
  path = write_samples(cfg, workdir, res, name)
  from didi_jax.evaluation import metrics  # pylint: disable=import-outside-toplevel
  out = {'samples': path, 'num_samples': int(res.ids.shape[0]),
         'entropy': float(np.mean(metrics.unigram_entropy(res.ids))),
         'tokens_per_second': float(res.ids.size / max(res.seconds, 1e-9)),
         'nfe': res.cost['nfe'], 'student_forwards': res.cost['student_forwards'],
         'disc_forwards': res.cost['disc_forwards']}
  print(f'wrote {out["num_samples"]} samples to {path} '
        f'({out["tokens_per_second"]:,.0f} tok/s, entropy {out["entropy"]:.3f})', flush=True)
  return out


def evaluate_job(cfg, workdir: str) -> dict:
  from didi_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.run(cfg, workdir)


def sweep_job(cfg, workdir: str) -> dict:
  from didi_jax.evaluation import sweep  # pylint: disable=import-outside-toplevel
  return sweep.run(cfg, workdir)


def distill_job(cfg, workdir: str) -> dict:
  from didi_jax.train import distill_loop  # pylint: disable=import-outside-toplevel
  return distill_loop.run(cfg, workdir)


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
  from didi_jax.train import pretrain  # pylint: disable=import-outside-toplevel
  out = {}
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    if not cfg.teacher.checkpoint:
      tdir = os.path.join(workdir, 'teacher')
      print(f'== pipeline: pretrain a teacher in {tdir}', flush=True)
      tcfg = copy.deepcopy(cfg)
      tcfg.job = 'pretrain'
      out['pretrain'] = pretrain.run(tcfg, tdir)
      if not out['pretrain'].get('complete'):
        return _stopped(out, 'pretrain', cfg.pretrain.num_steps)
      cfg.teacher.checkpoint = tdir
    print(f'== pipeline: distill into {workdir}', flush=True)
    out['distill'] = distill_job(cfg, workdir)
    if not out['distill'].get('complete'):
      return _stopped(out, 'distill', cfg.distill.num_iterations)
    print('== pipeline: NFE sweep', flush=True)
    out['sweep'] = sweep_job(cfg, workdir)
  return out


JOBS = {
    'distill': distill_job,
    'sample': sample_job,
    'evaluate': evaluate_job,
    'sweep': sweep_job,
    'pipeline': pipeline_job,
}
