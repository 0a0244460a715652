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
  `Discriminator`, `loader.Network` of role discriminator, or `didi_jax.load_discriminator(...)`).
* `words(tokenizer, words, weight)`: steer toward (weight > 0) or away from (weight < 0) a word
  list: a TokenReward whose per-token score is the soft count of the words starting there.

Every reward has a `weight` (multiplies its scores; passed to the program as an argument, so a
sweep over weights compiles once). Token and sequence rewards count only the positions of the
output (`region`): not the BOS/EOS frame, not a bucket's discarded padding.
A reward of exactly zero leaves the tilt untouched, so with `num_candidates=1` RGAS then draws
exactly what plain ancestral sampling draws (the key layouts agree, `didi_jax.sampling.rgas`).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


class Reward:
  """Base class. `params()` are the arrays the jitted sampler receives as arguments (the weight
  first, so that sweeping it does not recompile); `disc_fn(dparams, region, vocab)` builds the
  RGAS callable inside the program; `key()` names the program (same key, same program)."""
  differentiable = True          # False: re-rank only (no tilt phase)
  network = False                # True: counts as network evaluations (a classifier)

  def __init__(self, weight: float = 1.0):
    self.weight = float(weight)

  def params(self) -> tuple:
    return (np.float32(self.weight),)

  def disc_fn(self, dparams, region_BxL: Array, vocab_size: int):
    raise TypeError(f'{type(self).__name__} does not define a reward: use TokenReward, '
                    'SequenceReward, ClassifierReward or rewards.words(...)')

  def key(self):
    return (type(self).__name__, id(self))


def _soft(x, soft_input: str):
  """Probabilities from RGAS's soft input (it passes probabilities, 'probs')."""
  if soft_input == 'probs':
    return x.astype(jnp.float32)
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1)


class TokenReward(Reward):
  """Per-token scores from soft tokens: fn(probs_BxLxV, sigma_B) -> (B, L), differentiable."""

  def __init__(self, fn: Callable, *, weight: float = 1.0, ids_fn: Optional[Callable] = None):
    super().__init__(weight)
    self.fn, self.ids_fn = fn, ids_fn

  def key(self):
    return ('token', self.fn, self.ids_fn)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    region = region_BxL.astype(jnp.float32)
    weight = dparams[0]

    def disc(x, sigma_B, soft_input='logits'):
      if jnp.issubdtype(x.dtype, jnp.integer):
        if self.ids_fn is not None:
          s = self.ids_fn(x, sigma_B)
        else:
          s = self.fn(jax.nn.one_hot(x, vocab_size, dtype=jnp.float32), sigma_B)
      else:
        s = self.fn(_soft(x, soft_input), sigma_B)
      return weight * jnp.asarray(s, jnp.float32).reshape(region.shape) * region
    return disc


class SequenceReward(Reward):
  """One score per sequence on ids: fn(ids_BxL, region_BxL) -> (B,); re-ranking only."""
  differentiable = False

  def __init__(self, fn: Callable, *, weight: float = 1.0, host: bool = False):
    super().__init__(weight)
    self.fn, self.host = fn, bool(host)

  def key(self):
    return ('sequence', self.fn, self.host)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    weight = dparams[0]

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
      return jnp.zeros(x.shape, jnp.float32).at[:, 0].set(weight * r)
    return disc


class ClassifierReward(Reward):
  """A loaded classifier with the discriminator's contract, as RGAS calls the discriminator."""
  network = True

  def __init__(self, classifier, *, weight: float = 1.0):
    super().__init__(weight)
    self.model_cfg = getattr(classifier, 'model_cfg', None)
    if hasattr(classifier, 'graphdef') and hasattr(classifier, 'spectral'):   # loader.Network
      self.graphdef = classifier.graphdef
      self._trees = (classifier.params, classifier.spectral)
      if classifier.spectral is None:
        self._trees = (classifier.params,)
    elif hasattr(classifier, 'graphdef') and hasattr(classifier, 'state'):    # api.DiscriminatorFn
      self.graphdef, self._trees = classifier.graphdef, (classifier.state,)
    elif isinstance(classifier, nnx.Module):
      self.graphdef, state = nnx.split(classifier)
      self._trees = (state,)
    else:
      raise TypeError(f'{type(classifier).__name__} is not a loaded classifier: pass a '
                      'Discriminator, loader.load(..., "discriminator") or '
                      'didi_jax.load_discriminator(...)')

  def trees(self) -> tuple:
    """The classifier's state: (params, spectral) or (whole state,)."""
    return self._trees

  def params(self) -> tuple:
    return (np.float32(self.weight),) + self._trees

  def key(self):
    return ('classifier', self.graphdef)

  def disc_fn(self, dparams, region_BxL, vocab_size):
    weight, model = dparams[0], nnx.merge(self.graphdef, *dparams[1:])

    def disc(x, sigma_B, soft_input='logits'):
      return weight * model(x, sigma_B, soft_input=soft_input)
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


@functools.lru_cache(maxsize=64)
def _ngram_fns(sequences: tuple):
  """(soft, hard) score functions of one word list, the same objects for the same list."""
  return (lambda q, sigma: ngram_scores(q, sequences),
          lambda x, sigma: ngram_counts(x, sequences))


def words(tokenizer, word_list: Sequence[str], weight: float = 1.0) -> TokenReward:
  """Steer toward (weight > 0) or away from (weight < 0) the words of `word_list`; the same list
  with another weight reuses the compiled program (the weight is an argument, not a constant)."""
  soft, hard = _ngram_fns(tuple(word_sequences(tokenizer, word_list)))
  return TokenReward(soft, weight=weight, ids_fn=hard)


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
