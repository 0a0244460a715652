"""SDTT, self-distillation through time (docs/method.md §14): the student learns to do in one step
what the teacher does in two, round after round.

Pure pieces first (the round schedule, the two-step teacher target, the divergences), then the
state, the optimiser, the round hand-off and one jitted iteration (`make_sdtt_step`). The loop
around it is `didi_jax.train.sdtt_loop`.

One iteration (docs/method.md §14.2): x0 from data; t antithetic in [t_min, 1]; z_t = q(z_t | x0).
Without gradient the teacher takes two ancestral steps of size Δ from z_t (τ_i = max(t − iΔ,
t_min) → max(τ_i − Δ, 0)); a position revealed in step i gets step i's SUBS distribution as its
target, a position never revealed the second step's. The student sees z_t once (σ input zero) and
matches the target on the masked positions of z_t under the configured divergence.
"""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import struct

from didi_jax import diffusion, models
from didi_jax.distill import common as dcommon
from didi_jax.sampling import categorical
from didi_jax.sampling import cost as cost_lib
from didi_jax.train import common
from didi_jax.train import distill_state as ds

Array = jax.Array
PyTree = Any

DIVERGENCES = ('reverse_kl', 'forward_kl', 'mse', 'tvd')


# ============================================================================ schedule


def total_iterations(scfg: ml_collections.ConfigDict) -> int:
  """Iterations of the whole run: rounds × round_iterations (scfg = cfg.distill.sdtt)."""
  return int(scfg.rounds) * int(scfg.round_iterations)


def round_of(step, scfg: ml_collections.ConfigDict):
  """The 0-based round of iteration `step` (an int or a traced int32)."""
  return step // int(scfg.round_iterations)


def teacher_steps(round_index: int, scfg: ml_collections.ConfigDict) -> int:
  """The teacher's step count N_r = teacher_steps / 2^r of round r; the student learns N_r / 2."""
  return int(scfg.teacher_steps) // (2 ** int(round_index))


def step_size(step, scfg: ml_collections.ConfigDict):
  """Δ_r = 2^r / teacher_steps at iteration `step` (float32; traced under jit)."""
  r = round_of(jnp.asarray(step, jnp.int32), scfg)
  return jnp.exp2(r.astype(jnp.float32)) / float(scfg.teacher_steps)


def is_round_start(step: int, scfg: ml_collections.ConfigDict) -> bool:
  """Whether iteration `step` (> 0) opens a new round: the hand-off runs before it."""
  return step > 0 and step % int(scfg.round_iterations) == 0


def teacher_times(t_B: Array, delta, t_min: float):
  """((τ_0, s_0), (τ_1, s_1)): τ_i = max(t − iΔ, t_min), s_i = max(τ_i − Δ, 0)."""
  out = []
  for i in (0, 1):
    tau = jnp.maximum(t_B - i * delta, t_min)
    out.append((tau, jnp.maximum(tau - delta, 0.0)))
  return tuple(out)


def flops_per_iteration(model_cfg, batch: int) -> float:
  """Model FLOPs of one iteration: two teacher forwards and the student's forward and backward
  (≈ 2 forwards) on `batch` rows, i.e. 5 forwards a row (the count of `didi_jax.bench`)."""
  return 5.0 * batch * cost_lib.student_forward_flops(model_cfg)


# ============================================================================ target and loss


