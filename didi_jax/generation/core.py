"""Generation for users: prompts, infilling, long outputs, guidance by any reward.

`load(model)` turns anything the project loads into a `Generator`; `Generator.generate(prompts,
...)` fills the masked positions of each prompt's layout (`prompts.py`) with one of the samplers of
`didi_jax.sampling` started from a fixed initial state (`x_init`: the prompt's tokens revealed,
everything else [MASK]; every sampler copies revealed tokens, docs/method.md §2, §8).

Shapes and compilation. The network runs on windows of a bucket length Lb (default: the powers of
two from 64 below the model's length L, and L itself) and batches of a fixed size B (a multiple
of the devices of the batch axes). Which positions are fixed is data (`x_init`), so one program is
compiled per (B, Lb, sampler settings) and reused for every prompt length and content. With
`frame=True` (default whenever the tokenizer has BOS/EOS) a window is laid out as every training
block is (docs/method.md §2): BOS at 0, the content, EOS at Lb−1; the output is the first `length`
content positions, and any content positions after them (a bucket's padding) are sampled and
discarded, so the output follows the model's law of the first `length` tokens of a block.

Long outputs (semi-autoregressive). When `length` exceeds one window's content W (L − 2 with the
frame), window k covers the content positions [k·stride, k·stride + W): everything before
k·stride + (W − stride) is already generated (or fixed by the prompt) and conditions the window as
its prefix; the window fills the next `stride` positions. Earlier windows are never changed. The
cost is counted per window (NFEs and network evaluations, `didi_jax.sampling.cost`).

Randomness. The rows of a call that share a bucket Lb are cut into chunks of B (rows with fewer
windows sit out the later ones); chunk c uses key fold_in(fold_in(PRNGKey(seed), Lb), c) and its
window k fold_in(that, k). JAX's partitionable PRNG draws each row from its own index, so a row's
output depends on (seed, its index among the call's rows of its bucket, its prompt, the
settings), not on the other rows, the batch padding or the number of devices; and a long output
continues the shorter one of the same prompt and seed. The same seed hands row 0 of every call
the same numbers (common random numbers).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from didi_jax import config as config_lib
from didi_jax import errors
from didi_jax import models
from didi_jax import parallel
from didi_jax.checkpoint import loader
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.generation import prompts as prompts_lib
from didi_jax.generation import rewards as rewards_lib
from didi_jax.sampling import categorical
from didi_jax.sampling import cost as cost_lib
from didi_jax.sampling import sample_from_config

SAMPLERS = ('ancestral', 'cached', 'rgas', 'sparse')
NETWORKS = ('auto', 'teacher', 'student', 'student_ema')
MIN_BUCKET = 64
MAX_DEFAULT_BATCH = 32
MAX_PROGRAMS = 64                # compiled programs kept per generator
MAX_LENGTH = 4096                # default cap on output tokens per sample (max_length= lifts it)
DEMO_TEACHER = config_lib.SHIPPED_MODELS['demo']
_TOKENIZER_BY_VOCAB = {258: 'byte', 50258: 'gpt2'}


class GenerationError(errors.UserError, ValueError):
  """Bad generation input (source, sampler, sizes); the message is one line naming the fix."""


@dataclasses.dataclass
class Sample:
  """One generated sequence."""
  prompt: Any                    # the prompt as given
  prompt_index: int
  sample_index: int              # 0..num_samples-1 for this prompt
  ids: np.ndarray                # (length,) int32: the output tokens
  fixed: np.ndarray              # (length,) bool: positions the prompt fixed
  text: Optional[str]            # tokenizer.decode(ids) (None without a tokenizer)
  cost: dict                     # per sample: windows, NFEs, network evaluations, FLOPs


@dataclasses.dataclass
class GenerationResult:
  samples: list
  cost: dict                     # mean over samples (see Sample.cost)
  settings: dict
  seconds: float                 # wall time, compilation included
  compilations: int              # programs traced during this call

  @property
  def texts(self) -> list:
    return [s.text for s in self.samples]

  @property
  def ids(self) -> list:
    return [s.ids for s in self.samples]

  @property
  def text(self) -> Optional[str]:
    """The text of the only sample (raises when there are several: use .texts)."""
    if len(self.samples) != 1:
      raise ValueError(f'{len(self.samples)} samples: use .texts')
    return self.samples[0].text


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def default_buckets(window: int) -> tuple:
  """Powers of two from MIN_BUCKET below the model's length, and the length itself."""
  out, b = [], MIN_BUCKET
  while b < window:
    out.append(b)
    b *= 2
  return tuple(out) + (window,)


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise GenerationError(message)


