"""The DiDi-Instruct training loop: teacher loading, sharded state, the jitted iteration, periodic
samples, exact-resume checkpoints (state + data iterator), SIGTERM handling.

The teacher is loaded from `teacher.checkpoint` (a pretrain workdir, an official checkpoint, a
HF folder or hf:ORG/NAME), kept frozen outside the state and never re-saved: the checkpoint's
metadata records its source instead.
"""
from __future__ import annotations

import copy
import os

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from didi_jax import distill, networks, parallel
from didi_jax.checkpoint import importer
from didi_jax.checkpoint.manager import Manager
from didi_jax.data import pipeline
from didi_jax.evaluation import metrics
from didi_jax.models.discriminator import Spectral
from didi_jax.models.dit import DiT
from didi_jax.sampling import runner as sampling_runner
from didi_jax.train import common
from didi_jax.train import distill_state as ds
from didi_jax.train import pretrain

SIZE_KEYS = ('hidden_size', 'n_blocks', 'n_heads', 'mlp_dim', 'cond_dim', 'vocab_size', 'length')
INIT_KEY_SALT = 0x5EED


def teacher_config(cfg, teacher) -> ml_collections.ConfigDict:
  """cfg with model sizes taken from the teacher (precision/attention knobs stay the config's)."""
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    changed = []
    for k in SIZE_KEYS:
      v = teacher.model_cfg[k]
      if cfg.model[k] != v:
        changed.append(f'{k} {cfg.model[k]} -> {v}')
        cfg.model[k] = v
  if changed and jax.process_index() == 0:
    print('model sizes taken from the teacher: ' + ', '.join(changed), flush=True)
  return cfg


def load_teacher(cfg):
  if not cfg.teacher.checkpoint:
    raise FileNotFoundError('distill needs a teacher: set --config.teacher.checkpoint=PATH '
                            '(a pretrain workdir, a .ckpt/.safetensors file, or hf:ORG/NAME)')
  source = cfg.teacher.checkpoint
  model_cfg = None if networks.checkpoint_dir(source) else cfg.model
  return networks.load(source, 'teacher', model_cfg, weights=cfg.teacher.weights)


def abstract_teacher_params(cfg):
  """Shapes and dtypes of the teacher's parameters (a DiT of `cfg.model`), nothing allocated."""
  return nnx.state(pretrain.abstract_model(cfg.model), nnx.Param)


