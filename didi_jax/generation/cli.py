r"""Command line of `python -m didi_jax.generate` (see `main`'s --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from didi_jax import errors
from didi_jax.generation.core import SAMPLERS
from didi_jax import generation
from didi_jax.generation import core, prompts as prompts_lib
import jax
from didi_jax.checkpoint import loader
import numpy as np

DESCRIPTION = r"""Generate text with a masked diffusion model: prefixes, suffixes, infilling, long outputs.

  python -m didi_jax.generate --checkpoint=demo --prompt="ROMEO:" --length=120 --nfe=16
  python -m didi_jax.generate --checkpoint=runs/demo --sampler=rgas --prompt="To be, or [MASK]{40} the question"
  python -m didi_jax.generate --checkpoint=demo --prompts_file=prompts.txt --out=samples.jsonl

Prompts: plain text is a prefix (the rest up to --length is filled). [MASK]{n} marks n tokens
to fill (bytes for a byte-level model, BPE tokens for GPT-2); [MASK]{*} fills as many as make the
output --length long, so "[MASK]{*}the end." is a suffix. Only the exact [MASK]{digits} and
[MASK]{*} are placeholders, and not inside a word (letters/digits on both sides); \[MASK]{3} is
the literal text. Anything else, <|endoftext|> included, is plain text.
--length beyond the model's window generates semi-autoregressively, --stride new tokens per
window, each conditioned on the tail of the text before it."""

EPILOG = """Exit status 2 with one line on bad input. Output: the texts on stdout (one block per
sample), the cost on stderr; --out also writes JSONL records {prompt, text, ids, nfe, sampler,
seed, cost, ...}."""


WINDOW_PROGRESS_EVERY_S = 10.0     # a long output's progress line on stderr at most this often


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (exit 2), with the fix."""

  def error(self, message):
    print(f'error: {message} (see python -m didi_jax.generate --help)', file=sys.stderr)
    sys.exit(2)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m didi_jax.generate', description=DESCRIPTION, epilog=EPILOG,
              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  a = p.add_argument
  a('--checkpoint', required=True, help="a didi_jax run directory (pretrain or distill), a "
    "checkpoint file or directory, hf:ORG/NAME, or 'demo' (the shipped demo teacher)")
  a('--prompt', action='append', default=[], help='a prompt (repeat for several); none: '
    'unconditional')
  a('--prompts_file', default='', help='prompts, one per line (blank lines skipped); a .jsonl '
    'file holds one JSON string or {"prompt": ...} per line (prompts with newlines)')
  a('--length', type=int, default=None, help='output tokens per sample (default: one model '
    'window for a prefix, the template\'s own length for [MASK]{n} templates)')
  a('--nfe', type=int, default=16, help='sampler steps per window (the paper\'s NFE; default 16)')
  a('--sampler', default='cached', help=f'one of {", ".join(SAMPLERS)} (default cached: '
    'ancestral with the DDPM cache; rgas: reward-guided)')
  a('--seed', type=int, default=0, help='random seed: the same seed, prompt and settings give '
    'the same output (default 0)')
  a('--num_samples', type=int, default=1, help='samples per prompt')
  a('--batch_size', type=int, default=None, help='rows per compiled batch (default: up to 32)')
  a('--top_p', type=float, default=1.0, help='nucleus sampling: draw from the smallest set of '
    'tokens holding this much probability (default 1.0 = off)')
  a('--temperature', type=float, default=1.0, help='divides the logits before each draw: below '
    '1 sharper, above 1 more random (default 1.0)')
  a('--precision', default='float32', help='float32 (the paper\'s regime) or float64 (turns on '
    'JAX 64-bit)')
  a('--noise_removal', default='sample', help='sample | greedy | none')
  a('--stride', type=int, default=None, help='long outputs: new tokens per window (default half '
    'a window)')
  a('--max_length', type=int, default=core.MAX_LENGTH, help='refuse outputs longer than this '
    f'many tokens per sample (default {core.MAX_LENGTH}; 0 = no cap): a long output costs '
    'about length/stride windows x NFE')
  a('--network', default='auto', help='auto | teacher | student | student_ema')
  a('--tokenizer', default=None, help='gpt2 | byte (default: from the run or the vocabulary)')
  a('--compute_dtype', default='auto', help='auto (float32 on CPU) | float32 | bfloat16')
  a('--reward_words', default='', help='rgas: steer by a comma-separated word list (toward it with '
    'a positive --reward_weight, away from it with a negative one)')
  a('--reward_weight', type=float, default=1.0, help='rgas: strength of --reward_words or '
    '--classifier (negative: steer away; default 1.0)')
  a('--classifier', default='', help='rgas: steer by this classifier (a discriminator '
    'checkpoint) instead of the run\'s own discriminator')
  a('--rgas', default='', help='rgas options as k=v,k=v: h_start, h_end, num_candidates, '
    'rerank_ratio, tilt_clip, rerank_temperature, rerank_reward')
  a('--out', default='', help='write JSONL records here')
  a('--show-steps', '--show_steps', dest='show_steps', action='store_true',
    help='print the first sample as it is unmasked, step by step (runs on one device)')
  a('--quiet', action='store_true', help='do not print the texts')
  return p


