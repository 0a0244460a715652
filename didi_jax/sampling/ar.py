"""Autoregressive sampling with a KV cache (docs/method.md §12, the AR baseline): one forward per
token, the docs/method.md §8.1 race draw with optional top-p, or greedy.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from didi_jax.models.gpt2 import GPT2, GPT2_EOS
from didi_jax.sampling import categorical

Array = jax.Array


@functools.partial(jax.jit, static_argnames=('graphdef', 'length', 'temperature', 'top_p',
                                             'regime'))
def _generate(graphdef, state, key, prompt_BxP, *, length, temperature, top_p, regime):
  model = nnx.merge(graphdef, state)
  B, P = prompt_BxP.shape
  total = P + length - 1
  cache = model.init_cache(B, total)

  def step(carry, t):
    cache, tok_B = carry
    logits_BxV, cache = model.decode_step(tok_B, t, cache)
    logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    if temperature == 0.0:
      sampled = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      p = categorical.probs_from_logprobs(logp, regime, temperature, top_p)
      sampled = categorical.race(jax.random.fold_in(key, t), p, regime)
    forced = jax.lax.dynamic_index_in_dim(prompt_BxP, jnp.minimum(t + 1, P - 1), axis=1,
                                          keepdims=False)
    nxt = jnp.where(t + 1 < P, forced, sampled)
    return (cache, nxt), nxt

  _, toks_TxB = jax.lax.scan(step, (cache, prompt_BxP[:, 0]), jnp.arange(total))
  return toks_TxB[P - 1:].T


def gpt2_generate(model: GPT2, key: Array, *, batch_size: int, length: int,
                  prompt_BxP: Optional[Array] = None, bos_id: int = GPT2_EOS,
                  temperature: float = 1.0, top_p: float = 1.0,
                  regime: categorical.Regime = categorical.Regime()) -> Array:
  """Autoregressive sampling with a KV cache: `length` new tokens per row, one forward each.

  The prompt (default: one BOS = EOS token, GPT-2's unconditional start) is fed through the same
  scan; positions used = P + length − 1 must fit in n_positions (P = 1, length = 1024 fits GPT-2).
  `temperature=0` is greedy (argmax); otherwise the docs/method.md §8.1 race draw with optional top-p.
  Returns the generated ids (B, length) int32, prompt excluded.
  """
  if prompt_BxP is None:
    prompt_BxP = jnp.full((batch_size, 1), bos_id, jnp.int32)
  prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
  if prompt_BxP.shape[0] != batch_size or prompt_BxP.shape[1] < 1:
    raise ValueError(f'prompt_BxP has shape {prompt_BxP.shape}; it needs batch_size='
                     f'{batch_size} rows and at least one token (e.g. the BOS id)')
  used = prompt_BxP.shape[1] + length - 1
  if used > model.cfg.n_positions:
    raise ValueError(f'generation needs {used} positions but n_positions='
                     f'{model.cfg.n_positions}: shorten the prompt or the length')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy)')
  categorical.check_precision(regime.precision)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, key, prompt_BxP, length=int(length),
                   temperature=float(temperature), top_p=float(top_p), regime=regime)
