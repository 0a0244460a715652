r"""didi_jax command line.

  python -m didi_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR [--config.a.b=VALUE ...]

`python -m didi_jax.main --help` lists the jobs (from the job table, `didi_jax.jobs.JOBS`) and
the configs with their presets (from each configs/*.py's own "Presets:" docstring).
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import textwrap
import warnings

from absl import app, flags
import jax
from ml_collections import config_flags

from didi_jax import artifacts, errors, jobs, parallel

_CONFIG_HELP = ('config file (configs/NAME.py[:PRESET]); override fields with '
                '--config.a.b=value')
_WORKDIR_HELP = 'run directory: checkpoints, metrics.jsonl, samples/, sweep/; a run resumes here'
_CONFIG = config_flags.DEFINE_config_file('config', None, _CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, _WORKDIR_HELP)
flags.mark_flags_as_required(['config', 'workdir'])


USAGE = ('python -m didi_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR '
         '[--config.a.b=VALUE ...]')
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# One line per job of `jobs.JOBS` (the help lists the table's jobs in its order).
JOB_HELP = {
    'pretrain': 'train an MDLM teacher (or, with model.kind=ar, the autoregressive baseline)',
    'distill': 'distil the teacher (teacher.checkpoint) into a few-step student: DiDi-Instruct, '
               'or SDTT with distill.method=sdtt',
    'sample': 'draw samples from a checkpoint (teacher / student / student EMA) into '
              'WORKDIR/samples',
    'evaluate': 'Gen PPL + entropy of a samples file, or of fresh samples from a checkpoint',
    'sweep': 'NFE x sampler x model grid -> WORKDIR/sweep/{results.json, results.md, curve.png}',
    'pipeline': "the configs' end-to-end run (pretrain if no teacher) -> distill -> sweep",
    'ablate': 'the ablation table: one distillation per row, then each row swept and judged '
              '(docs/ablation.md)',
    'compare': 'DiDi-Instruct and SDTT from one teacher with matched compute, then one sweep',
}
_PRESET_ENTRY = re.compile(r'^  (\(none\)|\w+)\s{2,}(\S.*)$')


def config_presets(path: str) -> list:
  """[(preset, one-line description)] of a config file, read from its docstring's "Presets:"
  block ('' is the file without a preset)."""
  with open(path, encoding='utf-8') as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ''
  block = doc.split('Presets:', 1)[1] if 'Presets:' in doc else ''
  out = []
  for line in block.splitlines():
    m = _PRESET_ENTRY.match(line)
    if m:
      out.append(['' if m.group(1) == '(none)' else m.group(1), [m.group(2)]])
    elif out and line.startswith('    ') and not line.strip().startswith(('python ', '--')):
      out[-1][1].append(line.strip())
  return [(name, _first_clause(' '.join(words))) for name, words in out]


def _first_clause(text: str) -> str:
  """Text up to its first '.', ':' or ';' outside parentheses that ends a word."""
  depth = 0
  for i, ch in enumerate(text):
    depth += (ch == '(') - (ch == ')')
    if depth == 0 and ch in '.:;' and (i + 1 == len(text) or text[i + 1] == ' '):
      return text[:i]
  return text


def help_text() -> str:
  """--help: usage, the job table, every config and its presets, the two flags."""
  lines = ['didi_jax command line.', '', '  ' + USAGE, '', 'Jobs (--config.job=NAME; each '
           "config sets its own):"]
  for name in jobs.JOBS:
    lines += textwrap.wrap(JOB_HELP.get(name, ''), 100, initial_indent=f'  {name:<10}',
                           subsequent_indent=' ' * 12)
  lines += ['', 'Configs and presets (--config=configs/NAME.py[:PRESET]; paths relative to the '
            'repository):']
  paths = sorted(p for p in os.listdir(CONFIGS_DIR) if p.endswith('.py') and
                 not p.startswith('_')) if os.path.isdir(CONFIGS_DIR) else []
  for p in paths:
    for preset, text in config_presets(os.path.join(CONFIGS_DIR, p)):
      name = f'configs/{p}' + (f':{preset}' if preset else '')
      lines += textwrap.wrap(text, 100, initial_indent=f'  {name:<27}', break_on_hyphens=False,
                             subsequent_indent=' ' * 29)
  if not paths:
    lines.append(f'  (no configs/ directory at {CONFIGS_DIR})')
  lines += ['', 'Flags:', '  --config   ' + _CONFIG_HELP, '  --workdir  ' + _WORKDIR_HELP, '',
            'Every knob is a config field with a comment in didi_jax/config.py. Bad input ends',
            'with one line naming the fix (exit 2).']
  return '\n'.join(lines)


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
    _exit_after_error()
  except (errors.UserError, FileNotFoundError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    _exit_after_error()
  if summary is not None:
    if jax.process_index() == 0:
      print('summary: ' + json.dumps(summary, default=str), flush=True)


def _exit_after_error() -> None:
  """Exit 2 after the one-line error. A background writer the error interrupted (orbax's
  asynchronous save on a full disk) can leave a coroutine that was never awaited, and Python
  would warn about it at exit, two more lines under the error: those warnings are silenced."""
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                          category=RuntimeWarning)
  sys.exit(2)


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
    print(f'config error: {_unknown_key(e, bad or argv[1:])}', file=sys.stderr)
    sys.exit(2)
  except ValueError as e:
    print(f'config error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


def _unknown_key(e: Exception, args) -> str:
  """ml_collections' KeyError text ("'batch_sise'\nDid you mean ...?") as one readable line."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  while len(text) > 1 and text[0] == text[-1] and text[0] in '"\'' and '\\n' in text:
    try:                                 # a KeyError's repr wrapped in another KeyError
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  key = lines[0].strip('"\'') if lines else '?'
  hint = ' '.join(lines[1:])
  hint = f' {hint[0].lower()}{hint[1:]}' if hint else ''
  return (f'unknown config key {key!r} in {" ".join(args)}:{hint} (check the spelling against '
          'didi_jax/config.py base_config or configs/*.py)')


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
  if any(a in ('-h', '--help', '--helpshort', '-?') for a in sys.argv[1:]):
    print(help_text())
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
