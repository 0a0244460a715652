r"""didi_jax command line.

  python -m didi_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR [--config.a.b=VALUE ...]

Jobs (`--config.job=...`):
  pretrain  train an MDLM teacher (or, with model.kind=ar, the autoregressive baseline)
  distill   distil the teacher (teacher.checkpoint) into a few-step student: DiDi-Instruct, or
            SDTT with distill.method=sdtt
  sample    draw samples from a checkpoint (teacher / student / student EMA) into WORKDIR/samples
  evaluate  Gen PPL + entropy of a samples file, or of fresh samples from a checkpoint
  sweep     NFE x sampler x model grid -> WORKDIR/sweep/{results.json, results.md, curve.png}
  pipeline  the configs' end-to-end run (e.g. demo: distill -> sweep)
  ablate    one distillation per ablation row, then their sweep (docs/ablation.md)
  compare   DiDi-Instruct and SDTT from one teacher with matched compute, then one sweep

Configs (presets after ':'):
  configs/demo.py            the embedded default: shipped Shakespeare teacher -> distill -> sweep
  configs/demo.py:teacher    how the shipped demo teacher was trained
  configs/demo.py:smoke      tiny end-to-end run on CPU in minutes (mechanics only)
  configs/demo.py:gpu        GPT-2 BPE Shakespeare, the small DiT at L=256, for one GPU
  configs/owt.py             the paper: distil the OWT teacher (teacher.checkpoint) at L=1024
  configs/owt.py:teacher     the paper's teacher recipe (MDLM on OpenWebText)
  configs/owt.py:sdtt        the SDTT recipe on the OWT teacher
  configs/demo.py:compare    DiDi-Instruct against SDTT on the shipped demo teacher
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from didi_jax import artifacts, errors, jobs, parallel

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/NAME.py[:PRESET]); override fields with '
    '--config.a.b=value.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics.jsonl, '
                               'samples/, sweep/. A run resumes from here.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_job(cfg, workdir: str) -> dict:
  """Validates the config and the workdir, then dispatches on cfg.job; returns the summary."""
  jobs.check(cfg)
  artifacts.ensure_workdir(workdir)
  return jobs.JOBS[cfg.job](cfg, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: use --config.a.b=value overrides')
  logging.getLogger().setLevel(logging.WARNING)
  parallel.maybe_initialize_distributed()
  cfg = _CONFIG.value
  workdir = os.path.expanduser(_WORKDIR.value)
  try:
    summary = run_job(cfg, workdir)
  except errors.ConfigError as e:
    print(f'config error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)
  except (errors.UserError, FileNotFoundError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)
  if summary is not None:
    if jax.process_index() == 0:
      print('summary: ' + json.dumps(summary, default=str), flush=True)


def _parse_flags(argv):
  """absl flag parsing with one-line errors for unknown config keys, bad presets, missing files."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS['config'].present or flags.FLAGS.config is not None:
      _ = _CONFIG.value.job               # config files load lazily: surface errors now
    return rest
  except flags.Error as e:
    print(f'error: {_condense(e)}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    print(f'error: cannot load the config: {_condense(e)} (paths are relative to the current '
          'directory, e.g. --config=configs/demo.py)', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    key = str(e).strip('"\'')
    print(f'config error: unknown config key {key!r} in {" ".join(bad) or argv[1:]}: check the '
          'spelling against didi_jax/config.py (base_config) or configs/*.py', file=sys.stderr)
    sys.exit(2)
  except ValueError as e:
    print(f'config error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


def _one_line(e: Exception) -> str:
  return ' '.join(str(e).split())


def _condense(e: Exception) -> str:
  """The innermost 'SomeError: message' of a (possibly nested) error text, on one line."""
  text = str(e)
  found = re.findall(r'(?:\w+Error|Errno \d+\]): (.+)', text)
  if found:
    return found[-1].strip()
  return ' '.join(text.split())[:400]


def run_cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
