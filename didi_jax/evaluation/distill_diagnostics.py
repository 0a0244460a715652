"""Diagnostics of a distillation run (docs/method.md §10.1): why a run does or does not improve.

Computed on a separate diagnostic batch at the learning curve's cadence, never inside the training
step: one jitted function (`make_diagnose`) reuses the objective's pure pieces (`student_rollout`,
`reward_from_logits`, `group_advantages`, `omega`, `student_loss_from_terms`, `kl_per_position`)
on the current state with FIXED keys, so two points differ only by the networks. It returns

* the discriminator's balanced accuracy and AUC on held-out real rows (validation data) vs fresh
  student rollouts, per band of the corruption time t (`T_BANDS`), each row scored by its reward
  (the masked mean of the clipped log-odds, as the objective computes it);
* the spread of the rewards within groups and of the advantages;
* the norms of the policy-gradient part and of the KL/entropy part of the student's gradient and of
  their sum (the gradient the step would take, before clipping);
* the student's KL to its teacher, KL(S‖T) per masked position of the corrupted held-out rows,
  for the raw student and its EMA;
* the rollout's samples and rewards, which the curve judges: `reward_judge_spearman` is the rank
  correlation of the reward with −NLL (so +1: the discriminator ranks samples as the judge does).

The statistics below (`balanced_accuracy`, `auc`, `spearman`, `masked_kl`) are pure and tested
on constructed cases.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats
from flax import nnx

from didi_jax import diffusion
from didi_jax.distill import didi as distill
from didi_jax.sampling import categorical
from didi_jax.train import common
from didi_jax.train import distill_state as ds

Array = jax.Array
T_BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))   # corruption-time bands of t
DIAG_KEY_SALT = 0xD1A6          # the diagnostic batch's keys: fold_in(PRNGKey(seed), salt)
NETWORKS = ('student', 'student_ema')


# ------------------------------------------------------------------------------ statistics


def balanced_accuracy(score_real: Array, score_fake: Array) -> Array:
  """½·[P(score_real > 0) + P(score_fake < 0)]; a score of exactly 0 counts ½ on either side,
  so a constant discriminator scores 0.5 and a perfect one 1."""
  def right(s, sign):
    s = sign * jnp.asarray(s, jnp.float32)
    return jnp.mean((s > 0).astype(jnp.float32) + 0.5 * (s == 0).astype(jnp.float32))
  return 0.5 * (right(score_real, 1.0) + right(score_fake, -1.0))


def auc(score_real: Array, score_fake: Array) -> Array:
  """Area under the ROC curve of real vs fake: P(s_real > s_fake) + ½·P(s_real = s_fake) over
  all pairs (Mann–Whitney); 1 = perfect separation, 0.5 = none."""
  r = jnp.asarray(score_real, jnp.float32)[:, None]
  f = jnp.asarray(score_fake, jnp.float32)[None, :]
  return jnp.mean((r > f).astype(jnp.float32) + 0.5 * (r == f).astype(jnp.float32))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
  constant side."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
    return float('nan')
  return float(scipy.stats.spearmanr(x, y).statistic)


def reward_judge_spearman(reward_S: Sequence[float], nll_sum_S: Sequence[float],
                          count_S: Sequence[int]) -> float:
  """Rank correlation of each sample's reward with −(its judge NLL per counted token): +1 when
  the discriminator ranks samples exactly as the judge does, −1 when exactly reversed. Samples
  with no counted judge token are left out."""
  count = np.asarray(count_S, np.float64)
  keep = count > 0
  nll = np.asarray(nll_sum_S, np.float64)[keep] / count[keep]
  return spearman(np.asarray(reward_S, np.float64)[keep], -nll)


def masked_kl(logp_S_NxLxV: Array, logp_T_NxLxV: Array, mk_NxL: Array) -> Array:
  """KL(S‖T) per position (`distill.kl_per_position`), averaged over the masked positions of
  each row and then over rows that have one (`distill.maskmean`)."""
  return distill.maskmean(distill.kl_per_position(logp_S_NxLxV, logp_T_NxLxV), mk_NxL)


# ------------------------------------------------------------------------------ the batch


def diag_keys(seed: int) -> Dict[str, Array]:
  """The diagnostic batch's keys, the same at every point (fixed seed)."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), DIAG_KEY_SALT)
  names = ('tau', 'tc', 'roll1', 'roll2', 'mask_fake', 'bands')
  return dict(zip(names, jax.random.split(base, len(names))))