class DistillRunner:
  """Mesh, shardings, compiled iteration and helpers for one distillation run.

  `teacher=None` builds the same mesh, shardings and jitted step without any teacher arrays
  (`teacher_params` is then None): what `didi_jax.aot` compiles ahead of time.
  """

  def __init__(self, cfg, teacher, devices=None):
    self.cfg = cfg
    self.mesh = parallel.make_mesh(cfg.mesh, devices)
    div = parallel.batch_divisor(self.mesh)
    if cfg.distill.batch_size % div:
      raise ValueError(f'distill.batch_size={cfg.distill.batch_size} is not divisible by the '
                       f'{div} devices of the batch axes: use a multiple of {div} or set '
                       '--config.mesh.* so that data*fsdp divides it')
    self.student_gd, self.disc_gd = ds.make_graphdefs(cfg)
    self.teacher_params = None if teacher is None else \
        parallel.shard_params(self.mesh, teacher.params)
    self.abstract = networks.abstract_distill_state(cfg)
    self.state_sh = parallel.param_shardings(self.mesh, self.abstract)
    self.teacher_sh = parallel.param_shardings(
        self.mesh, abstract_teacher_params(cfg) if teacher is None else self.teacher_params)
    rep = parallel.replicated(self.mesh)
    self.run_key = jax.random.PRNGKey(cfg.seed)
    step = distill.make_distill_step(cfg, self.student_gd, self.disc_gd)
    self.step = jax.jit(step, in_shardings=(self.state_sh, self.teacher_sh,
                                            parallel.batch_sharding(self.mesh), rep),
                        out_shardings=(self.state_sh, rep), donate_argnums=(0,))
    self.refresh = jax.jit(ds.refresh_teacher_buffer, out_shardings=self.state_sh,
                           donate_argnums=(0,))

  def abstract_sharded(self):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract, self.state_sh)

  def fresh_state(self):
    cfg = self.cfg
    key = jax.random.fold_in(self.run_key, INIT_KEY_SALT)
    fn = jax.jit(lambda tp, k: ds.init_distill_state(cfg, tp, k), out_shardings=self.state_sh)
    return fn(self.teacher_params, key)

  def state_from_didi_checkpoint(self, source: str):
    """D2 `init='checkpoint'`: student, EMA and discriminator (incl. head and u, v) from an
    imported DiDi checkpoint (official .ckpt, the HF release, or our export); fresh optimisers."""
    imp = importer.import_didi(source, self.cfg.model)
    state = jax.device_get(self.fresh_state())

    def fill(tree, pure):
      tree = jax.tree.map(np.asarray, tree)
      nnx.replace_by_pure_dict(tree, pure)
      return tree
    disc = nnx.merge(self.disc_gd, state.disc_train, state.disc_frozen, state.spectral)
    nnx.update(disc, fill(nnx.state(disc, nnx.Param), imp['discriminator']))
    nnx.update(disc, fill(nnx.state(disc, Spectral), imp['discriminator_spectral']))
    _, train, frozen, spectral = ds.split_discriminator(self.cfg, disc)
    state = state.replace(student=fill(state.student, imp['student']),
                          ema=fill(state.ema, imp['student_ema']),
                          disc_train=train, disc_frozen=frozen, spectral=spectral)
    return jax.device_put(state, self.state_sh)


