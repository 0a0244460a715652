"""Sample-quality statistics (docs/method.md §10): Gen PPL, unigram entropy, bootstrap intervals, n-gram
repetition. All host-side NumPy, float64.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000
DEFAULT_NGRAM = 4


def gen_ppl(nll_sum_S: np.ndarray, count_S: np.ndarray) -> float:
  """Token-weighted Gen PPL: exp(Σ_samples Σ NLL / Σ_samples #counted)."""
  total = float(np.sum(np.asarray(count_S, np.float64)))
  if total <= 0:
    raise ValueError('no counted judge tokens: the samples are empty after re-tokenisation')
  return float(np.exp(np.sum(np.asarray(nll_sum_S, np.float64)) / total))


def mean_sample_ppl(nll_sum_S: np.ndarray, count_S: np.ndarray) -> float:
  """Mean over samples of exp(NLL_s / count_s); samples with no counted token are skipped."""
  nll = np.asarray(nll_sum_S, np.float64)
  count = np.asarray(count_S, np.float64)
  keep = count > 0
  if not keep.any():
    raise ValueError('no sample has a counted judge token: nothing to average')
  return float(np.mean(np.exp(nll[keep] / count[keep])))


def unigram_entropy(ids_SxL: np.ndarray) -> np.ndarray:
  """Per-sample unigram entropy in nats, H = −Σ_v (c_v/L) ln(c_v/L); float64 (S,)."""
  ids = np.sort(np.asarray(ids_SxL), axis=1)
  S, L = ids.shape
  # Run lengths of equal ids in each sorted row are the counts c_v.
  starts = np.ones((S, L), bool)
  starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  out = np.empty((S,), np.float64)
  for s in range(S):
    idx = np.flatnonzero(starts[s])
    p = np.diff(np.append(idx, L)) / L
    out[s] = -np.sum(p * np.log(p))
  return out


def repeated_ngram_fraction(ids_SxL: np.ndarray, n: int = DEFAULT_NGRAM) -> np.ndarray:
  """Per sample, the fraction of its n-grams that repeat an earlier n-gram of the same sample
  (1 − distinct/total); float64 (S,). Judge-free diversity statistic."""
  ids = np.asarray(ids_SxL)
  S, L = ids.shape
  if not 1 <= n <= L:
    raise ValueError(f'n-gram order n={n} must lie in [1, sample length {L}]')
  grams = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)   # (S, L−n+1, n)
  out = np.empty((S,), np.float64)
  for s in range(S):
    distinct = np.unique(grams[s], axis=0).shape[0]
    out[s] = 1.0 - distinct / grams.shape[1]
  return out


def repeated_ngram_rate(ids_SxL: np.ndarray, n: int = DEFAULT_NGRAM) -> float:
  """Mean over samples of `repeated_ngram_fraction`."""
  return float(np.mean(repeated_ngram_fraction(ids_SxL, n)))


def bootstrap_ci(stat_fn: Callable[..., float], arrays: Sequence[np.ndarray],
                 n: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
  """Percentile bootstrap interval of stat_fn(*arrays), resampling samples (axis 0) jointly."""
  arrays = [np.asarray(a) for a in arrays]
  S = arrays[0].shape[0]
  if any(a.shape[0] != S for a in arrays):
    raise ValueError(f'bootstrap arrays disagree on the sample count: '
                     f'{[a.shape[0] for a in arrays]}')
  if S == 0 or n < 1:
    raise ValueError(f'bootstrap needs samples and resamples (got S={S}, n={n})')
  rng = np.random.default_rng(seed)
  stats = np.empty((n,), np.float64)
  for i in range(n):
    idx = rng.integers(0, S, size=S)
    stats[i] = stat_fn(*(a[idx] for a in arrays))
  tail = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(stats, [tail, 100.0 - tail])
  return float(lo), float(hi)


def _mean(x: np.ndarray) -> float:
  return float(np.mean(x))


def summarize(nll_sum_S: np.ndarray, count_S: np.ndarray, ids_SxL: Optional[np.ndarray] = None,
              *, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
              ngram: int = DEFAULT_NGRAM) -> dict:
  """Gen PPL (+95% CI), mean per-sample PPL and, given model ids, entropy (+CI) and repetition."""
  out = {
      'num_samples': int(np.asarray(count_S).shape[0]),
      'num_judge_tokens': int(np.sum(count_S)),
      'gen_ppl': gen_ppl(nll_sum_S, count_S),
      'gen_ppl_ci': bootstrap_ci(gen_ppl, [nll_sum_S, count_S], n_bootstrap, seed),
      'mean_sample_ppl': mean_sample_ppl(nll_sum_S, count_S),
  }
  if ids_SxL is not None:
    ent = unigram_entropy(ids_SxL)
    out['entropy'] = _mean(ent)
    out['entropy_ci'] = bootstrap_ci(_mean, [ent], n_bootstrap, seed)
    out[f'repeated_{ngram}gram_rate'] = repeated_ngram_rate(ids_SxL, ngram)
  return out
