"""Rewards for guided generation: anything RGAS can steer by, adapted to its discriminator interface.

RGAS (docs/method.md §8.3, `didi_jax.sampling.rgas`) asks one callable for both of its phases:
`disc_fn(x, sigma_B, soft_input=...) -> (B, L)` per-token scores, called on a soft input (the
predicted x0 distribution, `soft_input='probs'`, differentiated for the tilt) and on hard ids
(candidates, summed for the re-ranking). The trained discriminator is such a callable; the classes
here turn a user's reward into one, leaving the discriminator path as it is:

* `TokenReward(fn)`: `fn(probs_BxLxV, sigma_B) -> (B, L)` per-token scores, a differentiable JAX
  function of the soft tokens. Tilting uses its gradient; re-ranking calls it on one-hot rows
  (or on `ids_fn(ids_BxL, sigma_B)` when given, which avoids the (B, L, V) one-hot). A plain
  callable passed as `reward=` is read as a TokenReward.
* `SequenceReward(fn)`: `fn(ids_BxL, region_BxL) -> (B,)`, one score per sequence on hard ids
  (`region` marks the output's positions of the window). Not differentiable, so RGAS only
  re-ranks (`rerank_ratio=1`). `host=True` runs a NumPy/Python fn through `jax.pure_callback`.
* `ClassifierReward(net)`: a loaded classifier with the discriminator's contract (a didi_jax
  `Discriminator`, `networks.Network` of role discriminator, or `didi_jax.load_discriminator(...)`).
* `words(tokenizer, words, weight)`: steer toward (weight > 0) or away from (weight < 0) a word
  list: a TokenReward whose per-token score is the soft count of the words starting there.

Every reward has a `weight` (multiplies its scores). Token and sequence rewards count only the
positions of the output (`region`): not the BOS/EOS frame, not a bucket's discarded padding.
A reward of exactly zero leaves the tilt untouched, so with `num_candidates=1` RGAS then draws
exactly what plain ancestral sampling draws (the key layouts agree, `didi_jax.sampling.rgas`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Reward:
  """Base class: `disc_fn(dparams, region)` builds the RGAS callable inside the jitted sampler."""
  differentiable = True          # False: re-rank only (no tilt phase)
  network = False                # True: counts as network evaluations (a classifier)
  weight = 1.0

  def params(self):
    """Arrays passed to the jitted sampler as arguments (not baked into the program)."""
    return None

  def disc_fn(self, dparams, region_BxL: Array, vocab_size: int):
    raise NotImplementedError

  def key(self):
    """Identity for the compile cache: same key, same program."""
    return (type(self).__name__, id(self))


def _soft(x, soft_input: str):
  """Probabilities from RGAS's soft input (it passes probabilities, 'probs')."""
  if soft_input == 'probs':
    return x.astype(jnp.float32)
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1)


class TokenReward(Reward):
  """Per-token scores from soft tokens: fn(probs_BxLxV, sigma_B) -> (B, L), differentiable."""

  def __init__(self, fn: Callable, *, weight: float = 1.0, ids_fn: Optional[Callable] = None):
    self.fn, self.ids_fn, self.weight = fn, ids_fn, float(weight)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    region = region_BxL.astype(jnp.float32)

    def disc(x, sigma_B, soft_input='logits'):
      if jnp.issubdtype(x.dtype, jnp.integer):
        if self.ids_fn is not None:
          s = self.ids_fn(x, sigma_B)
        else:
          s = self.fn(jax.nn.one_hot(x, vocab_size, dtype=jnp.float32), sigma_B)
      else:
        s = self.fn(_soft(x, soft_input), sigma_B)
      return self.weight * jnp.asarray(s, jnp.float32).reshape(region.shape) * region
    return disc


class SequenceReward(Reward):
  """One score per sequence on ids: fn(ids_BxL, region_BxL) -> (B,); re-ranking only."""
  differentiable = False

  def __init__(self, fn: Callable, *, weight: float = 1.0, host: bool = False):
    self.fn, self.weight, self.host = fn, float(weight), bool(host)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    def disc(x, sigma_B, soft_input='logits'):
      del sigma_B
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError('a SequenceReward scores ids only: it cannot tilt (rerank_ratio=1)')
      if self.host:
        def call(ids, region):
          return np.asarray(self.fn(np.asarray(ids), np.asarray(region)),
                            np.float32).reshape(-1)
        r = jax.pure_callback(call, jax.ShapeDtypeStruct((x.shape[0],), jnp.float32), x,
                              region_BxL, vmap_method='sequential')
      else:
        r = jnp.asarray(self.fn(x, region_BxL), jnp.float32).reshape(-1)
      # RGAS sums the per-token scores of a candidate ('sum_all'): put the score in column 0.
      return jnp.zeros(x.shape, jnp.float32).at[:, 0].set(self.weight * r)
    return disc


