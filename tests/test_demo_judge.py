"""The shipped in-domain judge ('demo-bytes'): small, larger than the teacher it judges, trained on
the training split only, and reproducing its recorded validation NLL."""
import json
import os

import jax
import pytest

from configs import demo
from didi_jax.checkpoint import loader
from didi_jax.evaluation import judges
from tests.test_demo_teacher import recorded_eval

RECORD = os.path.join(judges.DEMO_JUDGE_DIR, 'record.json')


def record(path=RECORD):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def teacher_record():
  return record(os.path.join(demo.DEMO_TEACHER_DIR, 'record.json'))


def test_demo_judge_is_shipped_small_and_larger_than_the_teacher():
  rec = record()
  assert os.path.join(judges.DEMO_JUDGE_DIR, rec['file']) == judges.DEMO_JUDGE
  assert os.path.getsize(judges.DEMO_JUDGE) < 20 * 2**20
  for key in ('command', 'steps', 'tokens_seen', 'valid_nll', 'hardware', 'data', 'status'):
    assert key in rec
  net = loader.load(judges.DEMO_JUDGE, 'ar', demo.get_config('judge').model)
  n_judge = sum(int(x.size) for x in jax.tree.leaves(net.params))
  teacher = loader.load(demo.DEMO_TEACHER, 'teacher')
  n_teacher = sum(int(x.size) for x in jax.tree.leaves(teacher.params))
  assert n_judge == rec['parameters'] and n_judge > n_teacher
  # Trained longer than the teacher, by the whole recipe of configs/demo.py:judge.
  pcfg = demo.get_config('judge').pretrain
  assert rec['steps'] == pcfg.num_steps and rec['status'].startswith('final')
  assert rec['tokens_seen'] == pcfg.num_steps * pcfg.batch_size * rec['length']
  assert rec['tokens_seen'] > teacher_record()['tokens_seen']


def test_demo_judge_reproduces_recorded_validation_nll():
  rec = record()
  cfg = demo.get_config('judge')
  got = recorded_eval(cfg, rec, loader.load(judges.DEMO_JUDGE, 'ar', cfg.model).params)
  assert got == pytest.approx(rec['valid_nll'], rel=2e-3)
  # An exact NLL per byte, below the teacher's NELBO bound on the same blocks (1.875 nats).
  assert got < teacher_record()['valid_nelbo']
