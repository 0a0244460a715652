"""Sample-quality statistics (docs/method.md §10): Gen PPL, bootstrap intervals and the summary
of a judged sample set (with the judge-free statistics of `didi_jax.samples`), and MAUVE on
feature arrays (docs/method.md §12.2; the optional mauve-text package). All host-side NumPy,
float64.
"""
from __future__ import annotations

import importlib.metadata
from typing import Callable, Optional, Sequence

import numpy as np

from didi_jax import errors, samples

CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000


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
              ngram: int = samples.DEFAULT_NGRAM) -> dict:
  """Gen PPL (+95% CI), mean per-sample PPL and, given model ids, entropy (+CI) and repetition."""
  out = {
      'num_samples': int(np.asarray(count_S).shape[0]),
      'num_judge_tokens': int(np.sum(count_S)),
      'gen_ppl': gen_ppl(nll_sum_S, count_S),
      'gen_ppl_ci': bootstrap_ci(gen_ppl, [nll_sum_S, count_S], n_bootstrap, seed),
      'mean_sample_ppl': mean_sample_ppl(nll_sum_S, count_S),
  }
  if ids_SxL is not None:
    ent = samples.unigram_entropy(ids_SxL)
    out['entropy'] = _mean(ent)
    out['entropy_ci'] = bootstrap_ci(_mean, [ent], n_bootstrap, seed)
    out[f'repeated_{ngram}gram_rate'] = samples.repeated_ngram_rate(ids_SxL, ngram)
  return out


MAUVE_PIP = "pip install mauve-text (or pip install -e '.[eval]')"


def require_mauve():
  """The `mauve` module of the mauve-text package; ConfigError (one line, the pip command) when
  it is not installed."""
  try:
    import mauve  # pylint: disable=import-outside-toplevel  (optional: faiss, scikit-learn)
  except ImportError:
    raise errors.ConfigError(f'eval.mauve=True needs the mauve-text package: {MAUVE_PIP} (or set '
                             '--config.eval.mauve=False)') from None
  return mauve


def mauve(p_features: np.ndarray, q_features: np.ndarray, *, buckets: int = 0,
          scaling: float = 5.0, seed: int = 0) -> dict:
  """MAUVE (mauve-text's `compute_mauve` on feature arrays) of P = samples against Q = reference:
  PCA to 90% of the variance, k-means into `buckets` clusters (0: max(2, round(min(n_p, n_q) /
  10)), the package's 'auto'), the divergence curve scaled by `scaling`. Returns {'mauve',
  'frontier_integral', 'protocol'}. Two exactly equal feature sets score 0.75, not 1 (ties in
  the package's area computation); independent draws of one distribution score about 1."""
  lib = require_mauve()
  p = np.asarray(p_features, np.float32)
  q = np.asarray(q_features, np.float32)
  n_buckets = int(buckets) or max(2, int(round(min(p.shape[0], q.shape[0]) / 10)))
  # faiss's k-means on one thread: at a few hundred points it takes milliseconds, where OpenMP
  # spinning on busy shared cores took seconds (measured 0.02 s vs 4.2 s, 240 points, 2 cores).
  import faiss  # pylint: disable=import-outside-toplevel  (installed with mauve-text)
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  try:
    out = lib.compute_mauve(p_features=p, q_features=q, num_buckets=n_buckets,
                            mauve_scaling_factor=float(scaling), seed=int(seed), verbose=False,
                            kmeans_explained_var=0.9, kmeans_num_redo=5, kmeans_max_iter=500)
  finally:
    faiss.omp_set_num_threads(threads)
  version = importlib.metadata.version('mauve-text')
  return {'mauve': float(out.mauve), 'frontier_integral': float(out.frontier_integral),
          'protocol': {'buckets': n_buckets, 'package': version,
                       'pca_explained_variance': 0.9, 'kmeans_redo': 5}}
