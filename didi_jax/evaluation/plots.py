"""Sweep plots: Gen PPL and entropy against NFE (log-2 axis) or against FLOPs per sample.

One line per (model, sampler[, precision]) series with 95% bootstrap error bars; the precision
enters the label only when the rows hold more than one. Figures are built without pyplot (no
global backend or figure registry is touched), so this works headless and inside notebooks.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

X_AXES = {
    'nfe': ('NFE (sampler steps)', 2),
    'tflops_per_sample': ('TFLOPs per sample', 10),
}


@dataclasses.dataclass
class CurvePlot:
  """A saved figure and the labels of its series (one line per series on each panel)."""
  figure: Figure
  series: list[str]
  path: str

  @property
  def num_lines(self) -> int:
    return len(self.series)


def log2_axis(ax, xlabel: str) -> None:
  """A base-2 log x axis with plain step counts (4, 8, 16, ...) and a grid."""
  ax.set_xscale('log', base=2)
  ax.xaxis.set_major_formatter(ScalarFormatter())
  ax.set_xlabel(xlabel)
  ax.grid(True, which='both', alpha=0.3)


def save(fig, path: str, title: Optional[str] = None) -> None:
  """Titles, lays out and writes `fig` to `path` (its directory is created)."""
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def series_key(row: dict, with_precision: bool) -> tuple:
  key = (row['model'], row['sampler'])
  return key + (row.get('precision', 'float32'),) if with_precision else key


def group_series(rows: Sequence[dict], x: str = 'nfe') -> dict[tuple, list[dict]]:
  """Rows grouped by series (first-seen order), each sorted by `x`; rows without x are dropped."""
  with_precision = len({r.get('precision', 'float32') for r in rows}) > 1
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get(x) is None or r.get('gen_ppl') is None:
      continue
    groups.setdefault(series_key(r, with_precision), []).append(r)
  return {k: sorted(v, key=lambda r: r[x]) for k, v in groups.items()}


def _errors(rows: list[dict], value: str, ci: str):
  lo = [max(r[value] - r[ci][0], 0.0) for r in rows]
  hi = [max(r[ci][1] - r[value], 0.0) for r in rows]
  return [lo, hi]


def _judge_values(rs: list[dict], judge: Optional[str]) -> list[dict]:
  """Rows as {'gen_ppl', 'gen_ppl_ci'} under `judge` (None: the row's primary judge)."""
  if judge is None:
    return rs
  return [r['judges'][judge] for r in rs]


def curve(rows: Sequence[dict], path: str, *, x: str = 'nfe',
          data_entropy: Optional[float] = None, data_gen_ppl: Optional[float] = None,
          data_gen_ppl_judges: Optional[dict] = None, title: str = '') -> CurvePlot:
  """Gen PPL panels (log y): the primary judge's, then one per extra judge the rows carry in
  'judges'; then entropy; all against `x` ('nfe' or 'tflops_per_sample'), saved to `path`. The
  data reference (`data_gen_ppl`, `data_gen_ppl_judges` {judge: Gen PPL}, `data_entropy`) is
  drawn as dashed lines."""
  if x not in X_AXES:
    raise ValueError(f'x={x!r} is not a sweep axis: use one of {list(X_AXES)}')
  xlabel, base = X_AXES[x]
  groups = group_series(rows, x)
  primary = sorted({str(r.get('judge')) for r in rows})
  extra = [j for j in dict.fromkeys(k for r in rows for k in (r.get('judges') or {}))
           if j not in primary and all(j in (r.get('judges') or {}) for r in rows)]
  fig = Figure(figsize=(5.5 * (len(extra) + 2), 4.2))
  FigureCanvasAgg(fig)
  axes = list(fig.subplots(1, len(extra) + 2))
  ppl_axes, ax_ent = axes[:-1], axes[-1]
  labels = []
  for key, rs in groups.items():
    parts = [str(k) for k in key]
    if len(parts) > 1 and parts[0] == parts[1]:      # the AR baseline: model 'ar', sampler 'ar'
      parts = parts[1:]
    label = ' / '.join(parts)
    labels.append(label)
    xs = [r[x] for r in rs]
    for ax, judge in zip(ppl_axes, [None] + extra):
      vs = _judge_values(rs, judge)
      ax.errorbar(xs, [v['gen_ppl'] for v in vs], yerr=_errors(vs, 'gen_ppl', 'gen_ppl_ci'),
                  marker='o', capsize=3, label=label)
    if all(r.get('entropy') is not None for r in rs):
      ax_ent.errorbar(xs, [r['entropy'] for r in rs], yerr=_errors(rs, 'entropy', 'entropy_ci'),
                      marker='o', capsize=3, label=label)
  refs = [data_gen_ppl] + [(data_gen_ppl_judges or {}).get(j) for j in extra]
  for ax, ref in zip(ppl_axes, refs):
    if ref is not None:
      ax.axhline(ref, color='gray', linestyle='--', linewidth=1, label='validation data')
  if data_entropy is not None:
    ax_ent.axhline(data_entropy, color='gray', linestyle='--', linewidth=1,
                   label='validation data')
  ppl_axes[0].set_ylabel(f'Gen PPL ({", ".join(primary)})')
  for ax, judge in zip(ppl_axes[1:], extra):
    ax.set_ylabel(f'Gen PPL ({judge})')
  ax_ent.set_ylabel('unigram entropy (nats)')
  for ax in axes:
    ax.set_xscale('log', base=base)
    if base == 2:                                    # plain step counts: 4, 8, 16, ...
      ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.grid(True, which='both', alpha=0.3)
    if labels:
      ax.legend(fontsize=8)
  if labels:
    for ax in ppl_axes:
      ax.set_yscale('log')
  save(fig, path, title)
  return CurvePlot(fig, labels, path)


def ablation(entries: Sequence[dict], teacher: Sequence[dict], judges: Sequence[str], path: str,
             title: str = '') -> Figure:
  """The ablation figure: one Gen PPL panel per judge (log y) and an entropy panel, each against
  NFE with one line per row (error bars: the sample interval) and the teacher dashed."""
  fig = Figure(figsize=(5.2 * (len(judges) + 1), 4.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(judges) + 1, squeeze=False)[0]
  rows = list(dict.fromkeys(e['row'] for e in entries))
  for name in rows:
    es = sorted((e for e in entries if e['row'] == name), key=lambda e: e['nfe'])
    xs = [e['nfe'] for e in es]
    style = dict(marker='o', capsize=3, label=name,
                 linestyle='-' if es[0]['group'] == 'chain' else ':')
    for ax, j in zip(axes, judges):
      js = [e['judges'][j] for e in es if j in e['judges']]
      if len(js) == len(es):
        ax.errorbar(xs, [r['gen_ppl'] for r in js], yerr=_errors(js, 'gen_ppl', 'gen_ppl_ci'),
                    **style)
    axes[-1].errorbar(xs, [e['entropy'] for e in es], yerr=_errors(es, 'entropy', 'entropy_ci'),
                      **style)
  ts = sorted(teacher, key=lambda t: t['nfe'])
  if ts:
    for ax, j in zip(axes, judges):
      if all(j in t.get('judges', {}) for t in ts):
        ax.plot([t['nfe'] for t in ts], [t['judges'][j]['gen_ppl'] for t in ts], 'k--',
                linewidth=1, label='teacher')
    axes[-1].plot([t['nfe'] for t in ts], [t['entropy'] for t in ts], 'k--', linewidth=1,
                  label='teacher')
  for ax, j in zip(axes, judges):
    ax.set_ylabel(f'Gen PPL ({j})')
    ax.set_yscale('log')
  axes[-1].set_ylabel('unigram entropy (nats)')
  for ax in axes:
    log2_axis(ax, X_AXES['nfe'][0])
  axes[0].legend(fontsize=7)
  save(fig, path, title)
  return fig
