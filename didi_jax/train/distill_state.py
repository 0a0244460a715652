"""DiDi-Instruct training state, optimisers and initialisation (docs/method.md §5, §7.3, D1, D2).

The state is one pytree (`DistillState`): iteration, student θ, student EMA, the discriminator split
into its trainable part (last `disc_unfreeze_blocks` blocks + head), its frozen part (embedding,
time MLP, earlier blocks: no optimiser state) and its spectral-norm u/v, the two optax states, and
the optional teacher-sample buffer (`real_source='teacher_samples'`). The teacher is NOT in the
state: it is passed to every step and never saved.

Parameter trees are `nnx.State`s as produced by `nnx.split`; every model is rebuilt inside a jitted
function with `nnx.merge(graphdef, *states)`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax import struct

from didi_jax import models
from didi_jax.models.discriminator import Discriminator, Spectral
from didi_jax.train import common

Array = jax.Array
PyTree = Any


@struct.dataclass
class DistillState:
  """Everything a DiDi-Instruct iteration reads and writes (exact-resume unit, docs/method.md §12)."""
  step: Array                    # int32 scalar: 0-based iteration k
  student: nnx.State             # θ (nnx.Param)
  ema: nnx.State                 # student EMA (what the samplers use)
  disc_train: nnx.State          # trainable discriminator params (last blocks + head)
  disc_frozen: nnx.State         # frozen discriminator params (no optimiser state)
  spectral: nnx.State            # spectral-norm u/v of the head (Spectral variables)
  opt_student: PyTree            # optax state over `student`
  opt_disc: PyTree               # optax state over `disc_train` only
  teacher_buffer: Optional[Array] = None   # (size, L) int32 teacher samples, or None


# ----------------------------------------------------------------------------- models


def distill_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg.model` with the distillation dropout rate (docs/method.md D9: 0.0 by default)."""
  model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  model_cfg.dropout = float(cfg.distill.dropout)
  return model_cfg


def disc_trainable_filter(n_blocks: int, unfreeze_blocks: int, *,
                          block_path: tuple = Discriminator.block_path,
                          head_modules: tuple = Discriminator.head_modules) -> Callable:
  """nnx filter (path, value) -> bool: the head modules and the last `unfreeze_blocks` of the
  `n_blocks` blocks under `block_path` (DiT: ('blocks',); ESM: ('esm', 'encoder', 'layer'))."""
  first = n_blocks - unfreeze_blocks
  block_path, depth = tuple(block_path), len(block_path)

  def is_trainable(path, _):
    if not path:
      return False
    if path[0] in head_modules:
      return True
    return (len(path) > depth and tuple(path[:depth]) == block_path
            and int(path[depth]) >= first)
  return nnx.All(nnx.Param, is_trainable)


def split_discriminator(cfg, disc: Discriminator):
  """(graphdef, trainable, frozen, spectral) of a discriminator under `cfg.distill` (which part
  trains: the discriminator class's `block_path` and `head_modules`)."""
  trainable = disc_trainable_filter(cfg.model.n_blocks, cfg.distill.disc_unfreeze_blocks,
                                    block_path=type(disc).block_path,
                                    head_modules=type(disc).head_modules)
  return nnx.split(disc, trainable, nnx.Param, Spectral)


def make_graphdefs(cfg: ml_collections.ConfigDict):
  """(student_graphdef, disc_graphdef) without allocating parameters.

  The student graphdef also serves the teacher (same architecture; the teacher never gets a
  dropout key).
  """
  model_cfg = distill_model_config(cfg)
  student = models.abstract(model_cfg, 'denoiser')
  disc = models.abstract(model_cfg, 'discriminator')
  return nnx.graphdef(student), split_discriminator(cfg, disc)[0]


# ----------------------------------------------------------------------------- optimisers


def lr_schedule(peak: float, warmup_steps: int, total_steps: int) -> Callable[[Array], Array]:
  """docs/method.md §7.3: lr(k) = P·(k+1)/W for k < W, else P·max(0, (T−k)/(T−W))."""
  if warmup_steps < 1 or total_steps <= warmup_steps:
    raise ValueError(f'LR schedule needs 1 <= warmup_steps ({warmup_steps}) < total steps '
                     f'({total_steps}): lower distill.optim.*.warmup_steps or raise '
                     'distill.num_iterations')
  return common.warmup_linear_decay(peak, warmup_steps, total_steps)


def schedules(cfg: ml_collections.ConfigDict):
  """(student_schedule, disc_schedule) as functions of each optimiser's own update count.

  The student's count starts after `disc_warmup_steps` iterations, so its schedule spans the
  remaining `num_iterations − disc_warmup_steps` iterations (docs/method.md §7.2).
  """
  d = cfg.distill
  total_student = d.num_iterations - d.disc_warmup_steps
  return (lr_schedule(d.optim.student.lr, d.optim.student.warmup_steps, total_student),
          lr_schedule(d.optim.disc.lr, d.optim.disc.warmup_steps, d.num_iterations))


