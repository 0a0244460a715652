"""The one training loop that pre-training and distillation both run, through hooks.

It owns what the two jobs share: resume from the latest checkpoint (state and data iterator) or
start fresh, the "already complete" exit, bounded asynchronous dispatch (at most one step queued
on the device; a step's metrics are pulled after the next one is dispatched), metrics
(`metrics.jsonl`, TensorBoard), progress with ETA, periodic work (validation, samples), the save
cadence and preemption (SIGTERM/SIGINT: the step in flight finishes, a checkpoint is written, the
job returns `complete=False`). A job supplies its step function and its hooks.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax

from didi_jax.checkpoint.manager import Manager
from didi_jax.train import common


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Work every `every` steps (and at the last step): fn(step, state) -> metrics to log."""
  every: int
  fn: Callable[[int, Any], dict]
  label: str                       # the printed line's prefix, e.g. 'eval', 'samples'
  fmt: str = '.4f'
  show: Sequence[str] = ()         # the metrics the printed line shows (empty: all)


@dataclasses.dataclass(frozen=True)
class Job:
  """What a training job tells the loop about itself."""
  name: str                        # 'pretrain' | 'distill': messages and progress label
  unit: str                        # 'step' | 'iteration'
  total: int                       # steps to run in all
  total_key: str                   # the config key of `total`, named in messages
  tokens_per_step: int             # for the progress line's tok/s
  log_every: int
  save_every: int
  progress_keys: Sequence[str]     # metrics shown on the progress line
  sync_key: str                    # a scalar metric of each step, waited on to bound dispatch


@dataclasses.dataclass
class Outcome:
  step: int
  complete: bool
  last_metrics: dict               # the last logged step's metrics
  last_periodic: dict              # the last periodic hook's metrics


def start(job: Job, mngr: Manager, abstract_sharded: Callable[[], Any], fresh: Callable[[], Any],
          iterator=None) -> tuple[Any, int]:
  """(state, first step): the latest checkpoint of `mngr` (restoring `iterator` too), else
  `fresh()` at step 0."""
  mngr.remove_unfinished_saves()      # e.g. the partial step of a save that ran out of space
  if mngr.latest_step() is None:
    return fresh(), 0
  try:                                # a damaged newest step: the newest intact one, warned
    state, data_state, _ = mngr.restore(abstract_sharded())
  except BaseException:
    _close_quietly(mngr)              # no background threads left to complain at exit
    raise
  step = mngr.restored_step
  if iterator is not None and data_state:
    iterator.set_state(data_state)
  logging.info('%s resumed from %s %d', job.name, job.unit, step)
  print(f'resuming from {mngr.directory}/{step}', flush=True)
  return state, step


def _close_quietly(mngr: Manager) -> None:
  try:
    mngr.close()
  except Exception:  # pylint: disable=broad-except
    pass            # the error being raised already says what went wrong


def run(job: Job, *, workdir: str, mngr: Manager, state: Any, first: int,
        step_fn: Callable[[Any], tuple[Any, dict]], meta: dict, iterator=None,
        tensorboard: bool = False, before_step: Optional[Callable[[int, Any], Any]] = None,
        periodic: Sequence[Periodic] = ()) -> Outcome:
  """Runs steps first..job.total with the shared machinery; closes `mngr`.

  step_fn(state) -> (state, metrics) dispatches one step (it pulls its own batch);
  before_step(step, state) -> state runs before each step (e.g. refreshing a buffer).
  """
  if first >= job.total:
    print(f'{job.name} is complete: {mngr.directory} holds {job.unit} {first} of {job.total} '
          f'(raise --config.{job.total_key} to continue)', flush=True)
    mngr.close()
    return Outcome(first, True, {}, {})
  writer = common.MetricWriter(workdir, tensorboard, resume_step=first)
  progress = common.Progress(job.total, first, job.tokens_per_step, job.name)
  stop = common.StopFlag()
  step, pending, previous = first, None, None
  last, last_periodic = {}, {}

  def report(at, metrics):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    writer.write(at, m)
    progress.log(at, {k: m[k] for k in job.progress_keys if k in m})
    return m

  try:
    while step < job.total:
      if before_step is not None:
        state = before_step(step, state)
      state, metrics = step_fn(state)
      if previous is not None:                # keep at most one step queued on the device
        jax.block_until_ready(previous)
      previous = metrics[job.sync_key]
      if pending is not None:                 # pull step-1 metrics after dispatching step
        last = report(*pending)
      step += 1
      final = step == job.total
      pending = (step, metrics) if (step % job.log_every == 0 or final) else None
      for hook in periodic:
        if hook.every and (step % hook.every == 0 or final):
          last_periodic = hook.fn(step, state)
          writer.write(step, last_periodic)
          if progress.enabled:
            print(f'{hook.label} {step}: ' + ' '.join(
                f'{k} {v:{hook.fmt}}' for k, v in last_periodic.items()
                if not hook.show or k in hook.show), flush=True)
      stopping = stop.should_stop(step)
      if step % job.save_every == 0 or final or stopping:
        mngr.save(step, state, iterator.get_state() if iterator is not None else {}, meta)
      if stopping:
        break
    if pending is not None:
      last = report(*pending)
  except BaseException:
    _close_quietly(mngr)              # the error in flight is the one to report
    raise
  else:
    mngr.close()                      # a full disk in the last save is reported here
  finally:
    stop.restore()
  return Outcome(step, step >= job.total, last, last_periodic)