def _read_prompts(args) -> list:
  out = list(args.prompt)
  for n, p in enumerate(out, 1):
    try:
      p.encode('utf-8')
    except UnicodeEncodeError as e:   # argv bytes that were not UTF-8 (surrogate escapes)
      raise errors.UserError(
          f'--prompt number {n} is not UTF-8 text (byte 0x{ord(p[e.start]) & 0xff:02x} at '
          'character {e.start}): pass UTF-8 (set the terminal to UTF-8, or convert with '
          'iconv -t utf-8 and use --prompts_file)'.replace('{e.start}', str(e.start))) from None
  if args.prompts_file:
    path = os.path.expanduser(args.prompts_file)
    if not os.path.isfile(path):
      raise errors.UserError(f'--prompts_file={args.prompts_file} does not exist: fix the path')
    try:
      with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except UnicodeDecodeError as e:
      raise errors.UserError(
          f'--prompts_file={args.prompts_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} '
          f'at offset {e.start}): convert it, e.g. iconv -f latin1 -t utf-8 '
          f'{args.prompts_file} > prompts.txt') from None
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      if path.endswith('.jsonl'):
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          raise errors.UserError(f'{path}:{n} is not JSON: write one JSON string or '
                                 '{"prompt": ...} per line') from None
        if isinstance(rec, dict) and 'prompt' not in rec:
          raise errors.UserError(f'{path}:{n} has no "prompt" field: write one JSON string or '
                                 '{"prompt": ...} per line')
        out.append(rec['prompt'] if isinstance(rec, dict) else rec)
      else:
        out.append(line)
    if len(out) == len(args.prompt):
      raise errors.UserError(f'--prompts_file={args.prompts_file} holds no prompts: write one '
                             'per line')
  return out or ['']


def _rgas_options(text: str) -> dict:
  out = {}
  for item in filter(None, (s.strip() for s in text.split(','))):
    if '=' not in item:
      raise errors.UserError(f'--rgas item {item!r} is not key=value: e.g. '
                             '--rgas=h_start=5,h_end=5')
    k, v = item.split('=', 1)
    out[k.strip()] = v.strip()
  return out


def _printable(text: str) -> str:
  return text.replace('\n', '\\n')