class Generator:
  """A loaded denoiser (+ tokenizer, optional discriminator) and its compiled programs.

  Build it with `load(...)`. `compilations` counts the programs traced so far (one per
  (batch, bucket, settings)); `programs` holds them.
  """

  def __init__(self, denoise: Optional[Callable] = None, *, graphdef=None, params=None,
               model_cfg=None, vocab_size: int, window: Optional[int], tokenizer=None,
               discriminator=None, disc_loader: Optional[Callable] = None, source: str = '',
               network: str = '', jit_kwargs: Optional[dict] = None, devices=None):
    if (denoise is None) == (graphdef is None):
      raise ValueError('pass either a denoise callable or graphdef + params')
    self._fn, self._graphdef, self._params = denoise, graphdef, params
    self.model_cfg = model_cfg
    self.vocab_size = int(vocab_size)
    self.mask_id = self.vocab_size - 1
    self.window = None if window is None else int(window)
    self.tokenizer = tokenizer
    self._disc, self._disc_loader = discriminator, disc_loader
    self.source, self.network = source, network
    self._jit_kwargs = dict(jit_kwargs or {})
    self.devices = None if devices is None else list(devices)
    self.programs: dict = {}
    self._rewards: dict = {}
    self.compilations = 0
    self._placed: dict = {}
    self._step_sink: Optional[Callable] = None

  # ------------------------------------------------------------------------------- networks

  @property
  def is_dit(self) -> bool:
    return self._graphdef is not None

  def discriminator(self):
    """The trained discriminator that comes with the source (loaded on first use)."""
    if self._disc is None and self._disc_loader is not None:
      try:
        self._disc = self._disc_loader()
      except (errors.UserError, ValueError, KeyError, FileNotFoundError) as e:
        why = _one_line(e)          # names the source itself when the loader said which
        if not self.source or self.source not in why:
          why = f'{self.source or "this model"} has no trained discriminator ({why})'
        raise GenerationError(
            f"{why}: sampler='rgas' needs a distillation run or a DiDi checkpoint, or a reward "
            "(reward=..., --reward_words, --classifier); or use sampler='cached'") from None
      self._disc_loader = None
    if self._disc is None:
      raise GenerationError("sampler='rgas' without reward= needs the trained discriminator, "
                            'which this model does not come with: load a distillation run or a '
                            'DiDi checkpoint, or pass reward=... (a custom reward or a classifier)')
    return self._disc

  def _mesh(self, single_device: bool):
    """The batch is sharded over these devices (all by default; one for on_step)."""
    devices = self.devices or jax.devices()
    if single_device:
      devices = devices[:1]
    return parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, devices)

  def _placed_params(self, mesh, tree, cache_as: Optional[str] = None):
    """`tree` laid out on `mesh` by the rules table; the generator's own networks (`cache_as`)
    are placed once per mesh."""
    if tree is None:
      return None
    key = (cache_as, tuple(d.id for d in mesh.devices.flat))
    if cache_as is not None and key in self._placed:
      return self._placed[key]
    placed = jax.device_put(tree, parallel.param_shardings(mesh, tree))
    if cache_as is not None:
      self._placed[key] = placed
    return placed

  # ------------------------------------------------------------------------------- settings

  def sampler_config(self, sampler: str, nfe: int, *, top_p: float = 1.0,
                     temperature: float = 1.0, precision: str = 'float32',
                     noise_removal: str = 'sample', rgas: Optional[dict] = None,
                     reward: Optional[rewards_lib.Reward] = None) -> ml_collections.ConfigDict:
    """The config `sampler` section for these settings (validated with one-line errors)."""
    _check(sampler in SAMPLERS, f'sampler={sampler!r} is not known: use one of {list(SAMPLERS)} '
           '(--sampler)')
    _check(isinstance(nfe, (int, np.integer)) and not isinstance(nfe, bool) and nfe >= 1,
           f'nfe={nfe!r} must be an integer >= 1 (the number of sampler steps, --nfe)')
    _check(0.0 < float(top_p) <= 1.0, f'top_p={top_p} must lie in (0, 1] (1 = off, --top_p)')
    _check(float(temperature) > 0.0, f'temperature={temperature} must be positive')
    _check(precision in ('float32', 'float64'),
           f"precision={precision!r}: use 'float32' or 'float64' (--precision)")
    _check(noise_removal in ('sample', 'greedy', 'none'),
           f"noise_removal={noise_removal!r}: use 'sample', 'greedy' or 'none'")
    if sampler == 'sparse':
      _check(self.is_dit, "sampler='sparse' needs a DiT (features and output layer): use 'cached'")
    if reward is not None:
      _check(sampler == 'rgas', f"reward= steers RGAS only: pass sampler='rgas' (got "
             f"{sampler!r}, --sampler=rgas)")
    try:
      categorical.check_precision(precision)
    except ValueError as e:
      raise GenerationError(_one_line(e)) from None
    s = config_lib.base_config().sampler
    s.kind = 'rgas' if sampler == 'rgas' else 'ancestral'
    s.steps = int(nfe)
    s.cache = sampler != 'ancestral'
    s.sparse_reveal = sampler == 'sparse'
    s.top_p, s.temperature = float(top_p), float(temperature)
    s.precision, s.noise_removal = precision, noise_removal
    for k, v in (rgas or {}).items():
      _check(k in s.rgas, f'rgas option {k!r} is not known: use {sorted(s.rgas.keys())}')
      s.rgas[k] = type(s.rgas[k])(v)
    if reward is not None and not reward.differentiable:
      s.rgas.rerank_ratio = 1.0          # no gradient: re-rank only
      s.rgas.rerank_reward = 'sum_all'   # the sequence score sits in one column
    if s.kind == 'rgas':
      r = s.rgas
      _check(r.num_candidates >= 1, 'rgas num_candidates must be >= 1')
      _check(0.0 <= r.rerank_ratio <= 1.0, 'rgas rerank_ratio must lie in [0, 1]')
      _check(r.tilt_clip > 0 and r.rerank_temperature > 0,
             'rgas tilt_clip and rerank_temperature must be positive')
      _check(r.rerank_reward in ('sum_all', 'sum_masked', 'mean_masked'),
             "rgas rerank_reward: use 'sum_all', 'sum_masked' or 'mean_masked'")
    return s

  # ------------------------------------------------------------------------------- programs

  def program(self, scfg, reward: Optional[rewards_lib.Reward], batch: int, bucket: int,
              with_steps: bool = False):
    """The jitted sampler fn(params, dparams, key, x_init, region) -> (ids, stats)."""
    rkey = None if reward is None else reward.key()
    key = (json.dumps(scfg.to_dict(), sort_keys=True), rkey, int(batch), int(bucket),
           bool(with_steps))
    if key in self.programs:
      return self.programs[key]
    if len(self.programs) >= MAX_PROGRAMS:           # oldest first
      self.programs.pop(next(iter(self.programs)))
      self._rewards.pop(next(iter(self._rewards)), None)
    graphdef, fn_net, mask_id, vocab = self._graphdef, self._fn, self.mask_id, self.vocab_size
    disc_graphdef = None
    if scfg.kind == 'rgas' and reward is None:
      disc_graphdef = self.discriminator().graphdef

    def emit(x):
      if self._step_sink is not None:
        self._step_sink(np.asarray(x))

    def program(params, dparams, rng, x_init, region):
      self.compilations += 1             # runs once per trace, i.e. per compiled program
      features = project = None
      if graphdef is not None:
        model = nnx.merge(graphdef, params)
        net = lambda x, s: model(x, s)  # noqa: E731
        features = lambda x, s: model.features(x, s)  # noqa: E731
        project = model.projection
      else:
        net = fn_net
      if with_steps:
        net, features = _with_callback(net, emit), _with_callback(features, emit)
      disc_fn = None
      if scfg.kind == 'rgas':
        if reward is None:
          disc_fn = nnx.merge(disc_graphdef, *dparams)   # as the sample job runs it
        else:
          disc_fn = reward.disc_fn(dparams, region, vocab)
      return sample_from_config(scfg, rng, batch, bucket, mask_id, denoise_fn=net,
                                disc_fn=disc_fn, features_fn=features, project_fn=project,
                                x_init=x_init)

    self.programs[key] = jax.jit(program, **self._jit_kwargs)
    # A reward's key holds its id(): keep the object alive with its program, so that no later
    # reward can take the same id and be served this program.
    self._rewards[key] = reward
    return self.programs[key]

  # ------------------------------------------------------------------------------- generate

  def generate(self, prompts=None, *, length: Optional[int] = None, nfe: int = 16,
               sampler: str = 'cached', seed: int = 0, num_samples: int = 1,
               batch_size: Optional[int] = None, top_p: float = 1.0, temperature: float = 1.0,
               precision: str = 'float32', noise_removal: str = 'sample', reward=None,
               rgas: Optional[dict] = None, stride: Optional[int] = None,
               buckets: Optional[Sequence[int]] = None, frame: Optional[bool] = None,
               on_step: Optional[Callable] = None,
               progress: Optional[Callable] = None,
               on_window: Optional[Callable] = None,
               max_length: Optional[int] = MAX_LENGTH) -> GenerationResult:
    """Fills each prompt's masked positions; see `didi_jax.generation.generate`.

    progress(done, total, seconds) runs after each chunk of samples; on_window(window, windows,
    seconds) after each window of a long (multi-window) output. max_length caps the output
    tokens per sample (None or 0: no cap), so that a typo such as [MASK]{100000} is refused
    instead of running for hours.
    """
    t_start = time.time()
    compilations0 = self.compilations
    reward = rewards_lib.as_reward(reward)
    scfg = self.sampler_config(sampler, nfe, top_p=top_p, temperature=temperature,
                               precision=precision, noise_removal=noise_removal, rgas=rgas,
                               reward=reward)
    _check(isinstance(num_samples, (int, np.integer)) and num_samples >= 1,
           f'num_samples={num_samples!r} must be an integer >= 1')
    frame = self._frame(frame)
    buckets = self._buckets(buckets, frame)
    prompt_list = _prompt_list(prompts)
    rows = self._rows(prompt_list, length, num_samples, frame, buckets)
    self._check_max_length(rows, max_length, nfe, frame, buckets, stride)
    mesh = self._mesh(single_device=on_step is not None)
    div = parallel.batch_divisor(mesh)
    if batch_size is None:
      batch = min(_next_pow2(len(rows)), MAX_DEFAULT_BATCH)
    else:
      _check(isinstance(batch_size, (int, np.integer)) and batch_size >= 1,
             f'batch_size={batch_size!r} must be an integer >= 1')
      batch = int(batch_size)
    batch = -(-batch // div) * div

    groups: dict = {}                 # bucket -> rows; a row's windows: plan[i]
    plan = [self._plan(r['length'], frame, buckets, stride) for r in rows]
    for i, (bucket, _, _) in enumerate(plan):
      groups.setdefault(bucket, []).append(i)
    params = self._placed_params(mesh, self._params, cache_as='net')
    dparams = None
    if scfg.kind == 'rgas' and reward is None:
      disc = self.discriminator()
      dparams = (self._placed_params(mesh, disc.params, cache_as='disc'),
                 self._placed_params(mesh, disc.spectral, cache_as='disc_spectral'))
    elif scfg.kind == 'rgas':
      weight, *trees = reward.params()
      dparams = (weight,) + tuple(self._placed_params(mesh, t) for t in trees)
    base = jax.random.PRNGKey(int(seed))
    done = 0
    costs = [None] * len(rows)
    outs = [None] * len(rows)
    for bucket, members in sorted(groups.items()):
      fn = self.program(scfg, reward, batch, bucket, with_steps=on_step is not None)
      for c in range(-(-len(members) // batch)):
        chunk = members[c * batch:(c + 1) * batch]
        seqs = [rows[i]['ids'].copy() for i in chunk]
        lengths = [rows[i]['length'] for i in chunk]
        windows = [plan[i][1] for i in chunk]
        step = max(plan[i][2] for i in chunk)      # the one stride of this call (0: one window)
        totals = [dict() for _ in chunk]
        ran = [0] * len(chunk)
        key_c = jax.random.fold_in(jax.random.fold_in(base, bucket), c)
        for k in range(max(windows)):
          start = k * step
          # Rows with fewer windows are done; a window the prompt fixes entirely is skipped.
          active = [k < w and self._fills(seqs[j], lengths[j], start, bucket - 2 * frame)
                    for j, w in enumerate(windows)]
          if not any(active):
            continue
          x_np, region_np = self._window(seqs, lengths, start, bucket, batch, frame, active)
          x_init = parallel.global_batch(mesh, x_np)
          region = parallel.global_batch(mesh, region_np)
          if on_step is not None:
            self._step_sink = _StepSink(on_step, k, start, region_np, frame)
          try:
            ids, stats = fn(params, dparams, jax.random.fold_in(key_c, k), x_init, region)
            ids = _host(ids)
            stats = jax.tree.map(_host, stats)
            if on_step is not None:
              jax.effects_barrier()
              self._step_sink(ids, final=True)
          finally:
            self._step_sink = None
          self._write_back(seqs, lengths, ids, x_np, start, frame, scfg, active)
          window_cost = self._window_cost(scfg, reward, stats, bucket, batch)
          for j in range(len(chunk)):
            if active[j]:
              _accumulate(totals[j], window_cost)
              ran[j] += 1
          if on_window is not None and max(windows) > 1:
            on_window(k + 1, max(windows), time.time() - t_start)
        for j, i in enumerate(chunk):
          outs[i] = seqs[j]
          costs[i] = dict(totals[j], windows=ran[j], bucket=bucket,
                          stride=(step if windows[j] > 1 else None))
        done += len(chunk)
        if progress is not None:
          progress(done, len(rows), time.time() - t_start)

    samples = []
    for i, r in enumerate(rows):
      ids = outs[i].astype(np.int32)
      text = None
      if self.tokenizer is not None:
        text = self.tokenizer.decode(ids.tolist())
      samples.append(Sample(prompt=r['prompt'], prompt_index=r['prompt_index'],
                            sample_index=r['sample_index'], ids=ids, fixed=r['ids'] != -1,
                            text=text, cost=costs[i]))
    settings = {'sampler': sampler, 'nfe': int(nfe), 'seed': int(seed), 'top_p': float(top_p),
                'temperature': float(temperature), 'precision': precision,
                'noise_removal': noise_removal, 'frame': frame, 'batch_size': batch,
                'source': self.source, 'network': self.network,
                'reward': None if reward is None else type(reward).__name__}
    if scfg.kind == 'rgas':
      settings['rgas'] = scfg.rgas.to_dict()
    return GenerationResult(samples=samples, cost=_mean_cost(costs), settings=settings,
                            seconds=time.time() - t_start,
                            compilations=self.compilations - compilations0)

  # ------------------------------------------------------------------------------- pieces

  def _frame(self, frame: Optional[bool]) -> bool:
    tok = self.tokenizer
    has = tok is not None and getattr(tok, 'bos_id', None) is not None and \
        getattr(tok, 'eos_id', None) is not None
    if frame is None:
      return bool(has and self.window is not None)
    _check(not frame or has, 'frame=True needs a tokenizer with bos_id and eos_id')
    return bool(frame)

  def _buckets(self, buckets, frame: bool) -> Optional[tuple]:
    if self.window is None:
      if buckets is None:
        return None                 # any length: the window is the output itself
      out = tuple(sorted({int(b) for b in buckets}))
    elif buckets is None:
      out = default_buckets(self.window)
    else:
      out = tuple(sorted({int(b) for b in buckets}))
      _check(all(b <= self.window for b in out),
             f'buckets {out} exceed the model length {self.window}')
    _check(all(b > 2 * frame for b in out), f'buckets {out} leave no room inside the BOS/EOS frame')
    return out

  def _rows(self, prompt_list, length, num_samples, frame, buckets) -> list:
    _check(length is None or (isinstance(length, (int, np.integer)) and length >= 1),
           f'length={length!r} must be an integer >= 1 (output tokens, --length)')
    cap = None
    if self.window is not None:
      cap = self.window - 2 * frame
    rows = []
    for p_i, p in enumerate(prompt_list):
      lay = prompts_lib.layout(p, self.tokenizer, self.mask_id, p_i)
      n = int(length) if length is not None else lay.default_length(cap)
      ids = lay.resolve(n, p_i)
      if ids.size and not np.any(ids == prompts_lib.MASKED):
        if lay.is_prefix and length is None:
          raise prompts_lib.PromptError(
              f'prompt {p_i} is {n} tokens long, which fills the model\'s window of {cap} '
              f'tokens: pass --length (length=) above {n} to continue it, or shorten the prompt')
        raise prompts_lib.PromptError(
            f'prompt {p_i} leaves nothing to generate: its {n} tokens are all given (length='
            f'{n}): raise --length (length=) above {len(lay.tokens)} or add [MASK]{{n}}')
      for s in range(num_samples):
        rows.append({'prompt': p, 'prompt_index': p_i, 'sample_index': s, 'ids': ids,
                     'length': n})
    return rows

  def _fills(self, seq, n: int, start: int, cap: int) -> bool:
    """Whether window [start, start + cap) of an output of n tokens has a position to fill."""
    return bool(np.any(seq[start:min(start + cap, n)] == prompts_lib.MASKED))

  def _check_max_length(self, rows, max_length, nfe, frame, buckets, stride) -> None:
    """Refuses outputs longer than max_length tokens (one line: the size, the cost, the flag)."""
    if not max_length or not rows:
      return
    longest = max(rows, key=lambda r: r['length'])
    n = longest['length']
    if n <= max_length:
      return
    windows = self._plan(n, frame, buckets, stride)[1]
    raise GenerationError(
        f'prompt {longest["prompt_index"]} asks for {n} tokens, above max_length={max_length} '
        f'({windows} window(s) x {nfe} NFE per sample): if that is meant, pass --max_length={n} '
        '(max_length= in Python; 0 = no cap), else lower --length or the [MASK]{n} counts')

  def _plan(self, n: int, frame: bool, buckets, stride) -> tuple:
    """(bucket, windows, stride) of an output of n tokens."""
    if buckets is None:                       # a callable without a fixed length
      return (n + 2 * frame, 1, 0)
    fits = [b for b in buckets if b - 2 * frame >= n]
    if fits:
      return (fits[0], 1, 0)
    bucket = buckets[-1]
    w = bucket - 2 * frame
    step = w // 2 if stride is None else int(stride)
    _check(1 <= step <= w, f'stride={stride} must lie in [1, {w}] (the new tokens per window of '
           f'{w} content positions; --stride)')
    return (bucket, 1 + -(-(n - w) // step), step)

  def _window(self, seqs, lengths, start, bucket, batch, frame, active):
    """x_init and the output region of window [start, start + content) for every row; rows
    that are done (not active) and padding rows are all [MASK] (inside the frame), no region."""
    x = np.full((batch, bucket), self.mask_id, np.int32)
    region = np.zeros((batch, bucket), np.bool_)
    if frame:
      x[:, 0], x[:, -1] = self.tokenizer.bos_id, self.tokenizer.eos_id
    cap = bucket - 2 * frame
    for r, (seq, n) in enumerate(zip(seqs, lengths)):
      if not active[r]:
        continue
      hi = min(start + cap, n)
      if hi > start:
        part = seq[start:hi]
        x[r, frame:frame + hi - start] = np.where(part == -1, self.mask_id, part)
        region[r, frame:frame + hi - start] = True
    return x, region

  def _write_back(self, seqs, lengths, ids, x_np, start, frame, scfg, active) -> None:
    """Takes the sampler's output as it is, and checks that it kept every revealed token of
    x_init (prompt, frame, earlier windows) and left no [MASK] (a bug otherwise)."""
    revealed = x_np != self.mask_id
    changed = revealed & (ids[:x_np.shape[0]] != x_np)
    if np.any(changed[:len(seqs)]):
      raise RuntimeError(f'the sampler changed {int(np.sum(changed[:len(seqs)]))} fixed tokens: '
                         'this is a bug, please report it')
    cap = x_np.shape[1] - 2 * frame
    for r, (seq, n) in enumerate(zip(seqs, lengths)):
      hi = min(start + cap, n)
      if active[r] and hi > start:
        seq[start:hi] = ids[r, frame:frame + hi - start]
        if scfg.noise_removal != 'none' and np.any(seq[start:hi] == self.mask_id):
          raise RuntimeError('[MASK] tokens survived noise removal: this is a bug, please '
                             'report it')

  def _window_cost(self, scfg, reward, stats, bucket: int, batch: int) -> dict:
    """Per-sample cost of one window (the sampler's counts are per batch = per sample)."""
    steps = int(scfg.steps)
    out = {'nfe': steps, 'student_forwards': int(stats['student_forwards']),
           'cache_hits': int(stats['cache_hits'])}
    network_reward = scfg.kind == 'rgas' and (reward is None or reward.network)
    d_fwd = int(stats.get('disc_forwards', 0))
    d_bwd = int(stats.get('disc_backwards', 0))
    if network_reward:
      out.update(disc_forwards=d_fwd, disc_backwards=d_bwd)
    elif scfg.kind == 'rgas':
      out.update(reward_evaluations=d_fwd, reward_gradients=d_bwd)
    out['network_evaluations'] = out['student_forwards'] + (d_fwd if network_reward else 0)
    if self.model_cfg is not None and self.model_cfg.get('hidden_size'):
      frac = 1.0
      if 'projected_rows' in stats:
        frac = float(stats['projected_rows']) / float(
            (steps + (scfg.noise_removal != 'none')) * batch * bucket)
      disc_cfg = None
      if network_reward:
        disc_cfg = (self.discriminator().model_cfg if reward is None
                    else getattr(reward, 'model_cfg', None))
      c = cost_lib.sampler_cost(
          self.model_cfg, 'rgas' if network_reward else 'ancestral', steps, length=bucket,
          num_candidates=int(scfg.rgas.num_candidates),
          rerank_ratio=float(scfg.rgas.rerank_ratio), cache_hits=out['cache_hits'],
          noise_removal=scfg.noise_removal != 'none', disc_cfg=disc_cfg,
          projected_fraction=frac)
      out['flops'] = float(c.flops)
    return out


class _StepSink:
  """Host side of --show-steps: the content of every row as the sampler sees it."""

  def __init__(self, on_step, window: int, start: int, region, frame: bool):
    self.on_step, self.window, self.start = on_step, window, start
    self.region, self.frame, self.step = region, frame, 0

  def __call__(self, x_BxL, final: bool = False):
    rows = [x_BxL[r][self.region[r]] for r in range(self.region.shape[0])
            if self.region[r].any()]
    self.on_step({'window': self.window, 'start': self.start, 'step': self.step,
                  'final': final, 'ids': rows})
    self.step += 1


def _with_callback(fn, emit):
  if fn is None:
    return None

  def wrapped(x, s):
    jax.debug.callback(emit, x, ordered=True)
    return fn(x, s)
  return wrapped


def _host(x) -> np.ndarray:
  if getattr(x, 'is_fully_addressable', True) or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _accumulate(totals: dict, window_cost: dict) -> None:
  """Sums a window's cost into the sample's; `nfe` stays the per-window step count and
  `nfe_total` sums it over windows."""
  for k, v in window_cost.items():
    if k == 'nfe':
      totals['nfe'] = v
      k = 'nfe_total'
    totals[k] = totals.get(k, 0) + v


def _mean_cost(costs: list) -> dict:
  """Mean over samples of each numeric cost entry (kept as is when all samples agree)."""
  out = {}
  for k in costs[0] if costs else ():
    vals = [c.get(k) for c in costs]
    if len(set(vals)) == 1:
      out[k] = vals[0]
    elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
      out[k] = float(np.mean(vals))
    else:
      out[k] = vals
  return out


def _prompt_list(prompts) -> list:
  if prompts is None:
    return ['']
  if isinstance(prompts, (bytes, bytearray)):
    raise prompts_lib.PromptError("prompts is bytes, not text: decode it first (e.g. "
                                  "prompts.decode('utf-8')), or pass token ids as a 1-D int array")
  if isinstance(prompts, (str, prompts_lib.Template)):
    return [prompts]
  if isinstance(prompts, np.ndarray):
    return [prompts] if prompts.ndim == 1 else list(prompts)
  prompts = list(prompts)
  _check(len(prompts) > 0, 'prompts is empty: pass at least one prompt (or None)')
  return prompts


def _one_line(e: Exception) -> str:
  return ' '.join(str(e).split())


# ------------------------------------------------------------------------------------ loading


def tokenizer_for(name_or_obj, vocab_size: int):
  """A tokenizer object: given (name or object), else inferred from the model's vocabulary."""
  if name_or_obj is None:
    name_or_obj = _TOKENIZER_BY_VOCAB.get(int(vocab_size))
    if name_or_obj is None:
      return None
  tok = get_tokenizer(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
  if int(tok.vocab_size) + 1 != int(vocab_size):
    raise GenerationError(f'tokenizer {getattr(tok, "name", tok)!r} has {tok.vocab_size} ids but '
                          f'the model has vocabulary {vocab_size} (ids + [MASK]): pass the '
                          'tokenizer the model was trained with')
  return tok


def _with_compute_dtype(net, compute_dtype: str, discriminator: bool = False):
  """The network with its graph rebuilt for `compute_dtype` ('auto': float32 on CPU, where
  bf16 matmuls are slow; the checkpoint's own elsewhere). Parameters are unchanged."""
  if compute_dtype == 'auto':
    if jax.default_backend() != 'cpu':
      return net
    compute_dtype = 'float32'
  _check(compute_dtype in ('float32', 'bfloat16'),
         f"compute_dtype={compute_dtype!r}: use 'auto', 'float32' or 'bfloat16'")
  if net.model_cfg.compute_dtype == compute_dtype:
    return net
  cfg = copy.deepcopy(net.model_cfg)
  cfg.compute_dtype = compute_dtype
  graphdef = models.split_abstract(
      cfg, 'discriminator' if discriminator else 'denoiser')[0]
  return dataclasses.replace(net, model_cfg=cfg, graphdef=graphdef)


def disc_with_compute_dtype(disc, compute_dtype: str):
  """`_with_compute_dtype` for a discriminator (loader.Network of role discriminator)."""
  return _with_compute_dtype(disc, compute_dtype, discriminator=True)


def load(model, *, network: str = 'auto', tokenizer=None, compute_dtype: str = 'auto',
         discriminator=None, vocab_size: Optional[int] = None, length: Optional[int] = None,
         weights: str = 'ema', jit_kwargs: Optional[dict] = None, devices=None) -> Generator:
  """A Generator for `model`: anything the project loads, or an already-loaded object.

  model: a didi_jax run directory (pretrain: the teacher's EMA; distill: the student EMA and its
  discriminator), a checkpoint file or directory `didi_jax.load_denoiser` reads (official
  Lightning `.ckpt`, HF safetensors, our exports), `hf:ORG/NAME`, 'demo' or
  `didi_jax/assets/demo_teacher/` (the shipped demo teacher); or a loaded object: a Generator,
  `loader.Network`, `didi_jax.load_denoiser(...)`, a `DiT` module, or a plain callable
  `(ids_BxL, sigma_B) -> logits_BxLxV` (then pass vocab_size=, and length= for its window).
  network: 'auto' | 'teacher' | 'student' | 'student_ema' (which network of a source).
  tokenizer: a name ('gpt2', 'byte') or an object; default from the run's config or the
  vocabulary (258 -> byte, 50258 -> gpt2). discriminator: a source or loaded discriminator for
  RGAS (default: the source's own). devices: the devices the batch is sharded over (default
  all; a multiple of their number is the batch granularity). jit_kwargs: passed to `jax.jit`.
  """
  if isinstance(model, Generator):
    return model
  _check(network in NETWORKS, f'network={network!r}: use one of {list(NETWORKS)} (--network)')
  disc_loader = None
  if isinstance(model, (str, os.PathLike)):
    source = loader.resolve(model)
    if loader.checkpoint_dir(source) is not None:
      cfg, mngr = loader.read_workdir_config(source)
      job = mngr.read_meta().get('job')
      mngr.close()
      role = network if network != 'auto' else ('teacher' if job == 'pretrain' else 'student_ema')
      net = loader.load(source, role, weights=weights)
      if tokenizer is None and 'data' in cfg:
        tokenizer = cfg.data.tokenizer
      label = role
    else:
      role = 'teacher' if network == 'auto' else network   # importer: 'auto' for the teacher
      net = loader.load(source, role, weights=weights)
      label = role if network != 'auto' else 'auto'
    if discriminator is None:
      disc_loader = lambda: disc_with_compute_dtype(  # noqa: E731
          loader.load(source, 'discriminator'), compute_dtype)
    net = _with_compute_dtype(net, compute_dtype)
    return _from_network(net, tokenizer, discriminator, disc_loader, source, label, jit_kwargs,
                         devices)
  if isinstance(model, loader.Network):
    _check(model.role != 'discriminator', 'model is a discriminator: pass the denoiser, and '
           'the discriminator as discriminator=')
    return _from_network(model, tokenizer, discriminator, None, model.source, model.role,
                         jit_kwargs, devices)
  if hasattr(model, 'graphdef') and hasattr(model, 'state') and hasattr(model, 'model_cfg'):
    net = loader.Network('auto', model.model_cfg, model.graphdef, model.state)
    return _from_network(net, tokenizer, discriminator, None, '', 'auto', jit_kwargs, devices)
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    vocab = int(model.vocab_embed.embedding[...].shape[0])
    window = length if length is not None else getattr(model, 'cfg_length', None)
    return Generator(graphdef=graphdef, params=state, vocab_size=vocab, window=window,
                     tokenizer=tokenizer_for(tokenizer, vocab),
                     discriminator=_as_disc(discriminator), jit_kwargs=jit_kwargs,
                     devices=devices)
  if callable(model):
    _check(vocab_size is not None, 'a plain callable model needs vocab_size= (tokens + [MASK])')
    return Generator(model, vocab_size=vocab_size, window=length,
                     tokenizer=tokenizer_for(tokenizer, vocab_size),
                     discriminator=_as_disc(discriminator), jit_kwargs=jit_kwargs,
                     devices=devices)
  raise GenerationError(f'model={model!r} is not something didi_jax loads: pass a run '
                        'directory, a checkpoint, hf:ORG/NAME, \'demo\', or a loaded network')


def _as_disc(discriminator):
  """A discriminator as the samplers' runner uses it (graphdef, params, spectral)."""
  if discriminator is None:
    return None
  if isinstance(discriminator, (str, os.PathLike)):
    return loader.load(discriminator, 'discriminator')
  if not isinstance(discriminator, loader.Network):
    reward = rewards_lib.ClassifierReward(discriminator)
    trees = reward.trees()
    discriminator = loader.Network('discriminator', reward.model_cfg, reward.graphdef,
                                     trees[0], trees[1] if len(trees) > 1 else None)
  if discriminator.spectral is None:
    # A loaded module's (or DiscriminatorFn's) state holds its spectral u, v with the params.
    discriminator = dataclasses.replace(discriminator, spectral=nnx.State({}))
  return discriminator


def _from_network(net, tokenizer, discriminator, disc_loader, source, label, jit_kwargs,
                  devices=None):
  vocab = int(net.model_cfg.vocab_size)
  disc = _as_disc(discriminator)
  return Generator(graphdef=net.graphdef, params=net.params, model_cfg=net.model_cfg,
                   vocab_size=vocab, window=int(net.model_cfg.length),
                   tokenizer=tokenizer_for(tokenizer, vocab), discriminator=disc,
                   disc_loader=disc_loader if disc is None else None, source=source,
                   network=label, jit_kwargs=jit_kwargs, devices=devices)


_LOADED: dict = {}
_LOADED_MAX = 4


def cached_load(model, **kwargs) -> Generator:
  """`load`, remembering the last few string sources (so their compiled programs are reused)."""
  if not isinstance(model, (str, os.PathLike)):
    return load(model, **kwargs)
  key = (os.fspath(model), json.dumps({k: v if isinstance(v, (str, int, float, type(None)))
                                       else id(v) for k, v in sorted(kwargs.items())}))
  if key not in _LOADED:
    if len(_LOADED) >= _LOADED_MAX:
      _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = load(model, **kwargs)
  return _LOADED[key]


def generate(model, prompts=None, *, length: Optional[int] = None, nfe: int = 16,
             sampler: str = 'cached', seed: int = 0, network: str = 'auto', tokenizer=None,
             compute_dtype: str = 'auto', discriminator=None, **kwargs) -> GenerationResult:
  """Generates text (and ids) from `model` for `prompts`; see the package docstring."""
  gen = cached_load(model, network=network, tokenizer=tokenizer, compute_dtype=compute_dtype,
                    discriminator=discriminator)
  return gen.generate(prompts, length=length, nfe=nfe, sampler=sampler, seed=seed, **kwargs)