def gradient_parts(vjp_fn, diff: Dict[str, Array], wa_N: Array,
                   dcfg: ml_collections.ConfigDict):
  """The student's gradient split into its policy-gradient part (−mean(ω·A·log p_traj)) and its
  KL/entropy part (the regularisers of `distill.student_loss_from_terms`), each by one vjp of the
  rollout (`jax.vjp(rollout_fn, params_S, has_aux=True)` gives `diff`, `vjp_fn`), and the
  gradient of the whole loss by a third. Returns (g_pg, g_reg, g_total)."""
  zeros = jnp.zeros_like(wa_N)

  def reg(terms):          # the loss with no advantage: the KL and entropy terms alone
    return distill.student_loss_from_terms(terms, zeros, dcfg)

  def pg(terms):
    return distill.student_loss_from_terms(terms, wa_N, dcfg) - reg(terms)

  def total(terms):
    return distill.student_loss_from_terms(terms, wa_N, dcfg)
  (g_pg,) = vjp_fn(jax.grad(pg)(diff))
  (g_reg,) = vjp_fn(jax.grad(reg)(diff))
  (g_total,) = vjp_fn(jax.grad(total)(diff))
  return g_pg, g_reg, g_total


def make_diagnose(cfg: ml_collections.ConfigDict, student_graphdef: nnx.GraphDef,
                  disc_graphdef: nnx.GraphDef, networks: Sequence[str] = NETWORKS):
  """diagnose(state, teacher_params, x_real_NxL, keys) -> (metrics, rollout) to be jitted.

  `x_real_NxL`: held-out real rows (N = distill.eval_diag_rows, whole groups of G). The rollout
  is the objective's (`distill.student_rollout` with the raw student, τ per the config), its
  rewards come from the current discriminator at the corruption time t_c as in the objective, and
  `rollout` = {'x_fake_NxL' (leftover [MASK]s filled greedily), 'reward_N'} for the judge's
  rank correlation.
  """
  d = cfg.distill
  net = distill.denoiser_net(student_graphdef)
  regime = categorical.Regime.from_config(cfg.sampler)
  mask_id = cfg.model.vocab_size - 1
  G, L = d.group_size, cfg.model.length
  std_floor = float(d.get('adv_std_floor', distill.ADV_STD_FLOOR))

  def logp(graphdef, params, z_NxL, sigma_N):
    return diffusion.subs_logprobs(nnx.merge(graphdef, params)(z_NxL, sigma_N), z_NxL, mask_id)

  def diagnose(state: ds.DistillState, teacher_params, x_real_NxL: Array,
               keys: Dict[str, Array]):
    N = x_real_NxL.shape[0]
    tau_N = distill.sample_tau(keys['tau'], N, d.tau, G)
    rkeys = {'roll1': keys['roll1'], 'roll2': keys['roll2'], 'drop1': None, 'drop2': None,
             'drop_draw1': None, 'drop_draw2': None}
    rdcfg = ml_collections.ConfigDict(d.to_dict())
    rdcfg.dropout = 0.0                     # evaluation: no dropout

    def rollout_fn(params_S):
      return distill.student_rollout(params_S, teacher_params, tau_N, rkeys, net=net,
                                     n_rows=N, length=L, mask_id=mask_id, dcfg=rdcfg,
                                     regime=regime, chunk_len=int(d.get('loss_chunk_len', 0)))
    disc = nnx.merge(disc_graphdef, state.disc_train, state.disc_frozen, state.spectral)

    def scores(z_NxL, t_N):
      d_NxL = disc(z_NxL, diffusion.sigma(t_N), update_spectral=False)
      return distill.reward_from_logits(d_NxL, z_NxL == mask_id, d.reward_clip)

    # The objective's rollout, rewards (t_c as the objective draws it), advantages and ω.
    diff, vjp_fn, aux = jax.vjp(rollout_fn, state.student, has_aux=True)
    x_fake = aux['x_fake_NxL']
    t_c_N = tau_N if d.coupled_time else distill.sample_tau(keys['tc'], N, d.tau, G)
    z_fake = diffusion.forward_mask(keys['mask_fake'], x_fake, t_c_N, mask_id)
    r_N = scores(z_fake, t_c_N)
    adv_N = distill.group_advantages(r_N, G, d.adv_clip, d.group_norm, std_floor)
    wa_N = jax.lax.stop_gradient(distill.omega(t_c_N, d) * adv_N)
    g_pg, g_reg, g_total = gradient_parts(vjp_fn, diff, wa_N, rdcfg)
    r_BxG = r_N.reshape(-1, G)
    out = {'diag/reward_mean': jnp.mean(r_N),
           'diag/reward_group_std': jnp.mean(jnp.std(r_BxG, axis=-1, ddof=1)),
           'diag/adv_std': jnp.std(adv_N),
           'diag/grad_norm_pg': common.global_norm(g_pg),
           'diag/grad_norm_reg': common.global_norm(g_reg),
           'diag/grad_norm_total': common.global_norm(g_total)}

    # Discriminator per band of t, and the KL to the teacher on the corrupted held-out rows.
    kl_sum = {n: jnp.zeros((), jnp.float32) for n in networks}
    sig_T = d.teacher_sigma != 'zero'
    for b, (lo, hi) in enumerate(T_BANDS):
      kb_t, kb_real, kb_fake = jax.random.split(jax.random.fold_in(keys['bands'], b), 3)
      t_N = jnp.clip(jax.random.uniform(kb_t, (N,), jnp.float32, lo, hi), d.tau.min, d.tau.max)
      z_real = diffusion.forward_mask(kb_real, x_real_NxL, t_N, mask_id)
      z_fk = diffusion.forward_mask(kb_fake, x_fake, t_N, mask_id)
      s_real, s_fake = scores(z_real, t_N), scores(z_fk, t_N)
      out[f'diag/band{b}/d_acc'] = balanced_accuracy(s_real, s_fake)
      out[f'diag/band{b}/d_auc'] = auc(s_real, s_fake)
      zero_N = jnp.zeros((N,), jnp.float32)
      lp_T = logp(student_graphdef, teacher_params, z_real,
                  diffusion.sigma(t_N) if sig_T else zero_N)
      mk = z_real == mask_id
      for n in networks:
        params = state.student if n == 'student' else state.ema
        kl_sum[n] = kl_sum[n] + masked_kl(logp(student_graphdef, params, z_real, zero_N),
                                          lp_T, mk)
    for n in networks:
      out[f'diag/kl_teacher/{n}'] = kl_sum[n] / len(T_BANDS)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
    # The rollout ends at t0 > 0, so a few positions may still be [MASK]: the judge reads them
    # filled with the student's most likely token (greedy noise removal, §8.4).
    zero_N = jnp.zeros((N,), jnp.float32)
    greedy = jnp.argmax(logp(student_graphdef, state.student, x_fake, zero_N), axis=-1)
    x_judged = jnp.where(x_fake == mask_id, greedy.astype(x_fake.dtype), x_fake)
    return out, {'x_fake_NxL': x_judged, 'reward_N': r_N}
  return diagnose


def band_label(b: int) -> str:
  lo, hi = T_BANDS[b]
  return f't∈[{lo:g}, {hi:g})' if hi < 1 else f't∈[{lo:g}, 1]'


def jit_diagnose(cfg, student_graphdef, disc_graphdef, networks: Sequence[str] = NETWORKS,
                 out_shardings: Optional[Any] = None):
  """`make_diagnose` jitted (outputs replicated when `out_shardings` is given)."""
  fn = make_diagnose(cfg, student_graphdef, disc_graphdef, networks)
  if out_shardings is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=out_shardings)