class ClassifierReward(Reward):
  """A loaded classifier with the discriminator's contract, as RGAS calls the discriminator."""
  network = True

  def __init__(self, classifier, *, weight: float = 1.0):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    self.weight = float(weight)
    self.model_cfg = getattr(classifier, 'model_cfg', None)
    if hasattr(classifier, 'graphdef') and hasattr(classifier, 'spectral'):   # networks.Network
      self.graphdef = classifier.graphdef
      self._params = (classifier.params, classifier.spectral)
    elif hasattr(classifier, 'graphdef') and hasattr(classifier, 'state'):    # api.DiscriminatorFn
      self.graphdef, self._params = classifier.graphdef, (classifier.state,)
    elif isinstance(classifier, nnx.Module):
      self.graphdef, state = nnx.split(classifier)
      self._params = (state,)
    else:
      raise TypeError(f'{type(classifier).__name__} is not a loaded classifier: pass a '
                      'Discriminator, networks.load(..., "discriminator") or '
                      'didi_jax.load_discriminator(...)')

  def params(self):
    return self._params

  def key(self):
    return ('classifier', self.graphdef, self.weight)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    model = nnx.merge(self.graphdef, *dparams)
    if self.weight == 1.0:
      return model

    def disc(x, sigma_B, soft_input='logits'):
      return self.weight * model(x, sigma_B, soft_input=soft_input)
    return disc


def ngram_scores(q_BxLxV: Array, sequences: Sequence[Sequence[int]]) -> Array:
  """Soft count of token sequences starting at each position: Σ_w Π_j q[i+j, w_j] -> (B, L).

  On one-hot rows (hard ids) this is exactly the number of listed sequences that start at i.
  """
  B, L, _ = q_BxLxV.shape
  total = jnp.zeros((B, L), jnp.float32)
  for seq in sequences:
    prod = jnp.ones((B, L), jnp.float32)
    for j, tok in enumerate(seq):
      col = q_BxLxV[:, :, int(tok)].astype(jnp.float32)
      prod = prod * jnp.pad(col[:, j:], ((0, 0), (0, min(j, L))))[:, :L]
    total = total + prod
  return total


def ngram_counts(ids_BxL: Array, sequences: Sequence[Sequence[int]]) -> Array:
  """`ngram_scores` on hard ids without building the one-hot."""
  B, L = ids_BxL.shape
  total = jnp.zeros((B, L), jnp.float32)
  for seq in sequences:
    hit = jnp.ones((B, L), jnp.bool_)
    for j, tok in enumerate(seq):
      col = ids_BxL == int(tok)
      hit = hit & jnp.pad(col[:, j:], ((0, 0), (0, min(j, L))))[:, :L]
    total = total + hit.astype(jnp.float32)
  return total


def word_sequences(tokenizer, words: Sequence[str]) -> list[tuple[int, ...]]:
  """Token sequences of each word as written and capitalised; with BPE also with a leading space
  (how GPT-2 spells a word inside a sentence). Duplicates removed, order kept."""
  seqs: list[tuple[int, ...]] = []
  bpe = getattr(tokenizer, 'name', '') != 'byte'
  for w in words:
    w = w.strip()
    if not w:
      continue
    for v in dict.fromkeys((w, w[:1].upper() + w[1:])):
      for text in ((v, ' ' + v) if bpe else (v,)):
        ids = tuple(int(i) for i in tokenizer.encode(text))
        if ids and ids not in seqs:
          seqs.append(ids)
  if not seqs:
    raise ValueError('the word list is empty: pass at least one word')
  return seqs


def words(tokenizer, word_list: Sequence[str], weight: float = 1.0) -> TokenReward:
  """Steer toward (weight > 0) or away from (weight < 0) the words of `word_list`."""
  seqs = word_sequences(tokenizer, word_list)
  return TokenReward(lambda q, sigma: ngram_scores(q, seqs), weight=weight,
                     ids_fn=lambda x, sigma: ngram_counts(x, seqs))


def as_reward(reward) -> Optional[Reward]:
  """None, a Reward, a loaded classifier, or a plain callable (read as a TokenReward)."""
  if reward is None or isinstance(reward, Reward):
    return reward
  if hasattr(reward, 'graphdef') or type(reward).__name__ == 'Discriminator':
    return ClassifierReward(reward)
  if callable(reward):
    return TokenReward(reward)
  raise TypeError(f'reward={reward!r}: pass a TokenReward / SequenceReward / ClassifierReward, '
                  'a loaded classifier, or a callable (probs_BxLxV, sigma_B) -> (B, L)')
