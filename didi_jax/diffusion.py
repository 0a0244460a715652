"""Masked diffusion: log-linear schedule, forward masking, SUBS parameterisation, MDLM NELBO.

The one home of the noise schedule (docs/method.md §2, §4). Times t ∈ [0, 1]; α_t = 1 − (1 − ε)t with
ε = 1e-3; σ_t = −log α_t; the mask ratio 1 − α_t is linear in t.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

EPS = 1e-3          # hard-coded schedule floor (docs/method.md §2)
NEG_INF = -1e6      # "probability 0" in SUBS log-probs


def alpha(t):
  """α_t = 1 − (1 − ε) t."""
  return 1.0 - (1.0 - EPS) * t


def dalpha(t):
  """α'_t = −(1 − ε)."""
  return -(1.0 - EPS) * jnp.ones_like(t)


def sigma(t):
  """σ_t = −log α_t (the noise level fed to time-aware networks)."""
  return -jnp.log(alpha(t))


def loss_weight(t):
  """ω(t) = −α'_t / (1 − α_t) = 1/t."""
  return -dalpha(t) / (1.0 - alpha(t))


def mask_prob(t):
  """Probability that a token is [MASK] at time t: 1 − α_t."""
  return 1.0 - alpha(t)


def forward_mask(key, ids_BxL, t_B, mask_id: int):
  """q(z_t | x): each token independently becomes [MASK] with probability 1 − α_t."""
  chex.assert_rank(ids_BxL, 2)
  chex.assert_shape(t_B, (ids_BxL.shape[0],))
  u = jax.random.uniform(key, ids_BxL.shape)
  p = mask_prob(t_B)[:, None]
  return jnp.where(u < p, mask_id, ids_BxL)


def antithetic_times(key, n: int, eps: float = EPS):
  """t_j = (1 − ε) u_j + ε with u_j = (U/n + j/n) mod 1 (one U for the global batch)."""
  u0 = jax.random.uniform(key, ())
  u = jnp.mod(u0 / n + jnp.arange(n) / n, 1.0)
  return (1.0 - eps) * u + eps


def uniform_times(key, n: int, eps: float = EPS):
  return (1.0 - eps) * jax.random.uniform(key, (n,)) + eps


def subs_logprobs(logits_BxLxV, z_BxL, mask_id: int):
  """SUBS: [MASK] logit suppressed, log-softmax over V, revealed positions carried over.

  Returns float32 log-probabilities; entries of −1e6 stand for probability 0.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  is_mask_col = jnp.arange(vocab) == mask_id
  logits = logits + jnp.where(is_mask_col, NEG_INF, 0.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  revealed = (z_BxL != mask_id)[..., None]
  onehot = jax.nn.one_hot(z_BxL, vocab, dtype=jnp.bool_)
  carry = jnp.where(onehot, 0.0, NEG_INF)
  return jnp.where(revealed, carry, logp)


def subs_logprob_at(logits_BxLxV, z_BxL, x_BxL, mask_id: int):
  """log x_θ(z_t)_{x} at each position, without materialising the full SUBS tensor twice.

  At revealed positions this is 0 if x == z else −1e6; at masked positions the log-softmax of
  the [MASK]-suppressed logits, gathered at x.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  logits = logits + jnp.where(jnp.arange(vocab) == mask_id, NEG_INF, 0.0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, x_BxL[..., None], axis=-1)[..., 0]
  lp_masked = picked - lse
  revealed = z_BxL != mask_id
  return jnp.where(revealed, jnp.where(x_BxL == z_BxL, 0.0, NEG_INF), lp_masked)


def nelbo_per_token(logits_BxLxV, z_BxL, x_BxL, t_B, mask_id: int):
  """Continuous-time MDLM NELBO per token: −(1/t)·log x_θ(z_t)_{x_i} at masked positions, else 0."""
  chex.assert_rank(logits_BxLxV, 3)
  chex.assert_equal_shape([z_BxL, x_BxL, logits_BxLxV[..., 0]])
  chex.assert_shape(t_B, (x_BxL.shape[0],))
  lp = subs_logprob_at(logits_BxLxV, z_BxL, x_BxL, mask_id)
  masked = z_BxL == mask_id
  w = (-dalpha(t_B) / (1.0 - alpha(t_B)))[:, None]
  return jnp.where(masked, -w * lp, 0.0)