def teacher_target(apply_T, z_t_BxL: Array, t_B: Array, delta, keys, *, mask_id: int,
                   regime: categorical.Regime, t_min: float) -> Dict[str, Array]:
  """The two-step teacher target (no gradient).

  apply_T(ids_BxL) -> logits_BxLxV is the teacher. keys: two draw keys. Returns 'logp_BxLxV'
  (a position revealed in step 0 takes step 0's SUBS log-probs, every other position step 1's),
  'z1_BxL', 'z2_BxL' (the states after each step) and 'logp0'/'logp1' (both steps' log-probs).
  """
  z, logps, states = z_t_BxL, [], []
  for i, (tau, s) in enumerate(teacher_times(t_B, delta, t_min)):
    logp = diffusion.subs_logprobs(apply_T(z), z, mask_id)
    p = categorical.probs_from_logprobs(logp, regime)
    z = categorical.ancestral_step(keys[i], z, p, diffusion.alpha(tau), diffusion.alpha(s),
                                   mask_id, regime)
    logps.append(logp)
    states.append(z)
  first = (z_t_BxL == mask_id) & (states[0] != mask_id)
  target = jnp.where(first[..., None], logps[0], logps[1])
  return jax.lax.stop_gradient({'logp_BxLxV': target, 'z1_BxL': states[0], 'z2_BxL': states[1],
                                'logp0': logps[0], 'logp1': logps[1]})


def divergence(logp_S: Array, logp_T: Array, kind: str) -> Array:
  """Per-position divergence of student S from target T over the last axis.

  'reverse_kl': KL(S‖T); 'forward_kl': KL(T‖S); 'mse': mean over the vocabulary of
  (log p_S − log p_T)² (entries where either is probability 0 count 0); 'tvd': ½·Σ|p_S − p_T|.
  """
  if kind == 'reverse_kl':
    return dcommon.kl_per_position(logp_S, logp_T)
  if kind == 'forward_kl':
    return dcommon.kl_per_position(logp_T, logp_S)
  if kind == 'mse':
    ok = dcommon.is_prob(logp_S) & dcommon.is_prob(logp_T)
    return jnp.mean(jnp.where(ok, jnp.square(logp_S - logp_T), 0.0), axis=-1)
  if kind == 'tvd':
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp_S) - jnp.exp(logp_T)), axis=-1)
  raise ValueError(f'distill.sdtt.divergence={kind!r} is not valid: use one of {DIVERGENCES}')


def masked_mean(x_BxL: Array, mk_BxL: Array) -> Array:
  """Σ mk·x / max(1, Σ mk): the token mean over the masked positions of the batch."""
  mk = mk_BxL.astype(jnp.float32)
  return jnp.sum(mk * x_BxL) / jnp.maximum(1.0, jnp.sum(mk))


# ============================================================================ state


@struct.dataclass
class SdttState:
  """Everything an SDTT iteration reads and writes (the exact-resume unit). The current round's
  teacher is part of it: from round 1 on it is the student of the round before."""
  step: Array                    # int32 scalar: 0-based iteration k over all rounds
  student: nnx.State             # θ (nnx.Param)
  ema: nnx.State                 # student EMA, carried across rounds (what the samplers use)
  teacher: nnx.State             # this round's teacher (frozen within the round)
  opt_student: PyTree            # optax state over `student` (fresh at every round)


def make_optimizer(cfg: ml_collections.ConfigDict):
  """nan_to_num -> clip -> AdamW with linear warm-up then a constant rate (per round)."""
  s = cfg.distill.sdtt
  return common.adamw(common.warmup_constant(s.lr, int(s.warmup_steps)), b1=s.b1, b2=s.b2,
                      eps=s.eps, weight_decay=s.weight_decay, clip_norm=s.clip_norm)


def graphdef(cfg: ml_collections.ConfigDict) -> nnx.GraphDef:
  """The student's (= every teacher's) graphdef, nothing allocated."""
  return nnx.graphdef(models.abstract(ds.distill_model_config(cfg), 'denoiser'))


def init_state(cfg: ml_collections.ConfigDict, teacher_params: nnx.State) -> SdttState:
  """Round 0: student, EMA and teacher are copies of the given teacher; a fresh optimiser."""
  student = dcommon.copy_tree(teacher_params)
  return SdttState(step=jnp.zeros((), jnp.int32), student=student,
                   ema=dcommon.copy_tree(teacher_params),
                   teacher=dcommon.copy_tree(teacher_params),
                   opt_student=make_optimizer(cfg).init(student))