def run(args) -> int:
  # Cheap checks first: a bad flag should not wait for a model to load.
  if args.sampler not in core.SAMPLERS:
    raise core.GenerationError(f'--sampler={args.sampler} is not known: use one of '
                               f'{", ".join(core.SAMPLERS)}')
  if args.nfe < 1:
    raise core.GenerationError(f'--nfe={args.nfe} must be >= 1 (sampler steps per window)')
  if args.length is not None and args.length < 1:
    raise core.GenerationError(f'--length={args.length} must be >= 1 (output tokens)')
  if args.num_samples < 1:
    raise core.GenerationError(f'--num_samples={args.num_samples} must be >= 1')
  if args.precision == 'float64':
    jax.config.update('jax_enable_x64', True)
  prompt_list = _read_prompts(args)
  rgas_opts = _rgas_options(args.rgas)
  if (args.reward_words or args.classifier or rgas_opts) and args.sampler != 'rgas':
    raise core.GenerationError('--reward_words/--classifier/--rgas steer RGAS only: add '
                               '--sampler=rgas')
  gen = core.load(args.checkpoint, network=args.network, tokenizer=args.tokenizer,
                  compute_dtype=args.compute_dtype)
  reward = None
  if args.reward_words:
    if gen.tokenizer is None:
      raise core.GenerationError('--reward_words needs a tokenizer: pass --tokenizer')
    reward = generation.words(gen.tokenizer, args.reward_words.split(','), args.reward_weight)
  elif args.classifier:
    net = loader.load(args.classifier, 'discriminator')
    net = core.disc_with_compute_dtype(net, args.compute_dtype)
    reward = generation.ClassifierReward(net, weight=args.reward_weight)

  on_step = None
  if args.show_steps:
    tok, mask_id = gen.tokenizer, gen.mask_id

    def on_step(ev):
      if not ev['ids']:
        return
      ids = ev['ids'][0]
      n_masked = int((ids == mask_id).sum())
      label = 'final' if ev['final'] else f'step {ev["step"]:>3}'
      text = (prompts_lib.display(tok, ids, mask_id) if tok is not None
              else ' '.join('_' if int(i) == mask_id else str(int(i)) for i in ids))
      print(f'[window {ev["window"]} {label}, {n_masked:>4} masked] {_printable(text)}',
            flush=True)

  shown = {'any': False, 'window_at': 0.0}

  def progress(done, total, elapsed):
    if done < total or shown['any']:
      rate = done / max(elapsed, 1e-9)
      eta = (total - done) / max(rate, 1e-9)
      print(f'generated {done}/{total} samples ({rate:.2f} samples/s, ETA {eta:.0f} s)',
            file=sys.stderr, flush=True)
      shown['any'] = True

  def window_progress(k, windows, elapsed):
    if k < windows and elapsed - shown['window_at'] >= WINDOW_PROGRESS_EVERY_S:
      shown['window_at'] = elapsed
      eta = elapsed / k * (windows - k)
      print(f'window {k}/{windows} done ({elapsed:.0f} s, ETA {eta:.0f} s for these samples)',
            file=sys.stderr, flush=True)

  t0 = time.time()
  res = gen.generate(prompt_list, length=args.length, nfe=args.nfe, sampler=args.sampler,
                     seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
                     top_p=args.top_p, temperature=args.temperature, precision=args.precision,
                     noise_removal=args.noise_removal, reward=reward, rgas=rgas_opts or None,
                     stride=args.stride, on_step=on_step, progress=progress,
                     on_window=window_progress, max_length=args.max_length)
  many = len(res.samples) > 1
  if not args.quiet:
    for s in res.samples:
      if many:
        print(f'=== prompt {s.prompt_index}, sample {s.sample_index} ===')
      print(s.text if s.text is not None else ' '.join(str(int(i)) for i in s.ids), flush=True)
  if args.out:
    _write_jsonl(args.out, res)
  c = res.cost
  why = ''
  if args.noise_removal != 'none':
    why = (f' (per window {args.nfe} steps + 1 final noise-removal call, less DDPM cache hits'
           + (', plus reward calls' if args.sampler == 'rgas' else '') + '; docs/method.md §9)')
  print(f'{len(res.samples)} sample(s) in {time.time() - t0:.1f} s: {c.get("windows")} '
        f'window(s) x {args.nfe} NFE, {c.get("network_evaluations")} network evaluations per '
        f'sample{why}' + (f'; wrote {args.out}' if args.out else ''), file=sys.stderr)
  return 0


def _write_jsonl(path: str, res) -> None:
  path = os.path.expanduser(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for s in res.samples:
      prompt = s.prompt if isinstance(s.prompt, str) else repr(s.prompt)
      rec = {'prompt': prompt, 'prompt_index': s.prompt_index, 'sample': s.sample_index,
             'text': s.text, 'ids': [int(i) for i in s.ids], 'length': int(len(s.ids)),
             'nfe': res.settings['nfe'], 'sampler': res.settings['sampler'],
             'seed': res.settings['seed'], 'cost': s.cost, 'settings': res.settings}
      f.write(json.dumps(rec, default=_json_default) + '\n')
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (2 on bad input, with one line)."""
  args = parser().parse_args(argv)
  try:
    sys.stdout.reconfigure(errors='backslashreplace')
  except (AttributeError, ValueError):
    pass
  try:
    return run(args)
  except (errors.UserError, ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
