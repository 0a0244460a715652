"""An independent NumPy float64 reference of one DiDi-Instruct iteration (docs/method.md §7).

Written from the method description; it imports nothing from `didi_jax`. The networks are the
NumPy DiT / discriminator of `reference_dit_numpy` (official parameter names, PyTorch layout).
Gradients are central finite differences in float64, the optimiser is AdamW written out, so a
wrong sign, mask, time, network or ordering in the implementation shows up as a value mismatch.

Randomness is the only thing taken from JAX: the reference re-derives every key of the iteration
from (run key, iteration) as docs/method.md §7.1 documents and draws the same uniforms / Beta
variates with `jax.random`, then turns them into masks, draws and times itself.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import scipy.stats

from tests import reference_dit_numpy as ref_dit

EPS_SCHEDULE = 1e-3
NEG = -1e6


# ============================================================================ parameters


def to_official(flat: Mapping[tuple, np.ndarray]) -> Dict[str, np.ndarray]:
  """{nnx path: array} (our names, kernels (in, out)) -> {official name: float64 array}.

  ('blocks', 3, 'mlp_0', 'kernel') -> 'blocks.3.mlp.0.weight' (transposed);
  spectral-normalised head kernels -> '.weight_orig', their u / v -> '.weight_u' / '.weight_v'.
  """
  out = {}
  for path, value in flat.items():
    parts = [str(p) for p in path]
    leaf = parts[-1]
    mods = [{'mlp_0': 'mlp.0', 'mlp_2': 'mlp.2', 'main_0': 'main.0',
             'main_2': 'main.2'}.get(p, p) for p in parts[:-1]]
    a = np.asarray(value, np.float64)
    sn = 'main_0' in parts or 'main_2' in parts
    if leaf == 'kernel':
      name, a = ('weight_orig' if sn else 'weight'), a.T
    elif leaf in ('u', 'v'):
      name = 'weight_' + leaf
    else:
      name = leaf
    out['.'.join(mods + [name])] = a
  return out


# ============================================================================ keys (§7.1)


def iteration_keys(run_key, k: int) -> Dict[str, object]:
  """Purpose keys of iteration k: fold_in(run key, k) split 8 ways, in this order."""
  names = ('tau', 'tc', 'roll1', 'roll2', 'mask_fake', 'mask_real', 'real', 'drop')
  return dict(zip(names, jax.random.split(jax.random.fold_in(run_key, k), 8)))


def draw_uniforms(key, shape) -> np.ndarray:
  """The float32 uniforms of the paper's regime: u = f32(bits)·2^-32 + 2^-33, u == 1 -> 0."""
  bits = np.asarray(jax.random.bits(key, shape, np.uint32))
  u = bits.astype(np.float32) * np.float32(2.0 ** -32) + np.float32(2.0 ** -33)
  return np.where(u >= 1.0, np.float32(0.0), u).astype(np.float32)


# ============================================================================ method pieces


def alpha(t):
  return 1.0 - (1.0 - EPS_SCHEDULE) * np.asarray(t, np.float64)


def sigma(t):
  return -np.log(alpha(t))


def subs_logprobs(logits, z, mask_id):
  """[MASK] suppressed, log-softmax, revealed positions carried over (−1e6 = probability 0)."""
  x = np.asarray(logits, np.float64).copy()
  x[..., mask_id] += NEG
  x = x - x.max(-1, keepdims=True)
  lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  V = lp.shape[-1]
  carry = np.where(np.arange(V) == z[..., None], 0.0, NEG)
  return np.where((z != mask_id)[..., None], carry, lp)


def prob(lp):
  return np.where(lp > NEG / 2, np.exp(lp), 0.0)