def make_optimizers(cfg: ml_collections.ConfigDict):
  """(tx_student, tx_disc): nan_to_num -> clip_by_global_norm -> AdamW with the §7.3 schedule.

  tx_disc is applied to `DistillState.disc_train` only (the trainable subset), so frozen
  discriminator weights have no optimiser state at all.
  """
  sched_student, sched_disc = schedules(cfg)
  def adamw(ocfg, schedule):
    return common.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                        weight_decay=ocfg.weight_decay, clip_norm=ocfg.clip_norm)
  return (adamw(cfg.distill.optim.student, sched_student),
          adamw(cfg.distill.optim.disc, sched_disc))


# ----------------------------------------------------------------------------- init


def _copy(tree):
  """Fresh buffers (the state is donated to the step; it must never alias the teacher)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def abstract_distill_state(cfg: ml_collections.ConfigDict) -> DistillState:
  """Shapes and dtypes of the distillation state, nothing allocated."""
  _, abstract_params, _ = models.split_abstract(distill_model_config(cfg))
  return jax.eval_shape(lambda p: init_distill_state(cfg, p, jax.random.PRNGKey(0)),
                        abstract_params)


def init_distill_state(cfg: ml_collections.ConfigDict, teacher_params: nnx.State,
                       key: Array) -> DistillState:
  """docs/method.md D2: student, EMA and discriminator trunk copied from the teacher; fresh head from `key`.

  Args:
    cfg: full config (uses `model`, `distill`).
    teacher_params: the teacher's `nnx.state(teacher, nnx.Param)` (DiT with cfg.model sizes).
    key: PRNG key for the discriminator head (weights, biases, u, v; docs/method.md §5.3).
  """
  model_cfg = distill_model_config(cfg)
  student_gd = make_graphdefs(cfg)[0]
  teacher = nnx.merge(student_gd, teacher_params)
  disc = models.build(model_cfg, 'discriminator', rngs=nnx.Rngs(params=key))
  for name in teacher.trunk_modules:
    nnx.update(getattr(disc, name), _copy(nnx.state(getattr(teacher, name), nnx.Param)))
  _, disc_train, disc_frozen, spectral = split_discriminator(cfg, disc)
  student = _copy(teacher_params)
  tx_student, tx_disc = make_optimizers(cfg)
  buffer = None
  if cfg.distill.real_source == 'teacher_samples':
    # All-[MASK] until the loop fills it with `refresh_teacher_buffer` (see its docstring).
    buffer = jnp.full((cfg.distill.teacher_buffer.size, cfg.model.length),
                      cfg.model.vocab_size - 1, jnp.int32)
  return DistillState(
      step=jnp.zeros((), jnp.int32),
      student=student,
      ema=_copy(teacher_params),
      disc_train=disc_train,
      disc_frozen=disc_frozen,
      spectral=spectral,
      opt_student=tx_student.init(student),
      opt_disc=tx_disc.init(disc_train),
      teacher_buffer=buffer)


# ----------------------------------------------------------------------------- teacher buffer


def teacher_buffer_due(cfg: ml_collections.ConfigDict, step: int) -> Tuple[bool, int]:
  """(refresh now?, how many rows) for the loop before iteration `step` (D1).

  Step 0 fills the whole buffer; afterwards every `refresh_every` iterations `refresh_count` rows
  are replaced. Always (False, 0) when `real_source='data'`.
  """
  d = cfg.distill
  if d.real_source != 'teacher_samples':
    return False, 0
  if step == 0:
    return True, d.teacher_buffer.size
  if step % d.teacher_buffer.refresh_every == 0:
    return True, d.teacher_buffer.refresh_count
  return False, 0


def refresh_teacher_buffer(state: DistillState, samples_KxL: Array, key: Array) -> DistillState:
  """Writes K fresh teacher samples into K buffer slots drawn uniformly without replacement.

  Hook for the training loop (docs/method.md D1): draw `samples_KxL` with the teacher's ancestral sampler
  (§8.2, default regime, `distill.teacher_buffer.steps` steps), then call this (jittable; donate
  the state). With K = buffer size every slot is replaced (the initial fill before iteration 0).
  `teacher_buffer_due(cfg, step)` says when and how many.
  """
  if state.teacher_buffer is None:
    raise ValueError("this state has no teacher buffer: set --config.distill.real_source="
                     "teacher_samples before init_distill_state")
  size = state.teacher_buffer.shape[0]
  count = samples_KxL.shape[0]
  if count > size:
    raise ValueError(f'{count} teacher samples do not fit a buffer of {size}: pass at most '
                     'distill.teacher_buffer.size rows')
  slots_K = jax.random.permutation(key, size)[:count]
  buffer = state.teacher_buffer.at[slots_K].set(samples_KxL.astype(state.teacher_buffer.dtype))
  return state.replace(teacher_buffer=buffer)
