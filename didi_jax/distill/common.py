"""What the distillation methods share: probability-0 handling, the KL between two SUBS
distributions given as log-probs (docs/method.md §7.2, §14.2), fresh copies of parameter trees."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didi_jax import diffusion

Array = jax.Array

PROB_ZERO = diffusion.NEG_INF / 2  # log-probs at or below this count as probability 0


def is_prob(logp: Array) -> Array:
  """Whether each log-prob is a probability above 0 (SUBS writes −1e6 for probability 0)."""
  return logp > PROB_ZERO


def kl_per_position(logp_p: Array, logp_q: Array) -> Array:
  """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis; log p ≤ −5e5 counts as p = 0."""
  ok = is_prob(logp_p)
  lp = jnp.where(ok, logp_p, 0.0)
  lq = jnp.where(ok, logp_q, 0.0)
  return jnp.sum(jnp.where(ok, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def copy_tree(tree):
  """Fresh buffers of every leaf (a donated state must never alias another tree)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