def abstract_state(cfg: ml_collections.ConfigDict) -> SdttState:
  """Shapes and dtypes of the SDTT state, nothing allocated."""
  _, abstract_params, _ = models.split_abstract(ds.distill_model_config(cfg))
  return jax.eval_shape(lambda p: init_state(cfg, p), abstract_params)


def hand_off(cfg: ml_collections.ConfigDict, state: SdttState) -> SdttState:
  """Between rounds: the teacher becomes the student's RAW weights (bit for bit), the optimiser
  starts afresh (warm-up again); the EMA and the iteration count carry on."""
  return state.replace(teacher=dcommon.copy_tree(state.student),
                       opt_student=make_optimizer(cfg).init(state.student))


# ============================================================================ the iteration


def make_sdtt_step(cfg: ml_collections.ConfigDict, student_graphdef: nnx.GraphDef, *,
                   with_aux: bool = False):
  """Builds step(state, x_data_BxL, key) -> (state, metrics) (docs/method.md §14.2).

  Pure; the caller wraps it in `jax.jit(step, donate_argnums=0)`. Randomness: `fold_in(key,
  state.step)` split by purpose, so the same (state, batch, key) gives the same result (exact
  resume). `with_aux=True` also returns t, z_t, both teacher states and the target.
  """
  s = cfg.distill.sdtt
  regime = categorical.Regime.from_config(cfg.sampler)
  mask_id = cfg.model.vocab_size - 1
  t_min = float(s.t_min)
  tx = make_optimizer(cfg)
  sched = common.warmup_constant(s.lr, int(s.warmup_steps))

  def apply(params, ids):
    zeros = jnp.zeros((ids.shape[0],), jnp.float32)     # σ input zeroed (docs/method.md §14.2)
    return nnx.merge(student_graphdef, params)(ids, zeros)

  def step(state: SdttState, x_data_BxL: Array, key: Array):
    k = state.step
    key_t, key_mask, key_d0, key_d1 = jax.random.split(jax.random.fold_in(key, k), 4)
    x = x_data_BxL.astype(jnp.int32)
    t_B = diffusion.antithetic_times(key_t, x.shape[0], t_min)
    z_t = diffusion.forward_mask(key_mask, x, t_B, mask_id)
    delta = step_size(k, s)
    target = teacher_target(lambda ids: apply(state.teacher, ids), z_t, t_B, delta,
                            (key_d0, key_d1), mask_id=mask_id, regime=regime, t_min=t_min)
    mk = z_t == mask_id

    def loss_fn(params):
      logp_S = diffusion.subs_logprobs(apply(params, z_t), z_t, mask_id)
      return masked_mean(divergence(logp_S, target['logp_BxLxV'], s.divergence), mk)
    loss, g = jax.value_and_grad(loss_fn)(state.student)
    upd, opt = tx.update(g, state.opt_student, state.student)
    student = optax.apply_updates(state.student, upd)
    ema = common.ema_update(state.ema, student, s.ema_decay)
    new_state = state.replace(step=k + 1, student=student, ema=ema, opt_student=opt)
    metrics = {'loss': loss, 'round': round_of(k, s), 'delta': delta,
               'grad_norm': common.global_norm(g), 'nonfinite_grads': common.count_nonfinite(g),
               'lr': sched(k - round_of(k, s) * int(s.round_iterations)),
               'masked_frac': jnp.mean(mk.astype(jnp.float32)),
               'revealed_frac': jnp.mean((mk & (target['z2_BxL'] != mask_id))
                                         .astype(jnp.float32))}
    metrics = {n: jnp.asarray(v, jnp.float32) for n, v in metrics.items()}
    if not with_aux:
      return new_state, metrics
    return new_state, metrics, {'t_B': t_B, 'z_t_BxL': z_t, 'delta': delta, 'grad': g, **target}
  return step