def periodic_samples(runner: DistillRunner, state, cfg, step: int) -> dict:
  """Judge-free statistics of a few student-EMA samples at 8 and 16 NFE."""
  gd = nnx.graphdef(nnx.eval_shape(lambda: DiT(cfg.model, rngs=nnx.Rngs(0))))
  net = networks.Network('student_ema', cfg.model, gd, state.ema)
  out = {}
  count = int(cfg.distill.sample_count)
  div = parallel.batch_divisor(runner.mesh)
  batch = max(div, -(-count // div) * div)
  for nfe in (8, 16):
    scfg = copy.deepcopy(cfg.sampler)
    with scfg.unlocked():
      scfg.kind, scfg.steps = 'ancestral', nfe
    res = sampling_runner.generate(scfg, net, None, num_samples=count, batch_size=batch,
                                   seed=step, mesh=runner.mesh)
    out[f'sample_nfe{nfe}_entropy'] = float(np.mean(metrics.unigram_entropy(res.ids)))
    out[f'sample_nfe{nfe}_rep4'] = float(metrics.repeated_ngram_rate(res.ids, 4))
  return out


def fill_teacher_buffer(runner: DistillRunner, state, teacher, cfg, step: int, count: int):
  """Teacher ancestral samples (D1) written into `count` buffer slots."""
  scfg = copy.deepcopy(cfg.sampler)
  with scfg.unlocked():
    scfg.kind, scfg.steps = 'ancestral', int(cfg.distill.teacher_buffer.steps)
    scfg.student_sigma, scfg.student_output = 'zero', 'subs'
  div = parallel.batch_divisor(runner.mesh)
  batch = max(div, min(64, -(-count // div) * div))
  res = sampling_runner.generate(scfg, teacher, None, num_samples=count, batch_size=batch,
                                 seed=10_000_019 + step, mesh=runner.mesh)
  key = jax.random.fold_in(jax.random.fold_in(runner.run_key, INIT_KEY_SALT + 1), step)
  return runner.refresh(state, jnp.asarray(res.ids), key)


def run(cfg, workdir: str) -> dict:
  """The `distill` job."""
  d = cfg.distill
  os.makedirs(workdir, exist_ok=True)
  teacher = load_teacher(cfg)
  cfg = teacher_config(cfg, teacher)
  runner = DistillRunner(cfg, teacher)
  teacher = networks.Network('teacher', cfg.model, teacher.graphdef, runner.teacher_params)
  mngr = Manager(os.path.join(workdir, 'checkpoints'), keep=cfg.checkpoint.keep,
                 async_save=cfg.checkpoint.async_save)
  L = cfg.model.length
  it = None
  if d.real_source == 'data':
    it = pipeline.TrainIterator(cfg.data, L, d.batch_size, seed=cfg.data.shuffle_seed)
  start = mngr.latest_step()
  if start is not None:
    state, data_state, _ = mngr.restore(runner.abstract_sharded())
    if it is not None and data_state:
      it.set_state(data_state)
    print(f'resuming distillation from {mngr.directory}/{start}', flush=True)
  elif d.init == 'checkpoint':
    state, start = runner.state_from_didi_checkpoint(d.init_checkpoint), 0
  else:
    state, start = runner.fresh_state(), 0
  if start >= d.num_iterations:
    print(f'distill is complete: {mngr.directory} holds iteration {start} of '
          f'{d.num_iterations} (raise --config.distill.num_iterations to continue)', flush=True)
    mngr.close()
    return {'step': start, 'complete': True}

  writer = common.MetricWriter(workdir, cfg.logging.tensorboard, resume_step=start)
  progress = common.Progress(d.num_iterations, start, d.batch_size * d.group_size * L, 'distill')
  stop = common.StopFlag()
  meta = pretrain.checkpoint_meta(cfg, 'distill', {'teacher_source': cfg.teacher.checkpoint,
                                          'teacher_weights': cfg.teacher.weights})
  dummy = np.zeros((d.batch_size, L), np.int32)
  step = start
  pending = previous = None
  last = {}
  try:
    while step < d.num_iterations:
      due, count = ds.teacher_buffer_due(cfg, step)
      if due:
        state = fill_teacher_buffer(runner, state, teacher, cfg, step, count)
      x = next(it) if it is not None else dummy
      state, metrics = runner.step(state, runner.teacher_params,
                                   parallel.global_batch(runner.mesh, x), runner.run_key)
      if previous is not None:                # keep at most one iteration queued
        jax.block_until_ready(previous)
      previous = metrics['d_loss']
      if pending is not None:
        last = _report(writer, progress, *pending)
      step += 1
      pending = (step, metrics) if (step % d.log_every == 0 or step == d.num_iterations) \
          else None
      if d.sample_every and (step % d.sample_every == 0 or step == d.num_iterations):
        extra = periodic_samples(runner, state, cfg, step)
        writer.write(step, extra)
        if progress.enabled:
          print(f'samples {step}: ' + ' '.join(f'{k} {v:.4g}' for k, v in extra.items()),
                flush=True)
      stopping = stop.should_stop(step)
      if step % cfg.checkpoint.every == 0 or step == d.num_iterations or stopping:
        mngr.save(step, state, it.get_state() if it is not None else {}, meta)
      if stopping:
        break
    if pending is not None:
      last = _report(writer, progress, *pending)
  finally:
    mngr.close()
    stop.restore()
  return {'step': step, 'complete': step >= d.num_iterations,
          **{k: last[k] for k in ('d_loss', 'd_acc_real', 'd_acc_fake', 'reward_mean', 'kl_hi',
                                  'kl_lo', 'entropy') if k in last}}


PROGRESS_KEYS = ('d_loss', 'd_acc_real', 'd_acc_fake', 'reward_mean', 'kl_hi', 'kl_lo', 'entropy')


def _report(writer, progress, step, metrics) -> dict:
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  writer.write(step, m)
  progress.log(step, {k: m[k] for k in PROGRESS_KEYS if k in m})
  return m
