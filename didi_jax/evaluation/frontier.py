"""The teacher's entropy frontier (docs/method.md §12.1): is a lower Gen PPL a better model, or
lower entropy that a colder teacher would also give?

The sweep samples the teacher at each teacher NFE at a few softmax temperatures; at one NFE the
points (entropy H_k, Gen PPL G_k) trace the teacher's frontier. For a row at entropy h we report
F(h), the frontier's Gen PPL at h: the points sorted by entropy, log Gen PPL linear in entropy
between the two points that bracket h. Outside [min H_k, max H_k] the end segment is extended and
the value is flagged `extrapolated` (a row is then never said to beat the teacher). The gap is
G_row − F(h_row): negative means below the frontier. Its 95% interval is a percentile bootstrap
that resamples the row's samples and each frontier point's samples independently and recomputes
every Gen PPL and entropy, the interpolation included.

Outside the range, dominance still decides when it can: the frontier rises with entropy (a hotter
teacher is less predictable), so a row at MORE entropy than the hottest point and a Gen PPL
significantly BELOW that point's beats the teacher at its entropy ('dominates'), and a row at LESS
entropy than the coldest point with a Gen PPL significantly ABOVE that point's is worse
('dominated'). Neither uses the extended segment: the end gap G_row − G_end has its own bootstrap
interval (the same resamples).

Host-side NumPy on per-sample arrays: the judge's counted NLL sum and token count per sample
(Gen PPL is the token-weighted corpus value, docs/method.md §10) and the unigram entropy per sample.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from didi_jax.evaluation import metrics


@dataclasses.dataclass(frozen=True)
class Samples:
  """Per-sample arrays of one set: judge NLL sums, counted tokens, unigram entropies (S,)."""
  nll_sum: np.ndarray
  count: np.ndarray
  entropy: np.ndarray

  def take(self, idx: np.ndarray) -> 'Samples':
    return Samples(self.nll_sum[idx], self.count[idx], self.entropy[idx])

  @property
  def size(self) -> int:
    return int(np.asarray(self.entropy).shape[0])

  def point(self) -> tuple[float, float]:
    """(mean entropy, Gen PPL) of the set."""
    return float(np.mean(self.entropy)), metrics.gen_ppl(self.nll_sum, self.count)


def interpolate(h: float, entropies: Sequence[float],
                gen_ppls: Sequence[float]) -> tuple[float, bool]:
  """(F(h), extrapolated): log Gen PPL linear in entropy between the bracketing frontier points
  (sorted by entropy); outside their range the end segment is extended and flagged. Needs two or
  more points with distinct entropies."""
  H = np.asarray(entropies, np.float64)
  logG = np.log(np.asarray(gen_ppls, np.float64))
  order = np.argsort(H, kind='stable')
  H, logG = H[order], logG[order]
  if H.shape[0] < 2 or H[-1] <= H[0]:
    raise ValueError('a frontier needs two or more points with distinct entropies')
  extrapolated = bool(h < H[0] or h > H[-1])
  # The segment [k, k+1]: the first whose right end reaches h (end segments when outside).
  k = int(np.clip(np.searchsorted(H, h, side='left') - 1, 0, H.shape[0] - 2))
  while H[k + 1] <= H[k] and k + 2 < H.shape[0]:      # skip a zero-width segment
    k += 1
  lo, hi = H[k], H[k + 1]
  if hi <= lo:                                        # the remaining points share one entropy
    return float(np.exp(np.mean(logG[k:k + 2]))), extrapolated
  w = (h - lo) / (hi - lo)
  with np.errstate(over='ignore'):    # a far extrapolation may overflow to inf (flagged anyway)
    return float(np.exp(logG[k] + w * (logG[k + 1] - logG[k]))), extrapolated


def _gap(row: Samples, points: Sequence[Samples]):
  """(gap, F(h), h, extrapolated, the points' entropies, their Gen PPLs) of a row against
  frontier points."""
  h, g = row.point()
  hs, gs = zip(*(p.point() for p in points))
  f, extrap = interpolate(h, hs, gs)
  return g - f, f, h, extrap, hs, gs


def _end_point(h: float, hs: Sequence[float]) -> Optional[int]:
  """Index of the hottest point (entropies `hs`) when h lies above every one, of the coldest when
  below all; None inside the range."""
  if h > max(hs):
    return int(np.argmax(hs))
  if h < min(hs):
    return int(np.argmin(hs))
  return None


def gap(row: Samples, points: Sequence[Samples], *, n_bootstrap: int = 0, seed: int = 0,
        level: float = metrics.CI_LEVEL) -> dict:
  """The row's frontier record: {'entropy', 'gen_ppl', 'teacher_gen_ppl' (F at the row's entropy),
  'gap', 'gap_ci' (None without resamples), 'extrapolated', 'verdict'}, and outside the range
  'end_gen_ppl' / 'end_gap' / 'end_gap_ci' (against the nearest end point, see the module).

  verdict: 'below' (the interval lies under 0: the row beats the teacher at its entropy),
  'above', 'tie' (the interval straddles 0); outside the frontier's entropy range 'dominates'
  (hotter than every point and significantly below the hottest), 'dominated' (colder than every
  point and significantly above the coldest) or 'extrapolated' (no verdict). Without resamples
  the signs decide."""
  g_gap, f, h, extrap, hs, gs = _gap(row, points)
  end = _end_point(h, hs) if extrap else None
  end_gap = None if end is None else g_gap + f - gs[end]
  ci = end_ci = None
  if n_bootstrap > 0:
    rng = np.random.default_rng(seed)
    stats = np.empty((n_bootstrap,), np.float64)
    end_stats = np.empty((n_bootstrap,), np.float64)
    for b in range(n_bootstrap):
      r = row.take(rng.integers(0, row.size, row.size))
      ps = [p.take(rng.integers(0, p.size, p.size)) for p in points]
      try:
        stats[b], f_b, _, _, _, gs_b = _gap(r, ps)
        if end is not None:
          end_stats[b] = stats[b] + f_b - gs_b[end]
      except ValueError:        # a resample whose frontier points share one entropy
        stats[b] = np.nan
        if end is not None:
          end_stats[b] = r.point()[1] - ps[end].point()[1]
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(stats, [tail, 100.0 - tail])
    ci = [float(lo), float(hi)]
    if end is not None:
      lo, hi = np.percentile(end_stats, [tail, 100.0 - tail])
      end_ci = [float(lo), float(hi)]
  if extrap:
    verdict = 'extrapolated'
    if end is not None:
      hotter = h > points[end].point()[0]
      lo, hi = end_ci if end_ci is not None else (end_gap, end_gap)
      if hotter and hi < 0:
        verdict = 'dominates'
      elif not hotter and lo > 0:
        verdict = 'dominated'
  elif ci is None:
    verdict = 'below' if g_gap < 0 else 'above'
  else:
    verdict = 'below' if ci[1] < 0 else ('above' if ci[0] > 0 else 'tie')
  out = {'entropy': h, 'gen_ppl': g_gap + f, 'teacher_gen_ppl': f, 'gap': g_gap, 'gap_ci': ci,
         'extrapolated': extrap, 'verdict': verdict}
  if end is not None:
    out.update(end_gen_ppl=gs[end], end_gap=end_gap, end_gap_ci=end_ci)
  return out


def frontier_points(rows: Sequence[dict], per_sample: dict, judge: str) -> dict:
  """{(nfe, precision): [(temperature, Samples)]} of the teacher's non-RGAS rows under `judge`,
  one point per temperature (the first row of a temperature wins), sorted by temperature.
  `per_sample(row, judge)` gives a row's Samples or None."""
  out: dict[tuple, dict] = {}
  for r in rows:
    if r.get('model') != 'teacher' or r.get('sampler') == 'rgas':
      continue
    s = per_sample(r, judge)
    if s is None:
      continue
    temps = out.setdefault((int(r['nfe']), r.get('precision', 'float32')), {})
    temps.setdefault(row_temperature(r), s)
  return {k: sorted(v.items()) for k, v in out.items()}


def row_temperature(row: dict) -> float:
  """The softmax temperature a row was sampled at (rows of older sweeps: from their settings)."""
  if row.get('temperature') is not None:
    return float(row['temperature'])
  return float(((row.get('settings') or {}).get('sampler') or {}).get('temperature', 1.0))


def row_record(row: dict, points: Optional[list], per_sample, judge: str, *, n_bootstrap: int,
               seed: int) -> Optional[dict]:
  """A non-teacher row's frontier record under `judge`, or a record with only a 'note' when it
  cannot be computed (no frontier at the row's NFE, too few points, no per-sample scores)."""
  if not points or len(points) < 2:
    return {'note': f'no teacher frontier at NFE {row["nfe"]} ({row.get("precision", "float32")}):'
                    ' put the NFE in sweep.teacher_nfes'}
  s = per_sample(row, judge)
  if s is None:
    return {'note': 'no per-sample scores for this row (its per_sample file is missing)'}
  hs = [p.point()[0] for _, p in points]
  if max(hs) <= min(hs):
    return {'note': 'the frontier points share one entropy'}
  rec = gap(s, [p for _, p in points], n_bootstrap=n_bootstrap, seed=seed)
  rec['temperatures'] = [t for t, _ in points]
  return rec
