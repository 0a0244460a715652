"""Pieces shared by the training loops: optimisers, schedules, EMA, metric logging, progress."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax


GRAD_INF_VALUE = 1e5    # ±inf gradients become ±this (docs/method.md §7.3)


def nan_to_num_grads() -> optax.GradientTransformation:
  """NaN -> 0, ±inf -> ±GRAD_INF_VALUE (docs/method.md §7.3), before clipping."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda g: jnp.nan_to_num(g, nan=0.0, posinf=GRAD_INF_VALUE, neginf=-GRAD_INF_VALUE),
        updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def count_nonfinite(tree) -> jax.Array:
  return sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)).astype(jnp.float32)


def warmup_constant(peak: float, warmup: int):
  """lr(k) = peak·(k+1)/W for k < W, then peak (MDLM pre-training)."""
  def sched(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup <= 0:
      return jnp.asarray(peak, jnp.float32)
    return peak * jnp.minimum(1.0, (step + 1.0) / warmup)
  return sched


def warmup_linear_decay(peak: float, warmup: int, total: int):
  """lr(k) = P·(k+1)/W for k < W, else P·max(0, (T−k)/(T−W)) (docs/method.md §7.3)."""
  def sched(step):
    step = jnp.asarray(step, jnp.float32)
    up = peak * (step + 1.0) / max(warmup, 1)
    down = peak * jnp.maximum(0.0, (total - step) / max(total - warmup, 1))
    return jnp.where(step < warmup, up, down)
  return sched


def adamw(schedule, *, b1, b2, eps, weight_decay, clip_norm) -> optax.GradientTransformation:
  return optax.chain(
      nan_to_num_grads(),
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
  )


def ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def mdlm_ema_decay(step, decay):
  """decay_n = min(decay, (1+n)/(10+n)) (MDLM's EMA warm-up)."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class MetricWriter:
  """JSONL metrics in the workdir (process 0 only); TensorBoard when asked and installed."""

  def __init__(self, workdir: str, tensorboard: bool = False, resume_step: Optional[int] = None):
    """`resume_step`: the step the run resumes from; rows logged after it by a run that was
    killed before its next checkpoint are dropped, since they are about to be logged again."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled and resume_step is not None and os.path.exists(self.path):
      self._drop_after(resume_step)
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        logging.warning('logging.tensorboard=True but tensorboardX is not installed: '
                        'pip install tensorboardX (continuing with JSONL only)')

  def _drop_after(self, step: int):
    with open(self.path, encoding='utf-8') as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line).get('step', 0)) > step:
          continue
      except (ValueError, AttributeError):
        continue                              # a line cut short by the kill
      keep.append(line if line.endswith('\n') else line + '\n')
    if len(keep) != len(lines):
      tmp = self.path + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(keep)
      os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict[str, Any], prefix: str = ''):
    if not self.enabled:
      return
    row = {'step': int(step)}
    for k, v in metrics.items():
      v = np.asarray(v)
      row[prefix + k] = v.item() if v.size == 1 else v.tolist()
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)


class Progress:
  """One progress line with steps/s, tokens/s and ETA.

  Rates are measured from the first line on: the steps before it include compilation, which
  would inflate the ETA many times over on short runs. The first line shows 'ETA ?'.
  """

  def __init__(self, total: int, start: int, tokens_per_step: int, label: str = 'train',
               clock=time.time):
    self.total, self.start, self.tps, self.label = total, start, tokens_per_step, label
    self.clock = clock
    self._ref = None                         # (step, time) of the first line
    self.enabled = jax.process_index() == 0

  def line(self, step: int, metrics: dict[str, float]) -> str:
    now = self.clock()
    if self._ref is None or step <= self._ref[0]:
      self._ref = (step, now)
      sps = float('nan')
    else:
      sps = (step - self._ref[0]) / max(now - self._ref[1], 1e-9)
    eta = (self.total - step) / sps if sps > 0 else float('inf')
    rate = ['? steps/s', '? tok/s'] if not sps > 0 else [f'{sps:.2f} steps/s',
                                                        f'{sps * self.tps:,.0f} tok/s']
    parts = [f'{self.label} {step}/{self.total}'] + rate + [f'ETA {_fmt_time(eta)}']
    parts += [f'{k} {float(v):.4g}' for k, v in metrics.items()]
    return ' | '.join(parts)

  def log(self, step: int, metrics: dict[str, float]):
    if self.enabled:
      print(self.line(step, metrics), flush=True)


def _fmt_time(s: float) -> str:
  if not np.isfinite(s):
    return '?'
  s = int(s)
  return f'{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s' if s >= 3600 else \
      f'{s // 60}m{s % 60:02d}s'


class StopFlag:
  """Set by SIGTERM/SIGINT so the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      sys.exit(130)                         # second Ctrl-C: leave now
    self.requested = True
    print(f'received signal {signum}: saving a checkpoint and stopping', flush=True)

  def should_stop(self, step: int = 0, sync_every: int = 10) -> bool:
    """Whether to stop; multi-host runs agree on it (all-gather every `sync_every` steps, so the
    host does not stall the device queue each step)."""
    flag = self.requested
    if jax.process_count() > 1:
      if step % sync_every:
        return False
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
