"""An independent NumPy float64 reference of one SDTT iteration (docs/method.md §14.2).

Written from the method description; it imports nothing from `didi_jax`. The networks are the
NumPy DiT of `reference_dit_numpy`; masks, draws and SUBS log-probs are those of
`reference_distill_numpy`. Only randomness comes from JAX: the keys of iteration k are
fold_in(run key, k) split four ways (time, corruption, first draw, second draw).
"""
from __future__ import annotations

from typing import Dict

import jax
import numpy as np

from tests import reference_dit_numpy as ref_dit
from tests import reference_distill_numpy as ref


forward_mask = ref.forward_mask          # q(z_t | x0): the same corruption as DiDi's reference


def iteration_keys(run_key, k: int) -> Dict[str, object]:
  names = ('t', 'mask', 'draw0', 'draw1')
  return dict(zip(names, jax.random.split(jax.random.fold_in(run_key, k), 4)))


def antithetic_times(key, n: int, t_min: float) -> np.ndarray:
  """t_j = (1 − t_min)·((U/n + j/n) mod 1) + t_min, one uniform U for the batch."""
  u0 = float(jax.random.uniform(key, ()))
  u = np.mod(u0 / n + np.arange(n) / n, 1.0)
  return (1.0 - t_min) * u + t_min


def step_size(k: int, round_iterations: int, teacher_steps: int) -> float:
  """Δ of round r = k // R: the teacher takes teacher_steps / 2^r steps of 1 / that."""
  return 2.0 ** (k // round_iterations) / teacher_steps


def teacher_times(t: float, delta: float, t_min: float):
  """Step i goes from τ_i = max(t − iΔ, t_min) to max(τ_i − Δ, 0)."""
  out = []
  for i in (0, 1):
    tau = max(t - i * delta, t_min)
    out.append((tau, max(tau - delta, 0.0)))
  return out


def logprobs(params, z, n_heads, mask_id):
  """SUBS log-probs of the DiT `params` (official names) at σ = 0."""
  logits = ref_dit.dit_forward(params, z, np.zeros(z.shape[0]), n_heads)
  return ref.subs_logprobs(logits, z, mask_id)


def target(teacher, z_t, t, delta, keys, *, n_heads, mask_id, t_min):
  """Two teacher steps; per position the distribution of the step that revealed it (step 1's
  when none did). Returns (target, z1, z2, category) with category 0/1 = revealed in step 0/1,
  2 = still masked, -1 = not masked in z_t."""
  z, lps, zs = z_t, [], []
  for i in (0, 1):
    times = [teacher_times(float(tb), delta, t_min)[i] for tb in t]
    a_t = ref.alpha(np.array([a for a, _ in times]))
    a_s = ref.alpha(np.array([s for _, s in times]))
    lp = logprobs(teacher, z, n_heads, mask_id)
    z = ref.ancestral_draw(keys[f'draw{i}'], z, ref.prob(lp), a_t, a_s, mask_id)
    lps.append(lp)
    zs.append(z)
  masked = z_t == mask_id
  cat = np.where(~masked, -1, np.where(zs[0] != mask_id, 0,
                                       np.where(zs[1] != mask_id, 1, 2)))
  tgt = np.where((cat == 0)[..., None], lps[0], lps[1])
  return tgt, zs[0], zs[1], cat


def divergence(lp_S, lp_T, kind):
  if kind == 'reverse_kl':
    return ref.kl(lp_S, lp_T)
  if kind == 'forward_kl':
    return ref.kl(lp_T, lp_S)
  if kind == 'mse':
    ok = (lp_S > ref.NEG / 2) & (lp_T > ref.NEG / 2)
    return np.where(ok, (lp_S - lp_T) ** 2, 0.0).mean(-1)
  return 0.5 * np.abs(ref.prob(lp_S) - ref.prob(lp_T)).sum(-1)


def loss(student, z_t, tgt, kind, *, n_heads, mask_id):
  """Token mean over the masked positions of z_t of the divergence student ↔ target."""
  d = divergence(logprobs(student, z_t, n_heads, mask_id), tgt, kind)
  mk = z_t == mask_id
  return float(np.where(mk, d, 0.0).sum() / max(1, mk.sum()))
