"""Samples on disk and the networks that draw them, for every job that samples.

Where a network comes from (`network_source`), loading the sampler's networks, drawing with the
configured sampler (`draw_samples`), and the samples file format (`write_samples` /
`read_samples`: one JSON object per line with ids and text; the first line also carries the
settings, statistics and cost of the run), and the judge-free statistics of token ids (unigram
entropy, n-gram repetition) that training, evaluation and the sweep report.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from didi_jax import artifacts, parallel
from didi_jax.checkpoint import loader
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.sampling import runner


def network_source(cfg, workdir: str, network: str, explicit: str = '') -> str:
  """Where network `network` comes from: an explicit source, else the teacher checkpoint for
  the teacher, else this workdir (a distillation run)."""
  if explicit:
    return explicit
  if network == 'teacher':
    if cfg.teacher.checkpoint:
      return cfg.teacher.checkpoint
    teacher_dir = os.path.join(workdir, 'teacher')
    if loader.checkpoint_dir(teacher_dir):
      return teacher_dir
    raise FileNotFoundError('no teacher: set --config.teacher.checkpoint=PATH (a pretrain '
                            'workdir, a checkpoint file or hf:ORG/NAME)')
  if loader.checkpoint_dir(workdir):
    return workdir
  raise FileNotFoundError(
      f'no {network} network: {workdir} holds no checkpoint; set --config.sample.checkpoint=... '
      '(or --config.teacher.checkpoint=... for the teacher)')


def load_sampling_networks(cfg, workdir: str, network: str, kind: str, explicit: str = ''):
  """(denoiser, discriminator or None) for sampler `kind` from the resolved source."""
  source = network_source(cfg, workdir, network, explicit)
  role = 'student_ema' if network == 'student_ema' else network
  den = loader.load(source, role, None if loader.checkpoint_dir(source) else cfg.model,
                      weights=cfg.teacher.weights)
  disc = None
  if kind == 'rgas':
    if network == 'teacher':
      raise ValueError("RGAS needs a discriminator, which a teacher has not: use "
                       "--config.sampler.kind=ancestral for the teacher")
    disc = loader.load(source, 'discriminator')
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


# ----------------------------------------------------------------------------- judge-free statistics

DEFAULT_NGRAM = 4


def unigram_entropy(ids_SxL: np.ndarray) -> np.ndarray:
  """Per-sample unigram entropy in nats, H = −Σ_v (c_v/L) ln(c_v/L); float64 (S,)."""
  ids = np.sort(np.asarray(ids_SxL), axis=1)
  S, L = ids.shape
  # Run lengths of equal ids in each sorted row are the counts c_v.
  starts = np.ones((S, L), bool)
  starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  out = np.empty((S,), np.float64)
  for s in range(S):
    idx = np.flatnonzero(starts[s])
    p = np.diff(np.append(idx, L)) / L
    out[s] = -np.sum(p * np.log(p))
  return out


def repeated_ngram_fraction(ids_SxL: np.ndarray, n: int = DEFAULT_NGRAM) -> np.ndarray:
  """Per sample, the fraction of its n-grams that repeat an earlier n-gram of the same sample
  (1 − distinct/total); float64 (S,). Judge-free diversity statistic."""
  ids = np.asarray(ids_SxL)
  S, L = ids.shape
  if not 1 <= n <= L:
    raise ValueError(f'n-gram order n={n} must lie in [1, sample length {L}]')
  grams = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)   # (S, L−n+1, n)
  out = np.empty((S,), np.float64)
  for s in range(S):
    distinct = np.unique(grams[s], axis=0).shape[0]
    out[s] = 1.0 - distinct / grams.shape[1]
  return out


def repeated_ngram_rate(ids_SxL: np.ndarray, n: int = DEFAULT_NGRAM) -> float:
  """Mean over samples of `repeated_ngram_fraction`."""
  return float(np.mean(repeated_ngram_fraction(ids_SxL, n)))