def ancestral_draw(key, x, p, a_t, a_s, mask_id):
  """w_v = p_v (α_s − α_t), w_m = 1 − α_s; argmax w / E over float32 exponentials."""
  N, L, V = p.shape
  a_t = np.broadcast_to(np.asarray(a_t, np.float64).reshape(-1, 1, 1), (N, 1, 1))
  a_s = np.broadcast_to(np.asarray(a_s, np.float64).reshape(-1, 1, 1), (N, 1, 1))
  w = np.where(np.arange(V) == mask_id, 1.0 - a_s, p * (a_s - a_t)).astype(np.float32)
  u = draw_uniforms(key, (N, L, V))
  e = (np.float32(1e-10) - np.log(u + np.float32(1e-10))).astype(np.float32)
  draw = np.argmax(w.astype(np.float64) / e.astype(np.float64), axis=-1)
  return np.where(x == mask_id, draw, x)


def forward_mask(key, x, t, mask_id):
  u = np.asarray(jax.random.uniform(key, x.shape), np.float64)
  return np.where(u < (1.0 - alpha(t))[:, None], mask_id, x)


def kl(lp, lq):
  ok = lp > NEG / 2
  return np.where(ok, np.exp(np.where(ok, lp, 0)) * (np.where(ok, lp, 0) - np.where(ok, lq, 0)),
                  0.0).sum(-1)


def divergence(lp_T, lp_S, kind, beta):
  if kind == 'forward':
    return kl(lp_T, lp_S)
  if kind == 'reverse':
    return kl(lp_S, lp_T)
  return (1 - beta) * kl(lp_T, lp_S) + beta * kl(lp_S, lp_T)


def entropy(lp):
  ok = lp > NEG / 2
  return -np.where(ok, np.exp(np.where(ok, lp, 0)) * np.where(ok, lp, 0), 0.0).sum(-1)


def maskmean(x, mk):
  """Per-row mean over indicated positions, then the mean over rows that have any."""
  mk = np.asarray(mk, bool)
  cnt = mk.sum(-1)
  row = np.where(mk, x, 0.0).sum(-1) / np.maximum(cnt, 1)
  has = cnt > 0
  return float(row[has].mean()) if has.any() else 0.0


def softplus(x):
  return np.logaddexp(0.0, x)


def spectral_power_iteration(t: Dict[str, np.ndarray], name: str):
  """One training-mode iteration: v <- n(Wᵀu), u <- n(W v) with W (out, in) = weight_orig."""
  W = t[name + '.weight_orig']
  n = lambda a: a / max(np.linalg.norm(a), 1e-12)
  v = n(W.T @ t[name + '.weight_u'])
  u = n(W @ v)
  return u, v


def discriminator(t, ids, sig, n_heads):
  return ref_dit.discriminator_forward(t, ids, sig, n_heads)


def adamw(params, grads, state, lr, ocfg, clip):
  """nan_to_num -> global-norm clip -> AdamW (bias-corrected, decoupled decay) on dicts."""
  g = {k: np.nan_to_num(v, nan=0.0, posinf=1e5, neginf=-1e5) for k, v in grads.items()}
  norm = np.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
  if norm > clip:
    g = {k: v * clip / norm for k, v in g.items()}
  count = state['count'] + 1
  mu = {k: ocfg.b1 * state['mu'][k] + (1 - ocfg.b1) * g[k] for k in g}
  nu = {k: ocfg.b2 * state['nu'][k] + (1 - ocfg.b2) * g[k] ** 2 for k in g}
  new = {}
  for k in g:
    m_hat = mu[k] / (1 - ocfg.b1 ** count)
    v_hat = nu[k] / (1 - ocfg.b2 ** count)
    upd = m_hat / (np.sqrt(v_hat) + ocfg.eps) + ocfg.weight_decay * params[k]
    new[k] = params[k] - lr * upd
  return new, {'count': count, 'mu': mu, 'nu': nu}


def adam_init(params):
  return {'count': 0, 'mu': {k: np.zeros_like(v) for k, v in params.items()},
          'nu': {k: np.zeros_like(v) for k, v in params.items()}}


