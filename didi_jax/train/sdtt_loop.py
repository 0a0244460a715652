"""The SDTT training loop (docs/method.md §14): the teacher loaded as for DiDi, a sharded state
that carries the current round's teacher, the jitted iteration, the round hand-off, and the one
training loop (`train.loop`: exact resume, checkpoints, SIGTERM, periodic samples).

Rounds are one continuous iteration count: round r covers iterations [r·R, (r+1)·R) with
R = distill.sdtt.round_iterations. Before the first iteration of a round the finished round's
state is checkpointed (its own resumable stage) and handed off (teacher ← raw student, fresh
optimiser, EMA kept). The hand-off is a pure function of the saved state, so a run killed
anywhere, mid-round or at a boundary, resumes to the same numbers.
"""
from __future__ import annotations

import functools
import os

import jax

from didi_jax import parallel
from didi_jax.checkpoint.manager import Manager
from didi_jax.data import pipeline
from didi_jax.distill import sdtt
from didi_jax.train import distill_loop
from didi_jax.train import loop
from didi_jax.train import pretrain

PROGRESS_KEYS = ('loss', 'round', 'lr', 'revealed_frac')


class SdttDistiller:
  """Mesh, shardings and the compiled iteration and hand-off of one SDTT run.

  `teacher=None` builds everything without teacher arrays (what `didi_jax.aot` compiles).
  """

  def __init__(self, cfg, teacher, devices=None):
    self.cfg = cfg
    self.mesh = parallel.make_mesh(cfg.mesh, devices)
    batch = int(cfg.distill.sdtt.batch_size)
    div = parallel.batch_divisor(self.mesh)
    if batch % div:
      raise ValueError(f'distill.sdtt.batch_size={batch} is not divisible by the {div} devices '
                       f'of the batch axes: use a multiple of {div} or set --config.mesh.* so '
                       'that data*fsdp divides it')
    self.student_gd = sdtt.graphdef(cfg)
    self.teacher_params = None if teacher is None else \
        parallel.shard_params(self.mesh, teacher.params)
    self.abstract = sdtt.abstract_state(cfg)
    self.state_sh = parallel.param_shardings(self.mesh, self.abstract)
    rep = parallel.replicated(self.mesh)
    self.run_key = jax.random.PRNGKey(cfg.seed)
    self.step = jax.jit(sdtt.make_sdtt_step(cfg, self.student_gd),
                        in_shardings=(self.state_sh, parallel.batch_sharding(self.mesh), rep),
                        out_shardings=(self.state_sh, rep), donate_argnums=(0,))
    self.hand_off = jax.jit(functools.partial(sdtt.hand_off, cfg), out_shardings=self.state_sh,
                            donate_argnums=(0,))

  def abstract_sharded(self):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract, self.state_sh)

  def fresh_state(self):
    fn = jax.jit(lambda tp: sdtt.init_state(self.cfg, tp), out_shardings=self.state_sh)
    return fn(self.teacher_params)


def run(cfg, workdir: str) -> dict:
  """The `distill` job with distill.method='sdtt'."""
  d, s = cfg.distill, cfg.distill.sdtt
  os.makedirs(workdir, exist_ok=True)
  teacher = distill_loop.load_teacher(cfg)
  cfg = distill_loop.teacher_config(cfg, teacher)
  runner = SdttDistiller(cfg, teacher)
  del teacher
  mngr = Manager(os.path.join(workdir, 'checkpoints'), keep=cfg.checkpoint.keep,
                 async_save=cfg.checkpoint.async_save)
  L, B = cfg.model.length, int(s.batch_size)
  it = pipeline.TrainIterator(cfg.data, L, B, seed=cfg.data.shuffle_seed)
  job = loop.Job('distill', 'iteration', sdtt.total_iterations(s), 'distill.sdtt.rounds', B * L,
                 d.log_every, cfg.checkpoint.every, PROGRESS_KEYS, 'loss')
  state, first = loop.start(job, mngr, runner.abstract_sharded, runner.fresh_state, it)
  meta = pretrain.checkpoint_meta(cfg, 'distill', {'method': 'sdtt',
                                                   'teacher_source': cfg.teacher.checkpoint,
                                                   'teacher_weights': cfg.teacher.weights})

  def next_round(step, state):
    if not sdtt.is_round_start(step, s):
      return state
    if mngr.latest_step() != step:       # the finished round's own checkpoint
      mngr.save(step, state, it.get_state(), meta)
    r = int(sdtt.round_of(step, s))
    print(f'sdtt: round {r - 1} done at iteration {step}; round {r}: the teacher takes '
          f'{sdtt.teacher_steps(r, s)} steps, the student learns {sdtt.teacher_steps(r, s) // 2}',
          flush=True)
    return runner.hand_off(state)

  def step_fn(state):
    return runner.step(state, parallel.global_batch(runner.mesh, next(it)), runner.run_key)

  out = loop.run(job, workdir=workdir, mngr=mngr, state=state, first=first, step_fn=step_fn,
                 meta=meta, iterator=it, tensorboard=cfg.logging.tensorboard,
                 before_step=next_round,
                 periodic=[loop.Periodic(d.sample_every,
                                         lambda step, state: distill_loop.periodic_samples(
                                             runner, state, cfg, step), 'samples', '.4g')])
  return {'step': out.step, 'complete': out.complete,
          **{k: out.last_metrics[k] for k in PROGRESS_KEYS if k in out.last_metrics}}
