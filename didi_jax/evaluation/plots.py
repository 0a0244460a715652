"""Sweep plots: Gen PPL and entropy against NFE (log-2 axis) or against FLOPs per sample.

One line per (model, sampler[, precision][, temperature]) series with 95% bootstrap error bars;
the precision and the temperature enter the label only when the rows hold more than one. When the
teacher was sampled at two or more temperatures at an NFE (the entropy frontier, docs/method.md
§12.1), a last panel plots Gen PPL against entropy: the frontier as a line per NFE and every
other row at that NFE as a point in the same colour. Figures are built without pyplot (no
global backend or figure registry is touched), so this works headless and inside notebooks.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from didi_jax.evaluation.frontier import row_temperature

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


def series_key(row: dict, with_precision: bool, with_temperature: bool = False) -> tuple:
  key = (row['model'], row['sampler'])
  key += (row.get('precision', 'float32'),) if with_precision else ()
  return key + (f'T={row_temperature(row):g}',) if with_temperature else key


def group_series(rows: Sequence[dict], x: str = 'nfe') -> dict[tuple, list[dict]]:
  """Rows grouped by series (first-seen order), each sorted by `x`; rows without x are dropped."""
  with_precision = len({r.get('precision', 'float32') for r in rows}) > 1
  with_temperature = len({row_temperature(r) for r in rows}) > 1
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get(x) is None or r.get('gen_ppl') is None:
      continue
    groups.setdefault(series_key(r, with_precision, with_temperature), []).append(r)
  return {k: sorted(v, key=lambda r: r[x]) for k, v in groups.items()}


def frontier_groups(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  """{(nfe, precision): the teacher's plain rows, one per temperature, sorted by entropy} for
  every NFE with two or more temperatures (the frontiers the entropy panel draws)."""
  groups: dict[tuple, dict] = {}
  for r in rows:
    if (r.get('model') == 'teacher' and r.get('sampler') != 'rgas'
        and r.get('gen_ppl') is not None and r.get('entropy') is not None):
      key = (int(r['nfe']), r.get('precision', 'float32'))
      groups.setdefault(key, {}).setdefault(row_temperature(r), r)
  return {k: sorted(v.values(), key=lambda r: r['entropy'])
          for k, v in groups.items() if len(v) >= 2}


def frontier_panel(ax, rows: Sequence[dict], frontiers: dict[tuple, list[dict]],
                   data: Optional[tuple] = None) -> None:
  """Gen PPL (log) against entropy: the teacher's frontier per NFE (a line through its
  temperatures) and each non-teacher row at that NFE as a point with its intervals; `data`
  (entropy, Gen PPL) of the validation text as a star."""
  with_precision = len({k[1] for k in frontiers}) > 1
  cycle = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (key, fr) in enumerate(sorted(frontiers.items())):
    nfe, precision = key
    tag = f'NFE={nfe}' + (f' {precision}' if with_precision else '')
    colour = cycle[i % len(cycle)]
    ax.plot([r['entropy'] for r in fr], [r['gen_ppl'] for r in fr], '--s', color=colour,
            markersize=4, linewidth=1, label=f'teacher frontier {tag}')
    for r in fr:
      ax.annotate(f'T={row_temperature(r):g}', (r['entropy'], r['gen_ppl']), fontsize=6,
                  textcoords='offset points', xytext=(3, 3), color=colour)
    for r in rows:
      if (r.get('model') == 'teacher' or r.get('gen_ppl') is None or r.get('entropy') is None
          or (int(r['nfe']), r.get('precision', 'float32')) != key):
        continue
      marker = '^' if r['sampler'] == 'rgas' else 'o'
      ax.errorbar([r['entropy']], [r['gen_ppl']], yerr=_errors([r], 'gen_ppl', 'gen_ppl_ci'),
                  xerr=_errors([r], 'entropy', 'entropy_ci'), marker=marker, color=colour,
                  linestyle='none', capsize=2, label=f'{r["model"]} / {r["sampler"]} {tag}')
  if data is not None and None not in data:
    ax.plot([data[0]], [data[1]], '*', color='gray', markersize=9, label='validation data')
  ax.set_xlabel('unigram entropy (nats)')
  ax.set_ylabel('Gen PPL')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7)


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
  frontiers = frontier_groups(rows)
  n_panels = len(extra) + 2 + bool(frontiers)
  fig = Figure(figsize=(5.5 * n_panels, 4.2))
  FigureCanvasAgg(fig)
  axes = list(fig.subplots(1, n_panels))
  if frontiers:
    ax_front = axes.pop()
    frontier_panel(ax_front, rows, frontiers, (data_entropy, data_gen_ppl))
    ax_front.set_ylabel(f'Gen PPL ({", ".join(primary)})')
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
