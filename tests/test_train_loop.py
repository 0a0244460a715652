"""The one training loop (didi_jax/train/loop.py) on a toy job: no model, exact values.

The toy state is {'step', 'total'}: each step adds the batch the iterator yields (batch k = k+1),
so any lost, repeated or reordered batch changes `total`; the iterator's state is its position.
"""
import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from didi_jax.checkpoint.manager import Manager
from didi_jax.train import loop


class Counter:
  """An iterator of batches 1, 2, 3, ... with the get_state/set_state the loop saves."""

  def __init__(self):
    self.pos = 0

  def __next__(self):
    self.pos += 1
    return self.pos

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, s):
    self.pos = int(s['pos'])


def job(total=10, save_every=4, log_every=3):
  return loop.Job('toy', 'step', total, 'toy.num_steps', 8, log_every, save_every, ('loss',),
                  'loss')


def run(tmp_path, total=10, stop_at=None, periodic_every=5):
  it = Counter()
  mngr = Manager(str(tmp_path / 'checkpoints'), async_save=False)
  j = job(total)
  fresh = lambda: {'step': jnp.zeros((), jnp.int32), 'total': jnp.zeros((), jnp.float32)}  # noqa: E731
  abstract = lambda: fresh()  # noqa: E731
  state, first = loop.start(j, mngr, abstract, fresh, it)
  calls = []

  def step_fn(state):
    x = next(it)
    if stop_at is not None and x == stop_at:
      os.kill(os.getpid(), signal.SIGTERM)      # arrives while step `x` is in flight
    new = {'step': state['step'] + 1, 'total': state['total'] + x}
    return new, {'loss': new['total'] * 1.0}

  def hook(step, state):
    calls.append(step)
    return {'seen_total': float(state['total'])}

  out = loop.run(j, workdir=str(tmp_path), mngr=mngr, state=state, first=first,
                 step_fn=step_fn, meta={'job': 'toy'}, iterator=it,
                 periodic=[loop.Periodic(periodic_every, hook, 'probe')])
  return first, out, calls


def metrics_rows(tmp_path):
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_uninterrupted_run_logs_saves_and_hooks_on_cadence(tmp_path):
  first, out, calls = run(tmp_path)
  assert first == 0 and out.complete and out.step == 10
  assert calls == [5, 10]                          # every 5 steps and the last
  assert out.last_periodic == {'seen_total': 55.0}
  assert out.last_metrics['loss'] == 55.0          # the last step's metrics, pulled after it
  rows = metrics_rows(tmp_path)
  logged = [r['step'] for r in rows if 'loss' in r]
  assert logged == [3, 6, 9, 10]                   # log_every=3 and the last step, once each
  assert {r['step']: r['loss'] for r in rows if 'loss' in r} == {3: 6.0, 6: 21.0, 9: 45.0,
                                                                 10: 55.0}
  mngr = Manager(str(tmp_path / 'checkpoints'), async_save=False)
  assert sorted(mngr.all_steps()) == [4, 8, 10]    # save_every=4 and the last step
  mngr.close()


def test_sigterm_saves_then_a_rerun_resumes_exactly(tmp_path, capsys):
  first, out, calls = run(tmp_path, stop_at=6)
  assert not out.complete and out.step == 6        # the step in flight finishes, then it stops
  assert calls == [5]
  mngr = Manager(str(tmp_path / 'checkpoints'), async_save=False)
  assert mngr.latest_step() == 6
  mngr.close()
  first, out, calls = run(tmp_path)                # same command again
  assert first == 6 and out.complete and out.step == 10
  assert calls == [10]
  assert out.last_periodic == {'seen_total': 55.0}  # no batch lost or repeated
  logged = [r['step'] for r in metrics_rows(tmp_path) if 'loss' in r]
  assert logged == [3, 6, 9, 10]
  assert 'resuming from' in capsys.readouterr().out
  # And once complete, a rerun does nothing and says so.
  first, out, calls = run(tmp_path)
  assert first == 10 and out.complete and calls == []
  assert 'toy is complete' in capsys.readouterr().out


def test_hook_zero_never_runs_and_state_is_what_step_fn_returned(tmp_path):
  first, out, calls = run(tmp_path, total=3, periodic_every=0)
  assert calls == [] and out.last_periodic == {}
  mngr = Manager(str(tmp_path / 'checkpoints'), async_save=False)
  state, data, _ = mngr.restore({'step': jnp.zeros((), jnp.int32),
                                 'total': jnp.zeros((), jnp.float32)})
  mngr.close()
  assert int(state['step']) == 3 and float(state['total']) == 6.0 and data == {'pos': 3}
  np.testing.assert_equal(out.last_metrics['loss'], 6.0)


@pytest.mark.parametrize('total', [1])
def test_single_step_job_logs_and_saves_its_only_step(tmp_path, total):
  _, out, calls = run(tmp_path, total=total)
  assert out.complete and calls == [1]
  assert [r['step'] for r in metrics_rows(tmp_path) if 'loss' in r] == [1]