def lr_at(peak, warmup, total, k):
  return peak * (k + 1) / warmup if k < warmup else peak * max(0.0, (total - k) / (total - warmup))


def finite_diff_grad(f: Callable[[Dict[str, np.ndarray]], float], params: Dict[str, np.ndarray],
                     names, h: float = 1e-6) -> Dict[str, np.ndarray]:
  """Central differences of f over every element of params[name] for name in names."""
  out = {}
  for name in names:
    base = params[name]
    g = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
      old = base[idx]
      base[idx] = old + h
      fp = f(params)
      base[idx] = old - h
      fm = f(params)
      base[idx] = old
      g[idx] = (fp - fm) / (2 * h)
    out[name] = g
  return out


# ============================================================================ the iteration


@dataclasses.dataclass
class RefState:
  student: Dict[str, np.ndarray]
  ema: Dict[str, np.ndarray]
  disc: Dict[str, np.ndarray]          # all discriminator tensors incl. weight_u / weight_v
  disc_trainable: Tuple[str, ...]      # names the discriminator optimiser updates
  opt_student: dict
  opt_disc: dict
  step: int = 0


def one_iteration(st: RefState, teacher: Dict[str, np.ndarray], x_data: Optional[np.ndarray],
                  run_key, cfg, buffer: Optional[np.ndarray] = None):
  """One iteration of docs/method.md §7.1 (all §7.2 switches); returns (new state, outputs)."""
  d, m = cfg.distill, cfg.model
  V, L, H = m.vocab_size, m.length, m.n_heads
  mask = V - 1
  G = d.group_size
  k = st.step
  keys = iteration_keys(run_key, k)
  B = x_data.shape[0] if x_data is not None else d.batch_size
  N = B * G

  # ---- real rows
  if d.real_source == 'data':
    x_real = np.repeat(np.asarray(x_data), G, axis=0)
  else:
    perm = np.asarray(jax.random.permutation(keys['real'], buffer.shape[0]))
    x_real = np.asarray(buffer)[perm[:N]]

  # ---- τ (Beta, clamped; one per row or per group)
  def draw_tau(key):
    n_draw = N // G if d.tau.per == 'group' else N
    t = np.asarray(jax.random.beta(key, d.tau.a, d.tau.b, (n_draw,), np.float32), np.float64)
    t = np.clip(t, d.tau.min, d.tau.max)
    return np.repeat(t, G) if d.tau.per == 'group' else t
  tau = draw_tau(keys['tau'])

  # ---- student rollout: 1 -> τ -> t0 (or 1 -> t0), draws from the pre-update student
  sd = d.score_decomposition
  zeros1 = np.zeros(1)
  x_T = np.full((N, L), mask)
  t0 = d.t0

  def student_lp(theta, x, rows_sigma=None):
    return subs_logprobs(ref_dit.dit_forward(theta, x, np.zeros(x.shape[0]), H), x, mask)

  def teacher_lp(x, t_in):
    sig = np.zeros(x.shape[0]) if d.teacher_sigma == 'zero' else sigma(
        np.broadcast_to(t_in, (x.shape[0],)))
    return subs_logprobs(ref_dit.dit_forward(teacher, x, sig, H), x, mask)

  one_key = lambda key: jax.random.split(key, 1)[0]      # one position chunk
  lp1 = student_lp(st.student, x_T[:1])                  # (1, L, V): all rows identical
  a_s1 = alpha(tau) if sd else np.full(N, alpha(t0))
  x_1 = ancestral_draw(one_key(keys['roll1']), x_T, np.broadcast_to(prob(lp1), (N, L, V)),
                       alpha(1.0), a_s1, mask)
  if sd:
    x_tau = x_1
    lp2 = student_lp(st.student, x_tau)
    x_fake = ancestral_draw(one_key(keys['roll2']), x_tau, prob(lp2), alpha(tau),
                            np.full(N, alpha(t0)), mask)
  else:
    x_tau, x_fake = x_T, x_1

  # ---- coupled corruption
  t_c = tau if d.coupled_time else draw_tau(keys['tc'])
  sig_c = sigma(t_c)
  z_fake = forward_mask(keys['mask_fake'], x_fake, t_c, mask)
  z_real = forward_mask(keys['mask_real'], x_real, t_c, mask)
  mk_fake, mk_real = z_fake == mask, z_real == mask

  # ---- discriminator update (training-mode spectral norm: one power iteration, u/v constant)
  disc = {kk: v.copy() for kk, v in st.disc.items()}
  for layer in ('output_layer.main.0', 'output_layer.main.2'):
    disc[layer + '.weight_u'], disc[layer + '.weight_v'] = spectral_power_iteration(disc, layer)
  s = d.label_smoothing

  def d_loss(p):
    out = discriminator(p, np.concatenate([z_real, z_fake]), np.concatenate([sig_c, sig_c]), H)
    dr, df = out[:N], out[N:]
    side = lambda dd, mk, y: (mk * (softplus(dd) - y * dd)).sum() / max(1.0, mk.sum())
    return 0.5 * (side(dr, mk_real, 1 - s) + side(df, mk_fake, s)), dr, df
  loss_D, d_real, d_fake = d_loss(disc)
  g_D = finite_diff_grad(lambda p: d_loss(p)[0], disc, st.disc_trainable)
  lr_D = lr_at(d.optim.disc.lr, d.optim.disc.warmup_steps, d.num_iterations, k)
  trainable = {kk: disc[kk] for kk in st.disc_trainable}
  new_train, opt_disc = adamw(trainable, g_D, st.opt_disc, lr_D, d.optim.disc,
                              d.optim.disc.clip_norm)
  disc.update(new_train)

  # ---- rewards from the UPDATED discriminator (stored u/v)
  d_rew = discriminator(disc, z_fake, sig_c, H)
  sg = 1.0 / (1.0 + np.exp(-d_rew))
  lo = np.clip(np.log(sg + 1e-6) - np.log(1 - sg + 1e-6), -d.reward_clip, d.reward_clip)
  r = (mk_fake * lo).sum(-1) / np.maximum(1.0, mk_fake.sum(-1))
  adv_metrics = {}
  if d.group_norm:
    g = r.reshape(-1, G)
    std = g.std(1, ddof=1, keepdims=True)
    floor = np.maximum(1e-4, d.adv_std_floor * np.abs(g).mean(1, keepdims=True))
    z = (g - g.mean(1, keepdims=True)) / np.maximum(std, floor)
    adv = np.clip(z, -d.adv_clip, d.adv_clip).ravel()
    adv_metrics = {'adv_zmax': np.abs(z).max(), 'adv_floor_frac': (std < floor).mean()}
    if (G - 1) / np.sqrt(G) > d.adv_clip:
      adv_metrics['adv_clip_frac'] = (np.abs(z) > d.adv_clip).mean()
  else:
    adv = r
  w = np.clip(1.0 / t_c, d.omega.min, d.omega.max) if d.omega.mode == 'inv_t' else np.ones(N)
  if d.importance_weight:
    w = w / scipy.stats.beta.pdf(t_c, d.tau.a, d.tau.b)
  wa = w * adv

  # ---- student loss as a function of θ with the draws fixed
  kl_on = d.kl.scale * max(abs(d.kl.coef_hi), abs(d.kl.coef_lo)) != 0
  lpT1 = teacher_lp(x_T[:1], 1.0) if kl_on else None
  lpT2 = teacher_lp(x_tau, tau) if (kl_on and sd) else None
  newly1 = (x_T == mask) & (x_1 != mask)
  newly2 = (x_tau == mask) & (x_fake != mask)
  mk_tau = x_tau == mask

  def terms(theta):
    lp1_ = student_lp(theta, x_T[:1])
    lp1_N = np.broadcast_to(lp1_, (N, L, V))
    at1 = np.take_along_axis(lp1_N, x_1[..., None], -1)[..., 0]
    logp = np.where(newly1, at1, 0.0).sum(-1)
    ent_hi = maskmean(entropy(lp1_), np.ones((1, L), bool))
    kl_hi = maskmean(divergence(lpT1, lp1_, d.kl.type, d.kl.beta), np.ones((1, L), bool)) \
        if kl_on else 0.0
    kl_lo, ent = 0.0, ent_hi
    if sd:
      lp2_ = student_lp(theta, x_tau)
      at2 = np.take_along_axis(lp2_, x_fake[..., None], -1)[..., 0]
      logp = logp + np.where(newly2, at2, 0.0).sum(-1)
      if kl_on:
        kl_lo = maskmean(divergence(lpT2, lp2_, d.kl.type, d.kl.beta), mk_tau)
      ent = 0.5 * (ent_hi + maskmean(entropy(lp2_), mk_tau))
    return logp, kl_hi, kl_lo, ent

  def student_loss(theta):
    logp, kl_hi, kl_lo, ent = terms(theta)
    pg = -np.mean(wa * logp)
    return pg + d.kl.scale * (d.kl.coef_hi * kl_hi + d.kl.coef_lo * kl_lo) - d.entropy_coef * ent

  logp, kl_hi, kl_lo, ent = terms(st.student)
  loss_S = student_loss(st.student)
  n_warm = d.disc_warmup_steps
  student, ema, opt_student = st.student, st.ema, st.opt_student
  g_S = {kk: np.zeros_like(v) for kk, v in st.student.items()}
  lr_S = 0.0
  if k >= n_warm:
    g_S = finite_diff_grad(student_loss, {kk: v.copy() for kk, v in st.student.items()},
                           list(st.student))
    lr_S = lr_at(d.optim.student.lr, d.optim.student.warmup_steps, d.num_iterations - n_warm,
                 k - n_warm)
    student, opt_student = adamw(st.student, g_S, st.opt_student, lr_S, d.optim.student,
                                 d.optim.student.clip_norm)
    ema = {kk: st.ema[kk] + (1 - d.ema_decay) * (student[kk] - st.ema[kk]) for kk in st.ema}

  frac = lambda pred, mk: float((mk * pred).sum() / max(1.0, mk.sum()))
  gnorm = lambda gg: float(np.sqrt(sum((v ** 2).sum() for v in gg.values())))
  metrics = {
      'd_loss': loss_D, 'd_acc_real': frac(d_real > 0, mk_real),
      'd_acc_fake': frac(d_fake < 0, mk_fake), 'reward_mean': r.mean(), 'reward_std': r.std(),
      'entropy': ent, 'pg_loss': -np.mean(wa * logp), 'student_loss': loss_S,
      'grad_norm_student': gnorm(g_S), 'grad_norm_disc': gnorm(g_D), 'lr_student': lr_S,
      'lr_disc': lr_D, 'tau_mean': tau.mean(), 'masked_frac': mk_fake.mean(),
  }
  metrics.update(adv_metrics, nonfinite_grads_student=0.0, nonfinite_grads_disc=0.0)
  if kl_on:
    metrics.update(kl_hi=kl_hi, kl_lo=kl_lo)
  out = {'tau_N': tau, 't_c_N': t_c, 'x_real_NxL': x_real, 'x_tau_NxL': x_tau,
         'x_fake_NxL': x_fake, 'z_real_NxL': z_real, 'z_fake_NxL': z_fake,
         'd_real_NxL': d_real, 'd_fake_NxL': d_fake, 'd_reward_NxL': d_rew, 'reward_N': r,
         'adv_N': adv, 'omega_N': w, 'logp_N': logp, 'grad_student': g_S, 'grad_disc': g_D,
         'metrics': metrics}
  new = RefState(student=student, ema=ema, disc=disc, disc_trainable=st.disc_trainable,
                 opt_student=opt_student, opt_disc=opt_disc, step=k + 1)
  return new, out
