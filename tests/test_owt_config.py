"""configs/owt.py end to end with a local teacher file (official mdlm-owt layout) and a local
OpenWebText-style dump: distillation iterations, then RGAS samples from the student."""
import json
import os

import jax
import numpy as np
from flax import nnx

from configs import owt
from didi_jax import main as cli
from didi_jax.checkpoint import exporter
from didi_jax.models.dit import DiT

from tests.test_cli import WORDS


def test_owt_config_runs_with_local_teacher(tmp_path):
  cfg = owt.get_config()
  # Tiny sizes; everything else is the paper's recipe.
  for k, v in dict(hidden_size=32, n_blocks=2, n_heads=2, mlp_dim=64, cond_dim=16,
                   length=32, compute_dtype='float32', attention_impl='xla').items():
    cfg.model[k] = v
  model = DiT(cfg.model, rngs=nnx.Rngs(3))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  teacher = str(tmp_path / 'mdlm-owt' / 'model.safetensors')
  os.makedirs(os.path.dirname(teacher))
  exporter.export_dit_safetensors(teacher, params, model_cfg=cfg.model, prefix='backbone.')
  rng = np.random.RandomState(0)
  dump = tmp_path / 'owt.jsonl'
  with open(dump, 'w', encoding='utf-8') as f:
    for _ in range(40):
      f.write(json.dumps({'text': ' '.join(rng.choice(WORDS, 80))}) + '\n')
  cfg.teacher.checkpoint = teacher
  cfg.data.paths = str(dump)
  cfg.data.valid_docs = 4
  cfg.data.pack_group = 0
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.mesh.data = 1
  cfg.distill.num_iterations = 3
  cfg.distill.optim.student.warmup_steps = 1
  cfg.distill.optim.disc.warmup_steps = 1
  cfg.distill.disc_unfreeze_blocks = 1
  cfg.distill.sample_every = 0
  cfg.distill.log_every = 1
  cfg.checkpoint.async_save = False
  work = str(tmp_path / 'run')
  out = cli.run_job(cfg, work)
  assert out['complete'] and out['step'] == 3
  rows = [json.loads(x) for x in open(os.path.join(work, 'metrics.jsonl'), encoding='utf-8')]
  assert [r['step'] for r in rows if 'd_loss' in r] == [1, 2, 3]
  assert all(np.isfinite(r['student_loss']) for r in rows if 'student_loss' in r)
  cfg.job = 'sample'
  cfg.sample.num_samples = 2
  cfg.sample.batch_size = 2
  cfg.sampler.steps = 4
  summary = cli.run_job(cfg, work)           # RGAS from the distilled student + discriminator
  assert summary['num_samples'] == 2 and summary['disc_forwards'] > 0
