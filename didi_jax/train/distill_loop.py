"""The DiDi-Instruct training loop: teacher loading, sharded state, the jitted iteration, periodic
samples, exact-resume checkpoints (state + data iterator), SIGTERM handling.

The teacher is loaded from `teacher.checkpoint` (a pretrain workdir, an official checkpoint, a
HF folder or hf:ORG/NAME), kept frozen outside the state and never re-saved: the checkpoint's
metadata records its source instead.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from didi_jax import models, parallel, samples
from didi_jax.distill import didi as distill
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import importer
from didi_jax.checkpoint.manager import Manager
from didi_jax.data import pipeline
from didi_jax.models.discriminator import Spectral
from didi_jax.sampling import runner as sampling_runner
from didi_jax.train import distill_state as ds
from didi_jax.train import common
from didi_jax.train import loop
from didi_jax.train import pretrain

SIZE_KEYS = ('hidden_size', 'n_blocks', 'n_heads', 'mlp_dim', 'cond_dim', 'vocab_size', 'length')
INIT_KEY_SALT = 0x5EED


def teacher_config(cfg, teacher) -> ml_collections.ConfigDict:
  """cfg with model sizes taken from the teacher (precision/attention knobs stay the config's);
  an ESM teacher also gives model.kind and model.esm (ids, token dropout, rotary table)."""
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    changed = []
    kind = str(teacher.model_cfg.get('kind', 'dit'))
    if kind == 'esm':
      if cfg.model.kind != kind:
        changed.append(f'kind {cfg.model.kind} -> {kind}')
        cfg.model.kind = kind
      esm_fields = teacher.model_cfg.esm.to_dict()
      if cfg.model.esm.to_dict() != esm_fields:
        changed.append('esm fields')
        cfg.model.esm = ml_collections.ConfigDict(esm_fields)
    for k in SIZE_KEYS:
      if k in ('cond_dim', 'length') and kind == 'esm':
        continue                      # ESM: no time conditioning, any length (rotary)
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
  model_cfg = None if loader.checkpoint_dir(source) else cfg.model
  return loader.load(source, 'teacher', model_cfg, weights=cfg.teacher.weights)


def abstract_teacher_params(cfg):
  """Shapes and dtypes of the teacher's parameters (a DiT of `cfg.model`), nothing allocated."""
  return models.split_abstract(cfg.model)[1]


class Distiller:
  """Mesh, shardings, compiled iteration and helpers for one distillation run.

  `teacher=None` builds the same mesh, shardings and jitted step without any teacher arrays
  (`teacher_params` is then None): what `didi_jax.aot` compiles ahead of time.
  """

  def __init__(self, cfg, teacher, devices=None, judge=None):
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
    self.abstract = ds.abstract_distill_state(cfg)
    self.state_sh = parallel.param_shardings(self.mesh, self.abstract)
    self.teacher_sh = parallel.param_shardings(
        self.mesh, abstract_teacher_params(cfg) if teacher is None else self.teacher_params)
    rep = parallel.replicated(self.mesh)
    self.run_key = jax.random.PRNGKey(cfg.seed)
    step = distill.make_distill_step(cfg, self.student_gd, self.disc_gd, judge=judge)
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


def periodic_samples(runner: Distiller, state, cfg, step: int) -> dict:
  """Judge-free statistics of a few student-EMA samples at 8 and 16 NFE."""
  net = loader.Network('student_ema', cfg.model, runner.student_gd, state.ema)
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
    out[f'sample_nfe{nfe}_entropy'] = float(np.mean(samples.unigram_entropy(res.ids)))
    out[f'sample_nfe{nfe}_rep4'] = float(samples.repeated_ngram_rate(res.ids, 4))
  return out


def fill_teacher_buffer(runner: Distiller, state, teacher, cfg, step: int, count: int):
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


PROGRESS_KEYS = ('d_loss', 'd_acc_real', 'd_acc_fake', 'reward_mean', 'kl_hi', 'kl_lo', 'entropy')


def run(cfg, workdir: str, curve: Optional[Callable[..., Any]] = None,
        reward_judge: Optional[Callable[[Any], Any]] = None) -> dict:
  """The `distill` job.

  `curve(cfg, workdir, runner, teacher) -> fn(step, state) -> metrics`: the learning curve
  (evaluation/distill_curve.Curve, passed in by the job layer, which may load judges), called
  every `distill.eval_every` iterations, at the last one and, on a fresh start, at iteration 0.
  `reward_judge(cfg) -> (logits_fn, eos_id)`: the judge of `distill.reward_source='judge'`
  (loaded by the job layer, evaluation/judges.reward_judge), called only when that is set.
  """
  d = cfg.distill
  os.makedirs(workdir, exist_ok=True)
  teacher = load_teacher(cfg)
  cfg = teacher_config(cfg, teacher)
  judge = None
  if distill.judge_rewarded(d):
    if reward_judge is None:
      raise ValueError("distill.reward_source='judge' needs the job layer's judge loader "
                       '(run it as the distill job: python -m didi_jax.main ...)')
    judge = reward_judge(cfg)
    print(f'distill: rewards from the judge {d.reward_judge} (distill.reward_source=judge, '
          'a diagnostic control: docs/method.md §10.2)', flush=True)
  runner = Distiller(cfg, teacher, judge=judge)
  teacher = loader.Network('teacher', cfg.model, teacher.graphdef, runner.teacher_params)
  mngr = Manager(os.path.join(workdir, 'checkpoints'), keep=cfg.checkpoint.keep,
                 async_save=cfg.checkpoint.async_save)
  L = cfg.model.length
  it = None
  if d.real_source == 'data':
    it = pipeline.TrainIterator(cfg.data, L, d.batch_size, seed=cfg.data.shuffle_seed)
  job = loop.Job('distill', 'iteration', d.num_iterations, 'distill.num_iterations',
                 d.batch_size * d.group_size * L, d.log_every, cfg.checkpoint.every,
                 PROGRESS_KEYS, 'd_loss')
  if d.init == 'checkpoint':
    fresh = lambda: runner.state_from_didi_checkpoint(d.init_checkpoint)  # noqa: E731
  else:
    fresh = runner.fresh_state
  state, first = loop.start(job, mngr, runner.abstract_sharded, fresh, it)
  dummy = np.zeros((d.batch_size, L), np.int32)

  def refresh_buffer(step, state):
    due, count = ds.teacher_buffer_due(cfg, step)
    return fill_teacher_buffer(runner, state, teacher, cfg, step, count) if due else state

  def step_fn(state):
    x = next(it) if it is not None else dummy
    return runner.step(state, runner.teacher_params, parallel.global_batch(runner.mesh, x),
                       runner.run_key)

  periodic = [loop.Periodic(d.sample_every,
                            lambda step, state: periodic_samples(runner, state, cfg, step),
                            'samples', '.4g')]
  if curve is not None and d.eval_every:
    hook = curve(cfg, workdir, runner, teacher)
    if first == 0:
      # Iteration 0: the teacher-initialised student. A fresh start's writer drops every row of an
      # attempt killed before its first checkpoint, this one included (the loop's own writer
      # keeps rows at or before the step it starts from).
      point = hook(0, state)
      common.MetricWriter(workdir, cfg.logging.tensorboard, resume_step=-1).write(0, point)
      print('curve 0: ' + ' '.join(f'{k} {v:.4g}' for k, v in point.items()
                                   if k in getattr(hook, 'show', point)), flush=True)
    periodic.append(loop.Periodic(d.eval_every, hook, 'curve', '.4g',
                                  show=tuple(getattr(hook, 'show', ()))))
  meta = pretrain.checkpoint_meta(cfg, 'distill', {'teacher_source': cfg.teacher.checkpoint,
                                                   'teacher_weights': cfg.teacher.weights})
  out = loop.run(job, workdir=workdir, mngr=mngr, state=state, first=first, step_fn=step_fn,
                 meta=meta, iterator=it, tensorboard=cfg.logging.tensorboard,
                 before_step=refresh_buffer, periodic=periodic)
  return {'step': out.step, 'complete': out.complete,
          **{k: out.last_metrics[k] for k in PROGRESS_KEYS if k in out.last_metrics}}
