"""Training-loop pieces of `didi_jax/train/common.py`: the progress line's rates and ETA, and the
metrics file on resume."""
import json

from didi_jax.train import common


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_eta_is_measured_after_compilation():
  """Run 100 steps from 0: the first 10 take 30 s (compilation), then 0.1 s each."""
  clock = Clock()
  p = common.Progress(100, 0, tokens_per_step=64, label='distill', clock=clock)
  clock.t = 30.0
  first = p.line(10, {})
  assert 'ETA ?' in first and '? steps/s' in first       # no honest rate yet
  clock.t = 31.0
  line = p.line(20, {'loss': 1.5})
  assert '10.00 steps/s' in line and '640 tok/s' in line
  assert 'ETA 0m08s' in line                              # 80 steps at 10/s, not 4 minutes
  assert line.startswith('distill 20/100') and 'loss 1.5' in line


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'loss': float(s)} for s in (1, 2, 3, 4, 5)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 6, "lo')  # cut short
  writer = common.MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {'loss': 40.0})
  got = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r['step'] for r in got] == [1, 2, 3, 4] and got[-1]['loss'] == 40.0
  # Without a resume step the file is appended to as before.
  common.MetricWriter(str(tmp_path)).write(5, {'loss': 5.0})
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
