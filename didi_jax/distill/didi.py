"""The DiDi-Instruct objective (docs/method.md §6-§7): rollout, coupled corruption, D loss, rewards,
advantages, KL/entropy regularisers, and one jitted training iteration.

Small pure pieces first (each tested against NumPy), then the two-step student rollout with fused
per-chunk vocabulary work, then `make_distill_step`.

Memory (docs/method.md §7.4): the networks return features (B, L, D); the vocabulary projection, SUBS
log-softmax, the draw, the gathers, the entropy and the Jeffrey terms run per chunk of positions
(`distill.loss_chunk_len`) inside one rematerialised `lax.map`, so at most one chunk's (N, Lc, V)
float32 tensors exist at a time, in the forward and in the backward. The student trunks are
wrapped in `jax.checkpoint`. Both savings are for accelerator memory: `distill.memory_saving`
('auto': off on a CPU backend, where they only cost time) turns them off (one chunk, nothing
rematerialised). The student's step-1 forward and the teacher's x_T forward run on ONE all-[MASK]
row and are broadcast (docs/method.md §7.4).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from didi_jax import diffusion
from didi_jax.distill.common import PROB_ZERO, kl_per_position  # noqa: F401 (public here too)
from didi_jax.distill.common import is_prob as _is_prob
from didi_jax.models import gpt2
from didi_jax.models.discriminator import Spectral
from didi_jax.sampling import categorical
from didi_jax.train import common
from didi_jax.train import distill_state as ds

Array = jax.Array
PyTree = Any

REWARD_EPS = 1e-6                  # log-odds offset: log(σ(d)+ε) − log(1−σ(d)+ε) (docs/method.md §7.2)
ADV_STD_FLOOR = 1e-4               # default distill.adv_std_floor: spread floor / mean |r|
ADV_FLOOR_ABS = 1e-4               # absolute spread floor: ~100x a reward's float32 rounding (§7.2)
OMEGA_CONSTANT = 1.0               # ω(t) in `omega.mode='constant'`


# ============================================================================ pure pieces


def sample_tau(key: Array, n: int, tau_cfg: ml_collections.ConfigDict,
               group: int = 1) -> Array:
  """τ_n ~ Beta(a, b), clamped to [min, max] (docs/method.md D6). float32 (n,).

  `tau_cfg.per == 'group'` draws one τ per run of `group` consecutive rows (a group shares its
  noise level, so grouped normalisation compares samples under the same corruption time);
  'row' (docs/method.md §7.1) draws one per row.
  """
  per_group = tau_cfg.get('per', 'row') == 'group' and group > 1
  m = n // group if per_group else n
  t = jnp.clip(jax.random.beta(key, tau_cfg.a, tau_cfg.b, (m,), jnp.float32),
               tau_cfg.min, tau_cfg.max)
  return jnp.repeat(t, group) if per_group else t


def judge_rewarded(dcfg: ml_collections.ConfigDict) -> bool:
  """Whether the rewards come from a judge (`distill.reward_source='judge'`, docs/method.md §10.2)."""
  return dcfg.get('reward_source', 'discriminator') == 'judge'


def kl_enabled(dcfg: ml_collections.ConfigDict) -> bool:
  """Whether the Jeffrey/KL regulariser has a non-zero weight (else the teacher is not called)."""
  return dcfg.kl.scale * max(abs(dcfg.kl.coef_hi), abs(dcfg.kl.coef_lo)) != 0


def tau_density(t: Array, tau_cfg: ml_collections.ConfigDict) -> Array:
  """The Beta(a, b) density π(t) (the unclamped law; used by `importance_weight`)."""
  return jax.scipy.stats.beta.pdf(t, tau_cfg.a, tau_cfg.b)


def omega(t: Array, dcfg: ml_collections.ConfigDict) -> Array:
  """IKL time weight at the corruption time (docs/method.md D6, §7.2); dcfg = cfg.distill.

  'inv_t': clip(1/t, omega.min, omega.max); 'constant': 1. With `importance_weight` the weight is
  divided by the τ density π(t).
  """
  if dcfg.omega.mode == 'inv_t':
    w = jnp.clip(diffusion.loss_weight(t), dcfg.omega.min, dcfg.omega.max)
  elif dcfg.omega.mode == 'constant':
    w = jnp.full_like(t, OMEGA_CONSTANT)
  else:
    raise ValueError(f"distill.omega.mode={dcfg.omega.mode!r} is not valid: use 'inv_t' or "
                     "'constant'")
  if dcfg.importance_weight:
    w = w / tau_density(t, dcfg.tau)
  return w


def bce_smoothed(d: Array, y: Array | float) -> Array:
  """Binary cross-entropy on logits with target y: softplus(d) − y·d (elementwise)."""
  return jax.nn.softplus(d) - y * d


def disc_loss(d_real_NxL: Array, d_fake_NxL: Array, mk_real_NxL: Array, mk_fake_NxL: Array,
              smoothing: float) -> Array:
  """½·[token mean of BCE(d_real, 1−s) over masked real + same for BCE(d_fake, s)] (docs/method.md §7.1)."""
  def side(d, mk, y):
    mk = mk.astype(jnp.float32)
    return jnp.sum(mk * bce_smoothed(d, y)) / jnp.maximum(1.0, jnp.sum(mk))
  return 0.5 * (side(d_real_NxL, mk_real_NxL, 1.0 - smoothing)
                + side(d_fake_NxL, mk_fake_NxL, smoothing))


def log_odds(d: Array, clip: float) -> Array:
  """clip(log(σ(d)+1e-6) − log(1−σ(d)+1e-6), ±clip), float32."""
  s = jax.nn.sigmoid(d.astype(jnp.float32))
  return jnp.clip(jnp.log(s + REWARD_EPS) - jnp.log(1.0 - s + REWARD_EPS), -clip, clip)


def reward_from_logits(d_NxL: Array, mk_NxL: Array, clip: float) -> Array:
  """Per-row reward r_N: masked mean of the clipped log-odds; 0 for a row without masks."""
  mk = mk_NxL.astype(jnp.float32)
  return jnp.sum(mk * log_odds(d_NxL, clip), axis=-1) / jnp.maximum(1.0, jnp.sum(mk, axis=-1))


def judge_reward(logits_fn: Callable[[Array], Array], x_NxL: Array, mask_id: int,
                 eos_id: int) -> Array:
  """The oracle reward of `distill.reward_source='judge'` (docs/method.md §10.2): per row,
  −(mean NLL per byte) of the sample under a causal byte LM, float32 (N,).

  `logits_fn(ids_NxL) -> (N, L, V_judge)` is the judge. [MASK] positions (a few can remain at
  t0) are read as EOS and their bytes are not scored; a row with nothing to score gets 0.
  """
  ids = jnp.where(x_NxL == mask_id, eos_id, x_NxL).astype(jnp.int32)
  nll = gpt2.next_token_nll(logits_fn(ids), ids)
  scored = (x_NxL[:, 1:] != mask_id).astype(jnp.float32)
  return -jnp.sum(scored * nll, axis=-1) / jnp.maximum(1.0, jnp.sum(scored, axis=-1))


def group_spread(r_N: Array, group_size: int, std_floor: float) -> Tuple[Array, Array, Array]:
  """Per-group mean, the floored spread max(std_G(ddof=1), δ_g) and whether the floor bound.

  δ_g = max(ADV_FLOOR_ABS, std_floor · mean_G|r|): a group whose rewards agree to float32
  rounding gets near-zero advantages instead of ±(rounding noise / 1e-8) (docs/method.md §7.2).
  Shapes (B, 1), (B, 1), (B, 1) for B = N / G groups.
  """
  r_BxG = r_N.reshape(-1, group_size).astype(jnp.float32)
  mean = jnp.mean(r_BxG, axis=-1, keepdims=True)
  std = jnp.std(r_BxG, axis=-1, keepdims=True, ddof=1)
  floor = jnp.maximum(ADV_FLOOR_ABS, std_floor * jnp.mean(jnp.abs(r_BxG), axis=-1, keepdims=True))
  return mean, jnp.maximum(std, floor), std < floor


def group_zscores(r_N: Array, group_size: int, std_floor: float) -> Array:
  """z_N = (r − mean_G) / max(std_G(ddof=1), δ_g), before clipping; |z| ≤ (G−1)/√G."""
  mean, spread, _ = group_spread(r_N, group_size, std_floor)
  r_BxG = r_N.reshape(-1, group_size).astype(jnp.float32)
  return ((r_BxG - mean) / spread).reshape(r_N.shape)


def max_group_zscore(group_size: int) -> float:
  """The largest |z| an unbiased-std z-score can reach in a group of G: (G−1)/√G (1.5 at G=4).

  (Equality when one reward differs and the other G−1 agree.) So `adv_clip` binds only when
  (G−1)/√G > adv_clip, i.e. G ≥ 11 for the default clip of 3.
  """
  return (group_size - 1) / math.sqrt(group_size)


def group_advantages(r_N: Array, group_size: int, clip: float, enabled: bool = True,
                     std_floor: float = ADV_STD_FLOOR) -> Array:
  """A_N = clip((r − mean_G) / max(std_G(ddof=1), δ_g), ±clip); raw r_N when not `enabled`.

  Groups are consecutive rows g·G … g·G+G−1 (docs/method.md §7.1); δ_g: `group_spread`.
  """
  if not enabled:
    return r_N
  return jnp.clip(group_zscores(r_N, group_size, std_floor), -clip, clip)


def advantage_metrics(r_N: Array, group_size: int, clip: float, enabled: bool = True,
                      std_floor: float = ADV_STD_FLOOR) -> Dict[str, Array]:
  """Diagnostics of grouped normalisation (empty when it is off).

  'adv_zmax': the largest |z| before clipping (≤ (G−1)/√G); 'adv_floor_frac': the fraction of
  groups whose spread hit the floor δ_g (near-tied rewards); 'adv_clip_frac': the fraction of rows
  whose |z| exceeds `clip`, reported only when the clip can bind ((G−1)/√G > clip).
  """
  if not enabled:
    return {}
  z = group_zscores(r_N, group_size, std_floor)
  out = {'adv_zmax': jnp.max(jnp.abs(z)),
         'adv_floor_frac': jnp.mean(group_spread(r_N, group_size, std_floor)[2]
                                    .astype(jnp.float32))}
  if max_group_zscore(group_size) > clip:
    out['adv_clip_frac'] = jnp.mean((jnp.abs(z) > clip).astype(jnp.float32))
  return out


def jeffrey(logp_T: Array, logp_S: Array, beta: float, kind: str = 'jeffrey') -> Array:
  """Per-position divergence between teacher T and student S (docs/method.md §7.2), over the last axis.

  'jeffrey': (1−β)·KL(T‖S) + β·KL(S‖T); 'forward': KL(T‖S); 'reverse': KL(S‖T). Entries of −1e6
  are probability 0 (no NaN, finite gradients).
  """
  if kind == 'forward':
    return kl_per_position(logp_T, logp_S)
  if kind == 'reverse':
    return kl_per_position(logp_S, logp_T)
  if kind == 'jeffrey':
    return ((1.0 - beta) * kl_per_position(logp_T, logp_S)
            + beta * kl_per_position(logp_S, logp_T))
  raise ValueError(f"distill.kl.type={kind!r} is not valid: use 'jeffrey', 'forward' or "
                   "'reverse'")


def entropy(logp: Array) -> Array:
  """Ent(p) = −Σ_v p_v log p_v over the last axis; entries ≤ −5e5 count as p = 0."""
  ok = _is_prob(logp)
  lp = jnp.where(ok, logp, 0.0)
  return -jnp.sum(jnp.where(ok, jnp.exp(lp) * lp, 0.0), axis=-1)


def maskmean(x_NxL: Array, mk_NxL: Array) -> Array:
  """Per-row mean over the indicated positions, then the mean over rows that have any.

  Rows without an indicated position have no mean and are left out; 0 if no row has one.
  """
  mk = mk_NxL.astype(jnp.float32)
  count_N = jnp.sum(mk, axis=-1)
  row_N = jnp.sum(jnp.where(mk_NxL, x_NxL, 0.0), axis=-1) / jnp.maximum(1.0, count_N)
  has_N = (count_N > 0).astype(jnp.float32)
  return jnp.sum(row_N * has_N) / jnp.maximum(1.0, jnp.sum(has_N))


def masked_entropy(logp_NxLxV: Array, mk_NxL: Array) -> Array:
  """maskmean of the per-position entropy of exp(logp)."""
  return maskmean(entropy(logp_NxLxV), mk_NxL)


def trajectory_logprob(lp_at_NxL: Array, x_prev_NxL: Array, x_next_NxL: Array,
                       mask_id: int) -> Array:
  """Σ_L [x_prev == m and x_next != m]·log p(x_next): newly revealed positions only (docs/method.md §7.2).

  `lp_at_NxL` is the step's log-probability at the drawn token x_next.
  """
  newly = (x_prev_NxL == mask_id) & (x_next_NxL != mask_id)
  return jnp.sum(jnp.where(newly, lp_at_NxL, 0.0), axis=-1)


# ============================================================================ networks


@dataclasses.dataclass(frozen=True)
class Net:
  """A denoiser split for fused losses.

  features(params, ids_RxL, sigma_R, dropout_key) -> feats_RxLxD (the output projection's input);
  head(params) -> (apply, head_params) with apply(head_params, feats_RxCxD) -> logits_RxCxV.
  """
  features: Callable[..., Array]
  head: Callable[[PyTree], Tuple[Callable[[PyTree, Array], Array], PyTree]]


def denoiser_net(graphdef: nnx.GraphDef) -> Net:
  """`Net` view of a denoiser graphdef (teacher and student; models.interface.Denoiser)."""
  def features(params, ids, sigma, dropout_key=None):
    return nnx.merge(graphdef, params).features(ids, sigma, dropout_key=dropout_key)

  def head(params):
    linear_gd, linear_state = nnx.split(nnx.merge(graphdef, params).projection)
    return (lambda hp, f: nnx.merge(linear_gd, hp)(f)), linear_state
  return Net(features=features, head=head)


# ============================================================================ fused step terms


def memory_saving(dcfg: ml_collections.ConfigDict) -> bool:
  """Whether to rematerialise and chunk (`distill.memory_saving`; 'auto': not on a CPU backend)."""
  mode = dcfg.get('memory_saving', 'auto')
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"distill.memory_saving={mode!r} is not valid: use 'auto', 'on' or 'off'")
  return jax.default_backend() != 'cpu' if mode == 'auto' else mode == 'on'


def chunk_size(length: int, requested: int) -> int:
  """The largest divisor of `length` that is <= `requested` (`requested` <= 0: one chunk)."""
  if requested <= 0 or requested >= length:
    return length
  return max(c for c in range(1, requested + 1) if length % c == 0)


def fused_step_terms(key: Array, head_S, head_T, feats_S_RxLxD: Array,
                     feats_draw_RxLxD: Optional[Array], feats_T_RxLxD: Optional[Array],
                     x_RxL: Array, alpha_t, alpha_s_N: Array, *, n_rows: int, mask_id: int,
                     regime: categorical.Regime, kl_type: str, kl_beta: float,
                     chunk_len: int = 0, remat: bool = True):
  """One ancestral step's draw and differentiable terms, chunked over positions.

  R ∈ {1, N}: with R = 1 the single input row is broadcast to N rows for the draw.

  Args:
    key: draw key. head_S/head_T: (apply, params) from `Net.head` (head_T may be None).
    feats_S_RxLxD: student features carrying the gradient.
    feats_draw_RxLxD: features the draw uses ('two_pass'); None = `feats_S` (stop-gradient).
    feats_T_RxLxD: teacher features (no gradient) or None (then the KL is 0).
    x_RxL: step input; alpha_t: α at the input time (scalar or (N,)); alpha_s_N: α at the target.
    remat: recompute each chunk's vocabulary tensors in the backward pass instead of saving them.
  Returns:
    x_next_NxL (int32, no gradient), lp_at_NxL (log p at x_next), ent_RxL, kl_RxL.
  """
  apply_S, hp_S = head_S
  apply_T, hp_T = head_T if head_T is not None else (None, None)
  R, L = x_RxL.shape
  chunk_len = chunk_size(L, chunk_len)
  n_chunks = L // chunk_len
  alpha_t = jnp.asarray(alpha_t, jnp.float32)
  alpha_s_N = jnp.asarray(alpha_s_N, jnp.float32)

  def body(hp_S, hp_T, alpha_t, alpha_s_N, xs):
    f_S, f_draw, f_T, x_c, key_c = xs
    C = x_c.shape[1]
    logp_S = diffusion.subs_logprobs(apply_S(hp_S, f_S), x_c, mask_id)
    if f_draw is None:
      logp_draw = jax.lax.stop_gradient(logp_S)
    else:
      logp_draw = jax.lax.stop_gradient(
          diffusion.subs_logprobs(apply_S(hp_S, f_draw), x_c, mask_id))
    p = categorical.probs_from_logprobs(logp_draw, regime)
    p_N = jnp.broadcast_to(p, (n_rows,) + p.shape[1:])
    x_N = jnp.broadcast_to(x_c, (n_rows, C))
    x_next = categorical.ancestral_step(key_c, x_N, p_N, alpha_t, alpha_s_N, mask_id, regime)
    # Saved, not recomputed, in the backward pass: the draw is dead code there.
    x_next = checkpoint_name(jax.lax.stop_gradient(x_next), 'x_next')
    if R == 1:
      lp_at = logp_S[0][jnp.arange(C)[None, :], x_next]
    else:
      lp_at = jnp.take_along_axis(logp_S, x_next[..., None], axis=-1)[..., 0]
    ent = entropy(logp_S)
    if f_T is None:
      kl = jnp.zeros((R, C), jnp.float32)
    else:
      logp_T = jax.lax.stop_gradient(diffusion.subs_logprobs(apply_T(hp_T, f_T), x_c, mask_id))
      kl = jeffrey(logp_T, logp_S, kl_beta, kl_type)
    return x_next, lp_at, ent, kl

  if remat:
    # The backward recomputes one chunk's (N, Lc, V) tensors instead of saving all.
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names('x_next'))
  keys = jax.random.split(key, n_chunks)
  xs = (feats_S_RxLxD, feats_draw_RxLxD, feats_T_RxLxD, x_RxL)
  if n_chunks == 1:
    return body(hp_S, hp_T, alpha_t, alpha_s_N, xs + (keys[0],))

  def split(a):
    return jnp.moveaxis(a.reshape((a.shape[0], n_chunks, chunk_len) + a.shape[2:]), 1, 0)

  def merge(a):
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape((a.shape[0], L) + a.shape[3:])
  xs_c = jax.tree.map(split, xs) + (keys,)
  out = jax.lax.map(lambda c: body(hp_S, hp_T, alpha_t, alpha_s_N, c), xs_c)
  return jax.tree.map(merge, out)


# ============================================================================ rollout


def _no_key(key: Optional[Array], dropout: float) -> Optional[Array]:
  return key if dropout > 0 else None


def student_rollout(params_S: PyTree, params_T: PyTree, tau_N: Array, keys: Dict[str, Array], *,
                    net: Net, n_rows: int, length: int, mask_id: int,
                    dcfg: ml_collections.ConfigDict, regime: categorical.Regime,
                    chunk_len: int = 0, remat: bool = True):
  """The student's training-time generation 1 → τ → t0 (or 1 → t0) with its differentiable terms.

  One student forward per step serves the draw (stop-gradient probabilities) and the log-prob
  gradient (`rollout='shared'`, D9); `'two_pass'` draws from a separate no-gradient forward. Step 1
  (all-[MASK] input) runs student and teacher on one row (docs/method.md §7.4).

  Args:
    params_S: student params (differentiate the outputs w.r.t. these). params_T: teacher params.
    tau_N: intermediate times. keys: 'roll1', 'roll2', 'drop1', 'drop2', 'drop_draw1',
      'drop_draw2' (dropout keys are used only when dcfg.dropout > 0).
    remat: rematerialise the student trunks and the fused chunks (`memory_saving`).
  Returns:
    (diff, aux): diff = {'logp_N': trajectory log-prob (logp1 + logp2), 'kl_hi', 'kl_lo', 'ent'}
    (all float32, differentiable); aux = {'x_tau_NxL', 'x_fake_NxL'} int32.
  """
  # remat the student trunk (docs/method.md §7.4)
  features_S = jax.checkpoint(net.features) if remat else net.features
  kl_on = kl_enabled(dcfg)
  head_S = net.head(params_S)
  head_T = net.head(params_T) if kl_on else None
  drop = dcfg.dropout

  def one_step(x_RxL, t_in, alpha_s_N, key_draw, key_drop, key_drop_draw):
    R = x_RxL.shape[0]
    zeros_R = jnp.zeros((R,), jnp.float32)
    f_S = features_S(params_S, x_RxL, zeros_R, _no_key(key_drop, drop))
    f_draw = None
    if dcfg.rollout == 'two_pass':
      f_draw = jax.lax.stop_gradient(net.features(
          jax.lax.stop_gradient(params_S), x_RxL, zeros_R, _no_key(key_drop_draw, drop)))
    f_T = None
    if kl_on:
      sig_T = zeros_R if dcfg.teacher_sigma == 'zero' else diffusion.sigma(
          jnp.broadcast_to(t_in, (R,)))
      f_T = jax.lax.stop_gradient(net.features(params_T, x_RxL, sig_T, None))
    return fused_step_terms(
        key_draw, head_S, head_T, f_S, f_draw, f_T, x_RxL, diffusion.alpha(t_in), alpha_s_N,
        n_rows=n_rows, mask_id=mask_id, regime=regime, kl_type=dcfg.kl.type,
        kl_beta=dcfg.kl.beta, chunk_len=chunk_len, remat=remat)

  x_T_1xL = jnp.full((1, length), mask_id, jnp.int32)
  alpha_0_N = jnp.full((n_rows,), diffusion.alpha(dcfg.t0), jnp.float32)
  sd = dcfg.score_decomposition
  alpha_s1_N = diffusion.alpha(tau_N) if sd else alpha_0_N
  x_1, lp1_NxL, ent1_1xL, kl1_1xL = one_step(
      x_T_1xL, jnp.ones((), jnp.float32), alpha_s1_N, keys['roll1'], keys['drop1'],
      keys['drop_draw1'])
  x_T_NxL = jnp.broadcast_to(x_T_1xL, (n_rows, length))
  logp_N = trajectory_logprob(lp1_NxL, x_T_NxL, x_1, mask_id)
  all_1xL = x_T_1xL == mask_id
  kl_hi = maskmean(kl1_1xL, all_1xL)
  ent_hi = maskmean(ent1_1xL, all_1xL)
  if sd:
    x_tau = x_1
    x_fake, lp2_NxL, ent2_NxL, kl2_NxL = one_step(
        x_tau, tau_N, alpha_0_N, keys['roll2'], keys['drop2'], keys['drop_draw2'])
    logp_N = logp_N + trajectory_logprob(lp2_NxL, x_tau, x_fake, mask_id)
    mk_tau = x_tau == mask_id
    kl_lo = maskmean(kl2_NxL, mk_tau)
    ent = 0.5 * (ent_hi + maskmean(ent2_NxL, mk_tau))
  else:
    x_tau = x_T_NxL
    x_fake = x_1
    kl_lo = jnp.zeros((), jnp.float32)
    ent = ent_hi
  diff = {'logp_N': logp_N, 'kl_hi': kl_hi, 'kl_lo': kl_lo, 'ent': ent}
  return diff, {'x_tau_NxL': x_tau, 'x_fake_NxL': x_fake}


# ============================================================================ the iteration


def student_loss_from_terms(terms: Dict[str, Array], wa_N: Array,
                            dcfg: ml_collections.ConfigDict) -> Array:
  """L_S = −mean(w·A·logp_traj) + coef_hi·scale·KL_hi + coef_lo·scale·KL_lo − entropy_coef·H.

  `terms` are `student_rollout`'s differentiable outputs; `wa_N` = ω·A (treated as constant).
  """
  pg = -jnp.mean(jax.lax.stop_gradient(wa_N) * terms['logp_N'])
  return (pg + dcfg.kl.coef_hi * dcfg.kl.scale * terms['kl_hi']
          + dcfg.kl.coef_lo * dcfg.kl.scale * terms['kl_lo'] - dcfg.entropy_coef * terms['ent'])


def shares_disc_prefix(dcfg: ml_collections.ConfigDict) -> bool:
  """Whether an iteration runs the discriminator's frozen blocks once for its update and the
  reward pass (docs/method.md §7.4): without dropout they give both the same values; with
  `distill.dropout` > 0 the update's forward draws dropout and the reward pass does not."""
  return float(dcfg.dropout) == 0.0


def _clean_norm(tree) -> Array:
  return common.global_norm(common.nan_to_num_grads().update(tree, optax.EmptyState())[0])


def _masked_frac(pred_NxL, mk_NxL) -> Array:
  mk = mk_NxL.astype(jnp.float32)
  return jnp.sum(mk * pred_NxL.astype(jnp.float32)) / jnp.maximum(1.0, jnp.sum(mk))


def make_distill_step(cfg: ml_collections.ConfigDict, student_graphdef: nnx.GraphDef,
                      disc_graphdef: nnx.GraphDef, *, with_aux: bool = False,
                      judge: Optional[Tuple[Callable[[Array], Array], int]] = None):
  """Builds step(state, teacher_params, x_data_BxL, key) -> (state, metrics) (docs/method.md §7.1).

  A pure function of its arguments, to be wrapped by the caller in
  `jax.jit(step, donate_argnums=0)`. Randomness: `fold_in(key, state.step)` split by purpose, so
  the same (state, batch, key) gives a bit-identical result (exact resume). `x_data_BxL` (rows of
  group g = rows g·G … g·G+G−1 after repeat-interleave; shard it over the batch axes as is) may be
  None when `real_source='teacher_samples'`. Graphdefs: `distill_state.make_graphdefs(cfg)`.

  `with_aux=True` makes the step return (state, metrics, aux): every random draw and
  intermediate of the iteration (τ, t_c, the rollout's x_τ and x_fake, both corruptions, the
  discriminator logits before and after its update, rewards, advantages, ω, trajectory
  log-probs, both gradients), so an independent reference can recompute the iteration.

  `judge` = (logits_fn, eos_id), needed by (and only used with) `distill.reward_source='judge'`:
  the rewards are then `judge_reward` of the student's samples instead of the discriminator's
  log-odds (a diagnostic control; the discriminator still trains).
  """
  d = cfg.distill
  net = denoiser_net(student_graphdef)
  tx_student, tx_disc = ds.make_optimizers(cfg)
  sched_student, sched_disc = ds.schedules(cfg)
  regime = categorical.Regime.from_config(cfg.sampler)
  mask_id = cfg.model.vocab_size - 1
  G = d.group_size
  L = cfg.model.length
  n_warm = int(d.disc_warmup_steps)
  std_floor = float(d.get('adv_std_floor', ADV_STD_FLOOR))
  save_memory = memory_saving(d)
  chunk_len = int(d.get('loss_chunk_len', 0)) if save_memory else 0
  if d.group_norm and G < 2:
    raise ValueError('distill.group_size must be >= 2 for grouped normalisation (or set '
                     '--config.distill.group_norm=False)')
  oracle = judge_rewarded(d)
  n_frozen = cfg.model.n_blocks - d.disc_unfreeze_blocks
  share_prefix = shares_disc_prefix(d)
  if oracle and judge is None:
    raise ValueError("distill.reward_source='judge' needs the judge: make_distill_step(..., "
                     'judge=(logits_fn, eos_id))')
  if n_warm < 0 or n_warm >= d.num_iterations:
    raise ValueError(f'distill.disc_warmup_steps={n_warm} must lie in [0, num_iterations)')

  def step(state: ds.DistillState, teacher_params: PyTree, x_data_BxL: Optional[Array],
           key: Array):
    if x_data_BxL is not None:
      chex.assert_rank(x_data_BxL, 2)
      chex.assert_type(x_data_BxL, int)
      chex.assert_axis_dimension(x_data_BxL, 1, cfg.model.length)
    B = d.batch_size if x_data_BxL is None else x_data_BxL.shape[0]
    N = B * G
    k = state.step
    key_it = jax.random.fold_in(key, k)
    (key_tau, key_tc, key_roll1, key_roll2, key_mask_fake, key_mask_real, key_real,
     key_drop) = jax.random.split(key_it, 8)
    (key_drop1, key_drop2, key_drop_draw1, key_drop_draw2,
     key_drop_disc) = jax.random.split(key_drop, 5)

    # ---- real rows
    if d.real_source == 'data':
      if x_data_BxL is None:
        raise ValueError("real_source='data' needs x_data_BxL: pass a batch of data rows")
      x_real_NxL = jnp.repeat(x_data_BxL.astype(jnp.int32), G, axis=0)
    else:
      buf = state.teacher_buffer
      if buf is None or buf.shape[0] < N:
        raise ValueError(f"real_source='teacher_samples' needs a teacher buffer of >= {N} rows: "
                         'raise distill.teacher_buffer.size and re-init the state')
      x_real_NxL = buf[jax.random.permutation(key_real, buf.shape[0])[:N]]

    # ---- student rollout with the pre-update student (vjp kept for the update)
    tau_N = sample_tau(key_tau, N, d.tau, G)
    keys = {'roll1': key_roll1, 'roll2': key_roll2, 'drop1': key_drop1, 'drop2': key_drop2,
            'drop_draw1': key_drop_draw1, 'drop_draw2': key_drop_draw2}

    def rollout_fn(params_S):
      return student_rollout(params_S, teacher_params, tau_N, keys, net=net, n_rows=N,
                             length=L, mask_id=mask_id, dcfg=d, regime=regime,
                             chunk_len=chunk_len, remat=save_memory)
    diff, vjp_fn, aux = jax.vjp(rollout_fn, state.student, has_aux=True)
    x_fake_NxL = aux['x_fake_NxL']

    # ---- coupled corruption at t_c (= τ), independent masks per row and side
    t_c_N = tau_N if d.coupled_time else sample_tau(key_tc, N, d.tau, G)
    sig_c_N = diffusion.sigma(t_c_N)
    z_fake_NxL = diffusion.forward_mask(key_mask_fake, x_fake_NxL, t_c_N, mask_id)
    z_real_NxL = diffusion.forward_mask(key_mask_real, x_real_NxL, t_c_N, mask_id)
    mk_fake_NxL = z_fake_NxL == mask_id
    mk_real_NxL = z_real_NxL == mask_id

    # ---- discriminator update: one call on 2N rows, training-mode spectral norm
    z_2NxL = jnp.concatenate([z_real_NxL, z_fake_NxL])
    sig_2N = jnp.concatenate([sig_c_N, sig_c_N])
    disc_old = nnx.merge(disc_graphdef, state.disc_train, state.disc_frozen, state.spectral)
    # Any module with the discriminator's call signature may stand in; one without `prefix`
    # (models.discriminator.PrefixShared) runs whole.
    share = share_prefix and hasattr(disc_old, 'prefix')
    if share:
      # The frozen blocks' output, computed once for the update and the reward pass (§7.4).
      prefix_2N = jax.lax.stop_gradient(disc_old.prefix(z_2NxL, sig_2N, n_frozen))

    def d_loss_fn(disc_train, disc_frozen, spectral):
      # copy=True: fresh Variables at this trace level, so the u/v update may mutate them.
      disc = nnx.merge(disc_graphdef, disc_train, disc_frozen, spectral, copy=True)
      if share:
        d_2NxL = disc.from_prefix(prefix_2N, n_frozen, update_spectral=True)
      else:
        d_2NxL = disc(z_2NxL, sig_2N, update_spectral=True,
                      dropout_key=_no_key(key_drop_disc, d.dropout))
      d_real, d_fake = d_2NxL[:N], d_2NxL[N:]
      loss = disc_loss(d_real, d_fake, mk_real_NxL, mk_fake_NxL, d.label_smoothing)
      return loss, (nnx.state(disc, Spectral), d_real, d_fake)
    (loss_D, (spectral, d_real_NxL, d_fake_NxL)), g_D = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.disc_train, state.disc_frozen, state.spectral)
    upd_D, opt_disc = tx_disc.update(g_D, state.opt_disc, state.disc_train)
    disc_train = optax.apply_updates(state.disc_train, upd_D)

    # ---- rewards from the UPDATED discriminator (stored u/v, no gradient)
    disc_new = nnx.merge(disc_graphdef, disc_train, state.disc_frozen, spectral)
    if share:
      d_rew_NxL = disc_new.from_prefix(jax.tree.map(lambda a: a[N:], prefix_2N), n_frozen)
    else:
      d_rew_NxL = disc_new(z_fake_NxL, sig_c_N, update_spectral=False)
    d_rew_NxL = jax.lax.stop_gradient(d_rew_NxL)
    if oracle:
      r_N = jax.lax.stop_gradient(judge_reward(judge[0], x_fake_NxL, mask_id, judge[1]))
    else:
      r_N = reward_from_logits(d_rew_NxL, mk_fake_NxL, d.reward_clip)
    adv_N = group_advantages(r_N, G, d.adv_clip, d.group_norm, std_floor)
    w_N = omega(t_c_N, d)
    wa_N = jax.lax.stop_gradient(w_N * adv_N)

    # ---- student loss: its gradient is the rollout's vjp at ∂L_S/∂(rollout outputs)
    student_loss, cot = jax.value_and_grad(
        lambda terms: student_loss_from_terms(terms, wa_N, d))(diff)
    pg_loss = -jnp.mean(wa_N * diff['logp_N'])

    def student_update(_):
      (g_S,) = vjp_fn(cot)
      upd_S, opt_student = tx_student.update(g_S, state.opt_student, state.student)
      student = optax.apply_updates(state.student, upd_S)
      ema = jax.tree.map(lambda e, p: e + (1.0 - d.ema_decay) * (p - e), state.ema, student)
      return student, opt_student, ema, g_S, _clean_norm(g_S), common.count_nonfinite(g_S)

    def skip(_):
      return (state.student, state.opt_student, state.ema,
              jax.tree.map(jnp.zeros_like, state.student), jnp.zeros((), jnp.float32),
              jnp.zeros((), jnp.float32))
    if n_warm > 0:
      student, opt_student, ema, g_S, gnorm_S, nonfinite_S = jax.lax.cond(
          k >= n_warm, student_update, skip, None)
      lr_student = jnp.where(k >= n_warm, sched_student(jnp.maximum(k - n_warm, 0)), 0.0)
    else:
      student, opt_student, ema, g_S, gnorm_S, nonfinite_S = student_update(None)
      lr_student = sched_student(k)

    new_state = state.replace(
        step=k + 1, student=student, ema=ema, disc_train=disc_train, spectral=spectral,
        opt_student=opt_student, opt_disc=opt_disc)
    metrics = {
        'd_loss': loss_D,
        'd_acc_real': _masked_frac(d_real_NxL > 0, mk_real_NxL),
        'd_acc_fake': _masked_frac(d_fake_NxL < 0, mk_fake_NxL),
        'reward_mean': jnp.mean(r_N),
        'reward_std': jnp.std(r_N),
        'kl_hi': diff['kl_hi'],
        'kl_lo': diff['kl_lo'],
        'entropy': diff['ent'],
        'pg_loss': pg_loss,
        'student_loss': student_loss,
        'grad_norm_student': gnorm_S,
        'grad_norm_disc': _clean_norm(g_D),
        'lr_student': lr_student,
        'lr_disc': sched_disc(k),
        'nonfinite_grads_student': nonfinite_S,
        'nonfinite_grads_disc': common.count_nonfinite(g_D),
        'tau_mean': jnp.mean(tau_N),
        'masked_frac': jnp.mean(mk_fake_NxL.astype(jnp.float32)),
    }
    metrics.update(advantage_metrics(r_N, G, d.adv_clip, d.group_norm, std_floor))
    if not kl_enabled(d):
      del metrics['kl_hi'], metrics['kl_lo']   # regulariser off: the teacher is not called
    metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
    if not with_aux:
      return new_state, metrics
    aux = {'tau_N': tau_N, 't_c_N': t_c_N, 'x_real_NxL': x_real_NxL,
           'x_tau_NxL': aux['x_tau_NxL'], 'x_fake_NxL': x_fake_NxL,
           'z_real_NxL': z_real_NxL, 'z_fake_NxL': z_fake_NxL,
           'd_real_NxL': d_real_NxL, 'd_fake_NxL': d_fake_NxL, 'd_reward_NxL': d_rew_NxL,
           'reward_N': r_N, 'adv_N': adv_N, 'omega_N': w_N, 'logp_N': diff['logp_N'],
           'grad_student': g_S, 'grad_disc': g_D}
    return new_state, metrics, aux
  return step
