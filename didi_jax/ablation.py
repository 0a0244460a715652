"""The `ablate` job (docs/ablation.md): one distillation per ablation row, then its NFE sweep.

Rows are named sets of switches over existing config fields. Each technique of the method has an
"off" setting (TECHNIQUES); "full" is the config as given with RGAS sampling, and every row is full
with some techniques switched off:

  chain  the paper's cumulative order (docs/method.md §11.3): baseline (all six off), then
         with_score_decomposition, with_coupled_time, with_omega, with_pi_weighting,
         with_regularisation, full (+ RGAS)
  loo    leave one out: no_<technique> for every technique that is on in the config, including
         grouped reward normalisation and τ per group, which the paper does not isolate
  extra  `ablation.extra='name:key=value,key=value;name2:...'` (on top of full)

Every row's distillation is an ordinary resumable distill workdir WORKDIR/ablation/rows/<row>/
seed<S>/ (a row.json there records the settings it was trained with); rows whose training
settings are equal (e.g. with_regularisation and full, which differ only in the sampler) share
one. The sweep cells (student × the row's sampler × sweep.nfes, and the teacher's cells once)
go to WORKDIR/ablation/cells.json and are reused when their settings match, so a killed ablation
resumes at the row and iteration where it stopped. Every distillation runs before any cell is
evaluated (no judge is in memory while networks train); `ablation.stage='distill'` stops after
them, e.g. to train on accelerators and evaluate elsewhere, or while a judge is still training.
Outputs: WORKDIR/ablation/{table.md, table.json, ablation.png}.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import re
import time
from typing import Optional, Sequence

import numpy as np

from didi_jax import artifacts, errors, parallel, samples
from didi_jax import config as config_lib
from didi_jax.evaluation import judges, metrics, plots, sweep
from didi_jax.train import family

ABLATION_DIR, ROWS_DIR = 'ablation', 'rows'
CELLS, TABLE_MD, TABLE_JSON, PLOT, ROW_MARKER = ('cells.json', 'table.md', 'table.json',
                                                'ablation.png', 'row.json')
FULL = 'full'
ALLOWED_PREFIXES = ('distill.', 'sampler.')   # what an extra row may change


@dataclasses.dataclass(frozen=True)
class Technique:
  name: str
  label: str
  off: dict               # dotted config key -> the value that turns the technique off
  on: Optional[dict] = None   # fixed "on" values; None: the config's own values are "on"


# In the paper's cumulative order; the last two are ours (no row of their own in the paper).
TECHNIQUES = (
    Technique('score_decomposition', 'score decomposition',
              {'distill.score_decomposition': False}),
    Technique('coupled_time', 'coupled time', {'distill.coupled_time': False}),
    Technique('omega', 'ω(t) correction', {'distill.omega.mode': 'constant'}),
    Technique('pi_weighting', 'π(t) weighting',
              {'distill.tau.a': 2.0, 'distill.tau.b': 2.0, 'distill.importance_weight': False}),
    Technique('regularisation', 'regularisation',
              {'distill.kl.coef_hi': 0.0, 'distill.kl.coef_lo': 0.0, 'distill.entropy_coef': 0.0}),
    Technique('rgas', 'guided inference (RGAS)', {'sampler.kind': 'ancestral'},
              on={'sampler.kind': 'rgas'}),
    Technique('group_norm', 'grouped reward normalisation', {'distill.group_norm': False}),
    Technique('tau_per_group', 'τ per group', {'distill.tau.per': 'row'}),
)
BY_NAME = {t.name: t for t in TECHNIQUES}
CHAIN = tuple(t.name for t in TECHNIQUES[:6])        # the paper's cumulative rows, in order


@dataclasses.dataclass(frozen=True)
class Row:
  """One ablation row: full with `off` techniques switched off (+ `extra` settings)."""
  name: str
  group: str              # chain | loo | extra
  label: str
  off: tuple = ()         # technique names switched off
  extra: tuple = ()       # ((key, value), ...) of an extra row

  def overrides(self) -> dict:
    """Every config value this row sets, in order: full's fixed "on" values, then the off
    values of its techniques, then the extra settings."""
    out = {}
    for t in TECHNIQUES:
      if t.on:
        out.update(t.on)
    for name in self.off:
      out.update(BY_NAME[name].off)
    out.update(dict(self.extra))
    return out


# ------------------------------------------------------------------------------------ rows


def chain_rows() -> list[Row]:
  """baseline (all of CHAIN off), then each technique turned on in the paper's order."""
  rows = [Row('baseline', 'chain', 'baseline (no techniques)', CHAIN)]
  for i, name in enumerate(CHAIN[:-1]):
    rows.append(Row(f'with_{name}', 'chain', f'+ {BY_NAME[name].label}', CHAIN[i + 1:]))
  rows.append(Row(FULL, 'chain', f'+ {BY_NAME["rgas"].label} = full', ()))
  return rows


def loo_rows() -> list[Row]:
  return [Row(f'no_{t.name}', 'loo', f'full − {t.label}', (t.name,)) for t in TECHNIQUES]


def _get(cfg, key):
  node = cfg
  for part in key.split('.'):
    node = node[part]
  return node


def _set(cfg, key, value):
  *parents, leaf = key.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value


def _parse_value(text: str, current, key: str):
  """`text` as the type of the field's current value."""
  t = text.strip()
  if isinstance(current, bool):
    if t.lower() in ('true', '1', 'yes'):
      return True
    if t.lower() in ('false', '0', 'no'):
      return False
    raise errors.ConfigError(f'ablation.extra: {key}={text!r} must be True or False')
  if isinstance(current, int):
    try:
      return int(t)
    except ValueError:
      raise errors.ConfigError(f'ablation.extra: {key}={text!r} must be an integer') from None
  if isinstance(current, float):
    try:
      return float(t)
    except ValueError:
      raise errors.ConfigError(f'ablation.extra: {key}={text!r} must be a number') from None
  return t


def parse_extra(text: str, cfg) -> list[Row]:
  """Rows of `ablation.extra`: 'name:key=value,key=value;name2:key=value' (on top of full)."""
  rows = []
  fix = ("use --config.ablation.extra='name:distill.kl.beta=0.3,distill.entropy_coef=0;"
         "name2:...'")
  for part in [p.strip() for p in str(text).split(';') if p.strip()]:
    name, sep, body = part.partition(':')
    name = name.strip()
    if not sep or not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', name):
      raise errors.ConfigError(f'ablation.extra row {part!r} needs a name of letters, digits, '
                               f'_ . - before a colon: {fix}')
    settings = []
    for item in [i.strip() for i in body.split(',') if i.strip()]:
      key, eq, value = item.partition('=')
      key = key.strip()
      if not eq or not key:
        raise errors.ConfigError(f'ablation.extra row {name!r}: {item!r} is not key=value: {fix}')
      if not key.startswith(ALLOWED_PREFIXES):
        raise errors.ConfigError(f'ablation.extra row {name!r}: {key!r} is not under '
                                 f'{" or ".join(ALLOWED_PREFIXES)}: an ablation row changes the '
                                 'distillation or the sampler only')
      try:
        current = _get(cfg, key)
      except (KeyError, AttributeError):
        raise errors.ConfigError(f'ablation.extra row {name!r}: unknown config key {key!r}: check '
                                 'the spelling against didi_jax/config.py') from None
      if isinstance(current, dict) or hasattr(current, 'keys'):
        raise errors.ConfigError(f'ablation.extra row {name!r}: {key!r} is a section, not a '
                                 'field: name a field inside it')
      settings.append((key, _parse_value(value, current, key)))
    if not settings:
      raise errors.ConfigError(f'ablation.extra row {name!r} sets nothing: {fix}')
    rows.append(Row(name, 'extra', f'full, {", ".join(f"{k}={v}" for k, v in settings)}',
                    (), tuple(settings)))
  return rows


def technique_is_on(cfg, name: str) -> bool:
  """Whether the config (as full) differs from the technique's off values."""
  t = BY_NAME[name]
  if t.on:
    return True
  return any(_get(cfg, k) != v for k, v in t.off.items())


def select_rows(cfg) -> list[Row]:
  """The rows of `ablation.rows` (names and the groups 'chain', 'loo') and `ablation.extra`;
  ConfigError (one line, with the fix) for unknown or impossible rows."""
  chain, loo = chain_rows(), loo_rows()
  known = {r.name: r for r in chain + loo}
  items = config_lib.parse_list(cfg.ablation.rows, 'ablation.rows')
  extra = parse_extra(cfg.ablation.extra, cfg)
  if not items and not extra:
    raise errors.ConfigError('--config.ablation.rows is empty: use chain, loo and/or row names '
                             f'({", ".join(known)}), or add rows with ablation.extra')
  picked: dict[str, Row] = {}
  for item in items:
    if item == 'chain':
      off = [n for n in CHAIN if not technique_is_on(cfg, n)]
      if off:
        t = BY_NAME[off[0]]
        raise errors.ConfigError(
            f'the cumulative chain needs every technique on in the config, but {t.name} is off '
            f'({", ".join(f"{k}={v!r}" for k, v in t.off.items())}): drop that override or '
            "drop 'chain' from --config.ablation.rows")
      picked.update((r.name, r) for r in chain)
    elif item == 'loo':
      picked.update((r.name, r) for r in loo if technique_is_on(cfg, r.off[0]))
    elif item in known:
      row = known[item]
      if row.group == 'loo' and not technique_is_on(cfg, row.off[0]):
        raise errors.ConfigError(f'row {item!r}: {row.off[0]} is already off in the config, so '
                                 'the row equals full: turn it on or drop the row')
      picked[item] = row
    else:
      raise errors.ConfigError(f'--config.ablation.rows has unknown row {item!r}: use chain, loo '
                               f'or names from {list(known)} (extra rows: ablation.extra)')
  for row in extra:
    if row.name in picked or row.name in known or row.name in ('chain', 'loo'):
      raise errors.ConfigError(f'ablation.extra row name {row.name!r} is taken: rename it')
    picked[row.name] = row
  return list(picked.values())


def row_config(cfg, row: Row, seed_index: int = 0):
  """The distill config of `row` (seed cfg.seed + seed_index)."""
  rcfg = copy.deepcopy(cfg)
  with rcfg.unlocked():
    rcfg.job = 'distill'
    for key, value in row.overrides().items():
      _set(rcfg, key, value)
    rcfg.seed = int(cfg.seed) + int(seed_index)
  return rcfg


# Sections and fields that do not change the distilled networks (sampler.kind is what separates
# full from with_regularisation; the rest of `sampler` feeds the periodic in-training samples).
_NOT_TRAINING = ('job', 'sample', 'eval', 'sweep', 'ablation', 'compare', 'logging')


# Settings added after runs were recorded, with the value every earlier run had: left out of the
# key at that value, so a row trained before they existed is still recognised (and reused).
_LATE_DEFAULTS = {('distill', 'reward_source'): 'discriminator',
                  ('distill', 'reward_judge'): 'demo-bytes'}


def training_key(rcfg) -> dict:
  """The settings a distillation depends on (rows with equal keys share one run)."""
  d = json.loads(json.dumps(rcfg.to_dict(), default=artifacts.json_default))
  for k in _NOT_TRAINING:
    d.pop(k, None)
  d.get('sampler', {}).pop('kind', None)
  for (section, name), value in _LATE_DEFAULTS.items():
    if d.get(section, {}).get(name, value) == value:
      d.get(section, {}).pop(name, None)
  return d


def row_sampler(rcfg) -> str:
  return 'rgas' if rcfg.sampler.kind == 'rgas' else 'ancestral'


def seeds(cfg) -> list[int]:
  return [int(cfg.seed) + k for k in range(int(cfg.ablation.seeds))]


def check(cfg) -> list[Row]:
  """Everything the ablation needs, before any work: rows, their configs, the teacher."""
  if not cfg.teacher.checkpoint:
    raise errors.ConfigError('the ablate job distils a given teacher: set '
                             '--config.teacher.checkpoint (a pretrain workdir or a file)')
  rows = select_rows(cfg)
  for row in rows:
    rcfg = row_config(cfg, row)
    try:
      config_lib.validate(rcfg)
    except errors.ConfigError as e:
      raise errors.ConfigError(f'ablation row {row.name!r}: {e}') from None
  nfes = config_lib.parse_nfes(cfg.sweep.nfes, 'sweep.nfes')
  if not nfes:
    raise errors.ConfigError('--config.sweep.nfes is empty: the ablation sweeps each row at '
                             'these student NFEs, e.g. 8,16')
  return rows


# --------------------------------------------------------------------------------- table maths


def _mean(xs):
  return float(np.mean(xs)) if xs else None


def _delta(value, ref) -> Optional[dict]:
  if value is None or ref is None:
    return None
  return {'abs': value - ref, 'rel': value / ref - 1.0}


def summarize(rows: Sequence[Row], results: Sequence[dict], judge_names: Sequence[str]
              ) -> list[dict]:
  """One entry per (row, NFE) from per-(row, seed, NFE) results.

  A result holds 'row', 'seed', 'nfe', 'entropy', 'entropy_ci' and 'judges': {name: {'gen_ppl',
  'gen_ppl_ci'}}. Per judge the entry has the mean Gen PPL over seeds, the mean of the seeds'
  95% sample intervals, the spread across seeds (sample sd, ddof 1; min, max) and the change
  against the previous chain row present (chain rows only) and against full, as abs and rel.
  """
  by = {}
  for r in results:
    by.setdefault((r['row'], int(r['nfe'])), []).append(r)
  out = []
  for row in rows:
    for nfe in sorted({n for (name, n) in by if name == row.name}):
      rs = sorted(by[(row.name, nfe)], key=lambda r: r['seed'])
      entry = {'row': row.name, 'group': row.group, 'label': row.label, 'nfe': nfe,
               'sampler': rs[0].get('sampler'), 'seeds': [r['seed'] for r in rs],
               'off': list(row.off), 'settings': {k: v for k, v in row.overrides().items()},
               'entropy': _mean([r['entropy'] for r in rs]),
               'entropy_ci': [_mean([r['entropy_ci'][0] for r in rs]),
                              _mean([r['entropy_ci'][1] for r in rs])],
               'entropy_seed_sd': (float(np.std([r['entropy'] for r in rs], ddof=1))
                                   if len(rs) > 1 else None),
               'judges': {}}
      for j in judge_names:
        vals = [r['judges'][j]['gen_ppl'] for r in rs if j in r.get('judges', {})]
        if not vals:
          continue
        cis = [r['judges'][j]['gen_ppl_ci'] for r in rs if j in r.get('judges', {})]
        entry['judges'][j] = {
            'gen_ppl': _mean(vals), 'gen_ppl_ci': [_mean([c[0] for c in cis]),
                                                   _mean([c[1] for c in cis])],
            'per_seed': vals,
            'seed_sd': float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            'seed_range': [float(min(vals)), float(max(vals))]}
      out.append(entry)
  index = {(e['row'], e['nfe']): e for e in out}
  chain_present = [r.name for r in rows if r.group == 'chain']
  for e in out:
    prev = None
    if e['group'] == 'chain':
      i = chain_present.index(e['row'])
      prev = chain_present[i - 1] if i > 0 else None
    for j, rec in e['judges'].items():
      p = index.get((prev, e['nfe'])) if prev else None
      f = index.get((FULL, e['nfe'])) if e['row'] != FULL else None
      rec['previous'] = prev if p is not None else None
      rec['delta_previous'] = _delta(rec['gen_ppl'], p['judges'].get(j, {}).get('gen_ppl')
                                     if p else None)
      rec['delta_full'] = _delta(rec['gen_ppl'], f['judges'].get(j, {}).get('gen_ppl')
                                 if f else None)
  return out


def _fmt_delta(d) -> str:
  if not d:
    return '–'
  return f'{d["abs"]:+.2f} ({100 * d["rel"]:+.1f}%)'


def _fmt_ppl(rec) -> str:
  lo, hi = rec['gen_ppl_ci']
  text = f'{rec["gen_ppl"]:.2f} [{lo:.2f}, {hi:.2f}]'
  if rec.get('seed_sd') is not None:
    text += (f' ±{rec["seed_sd"]:.2f} sd, {len(rec["per_seed"])} seeds '
             f'({rec["seed_range"][0]:.2f}–{rec["seed_range"][1]:.2f})')
  return text


def markdown(entries: Sequence[dict], teacher: Sequence[dict], judge_info: dict, cfg,
             notes: Sequence[str] = ()) -> str:
  """table.md: per judge a compact row × NFE table and the detailed one with the changes."""
  e = cfg.eval
  nfes = sorted({x['nfe'] for x in entries})
  lines = [f'# Ablation — {len({x["row"] for x in entries})} rows, {cfg.distill.num_iterations} '
           f'distillation iterations per row, {e.num_samples} samples per cell, sampling seed '
           f'{e.seed}, run seeds {", ".join(str(s) for s in seeds(cfg))}', '',
           'Gen PPL is the mean over run seeds; [..] the mean of the seeds\' 95% bootstrap '
           'intervals over samples; ±sd the spread across seeds (sample sd) with min–max. '
           'Δ previous: against the previous chain row; Δ full: against full (abs, relative).',
           '']
  for j, info in judge_info.items():
    lines += [f'## Gen PPL, judge {j} (context {info["context"]})', '',
              '| row | sampler | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
              '|---|---|' + '---:|' * len(nfes)]
    for name in dict.fromkeys(x['row'] for x in entries):
      xs = {x['nfe']: x for x in entries if x['row'] == name}
      first = next(iter(xs.values()))
      vals = [f'{xs[n]["judges"][j]["gen_ppl"]:.2f}' if n in xs and j in xs[n]['judges']
              else '–' for n in nfes]
      lines.append(f'| {name}: {first["label"]} | {first["sampler"]} | ' + ' | '.join(vals) + ' |')
    refs = [f'NFE {t["nfe"]}: {_fmt_ppl(t["judges"][j])}' for t in teacher
            if j in t.get('judges', {})]
    if refs:
      lines += ['', f'Teacher (ancestral, computed once): {"; ".join(refs)}.']
    lines += ['', '| row | NFE | Gen PPL [95% CI] | Δ previous | Δ full |', '|---|---:|---|---|---|']
    for x in entries:
      if j not in x['judges']:
        continue
      rec = x['judges'][j]
      prev = f'{_fmt_delta(rec["delta_previous"])}' + (f' vs {rec["previous"]}'
                                                       if rec.get('previous') else '')
      lines.append(f'| {x["row"]} | {x["nfe"]} | {_fmt_ppl(rec)} | {prev} | '
                   f'{_fmt_delta(rec["delta_full"])} |')
    lines.append('')
  lines += ['## Unigram entropy (nats)', '', '| row | NFE | entropy [95% CI] | ±sd across seeds |',
            '|---|---:|---|---|']
  for x in entries:
    sd = '–' if x['entropy_seed_sd'] is None else f'{x["entropy_seed_sd"]:.3f}'
    lines.append(f'| {x["row"]} | {x["nfe"]} | {x["entropy"]:.3f} [{x["entropy_ci"][0]:.3f}, '
                 f'{x["entropy_ci"][1]:.3f}] | {sd} |')
  for t in teacher:
    lines.append(f'| teacher ({t["sampler"]}) | {t["nfe"]} | {t["entropy"]:.3f} '
                 f'[{t["entropy_ci"][0]:.3f}, {t["entropy_ci"][1]:.3f}] | – |')
  lines += ['', '## Rows', '', '| row | techniques off | settings |', '|---|---|---|']
  seen = set()
  for x in entries:
    if x['row'] in seen:
      continue
    seen.add(x['row'])
    sets = ', '.join(f'{k}={v}' for k, v in x['settings'].items())
    lines.append(f'| {x["row"]} | {", ".join(x["off"]) or "none"} | {sets} |')
  lines += [''] + [f'Note: {n}' for n in notes]
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------- job


def _latest_step(workdir: str) -> Optional[int]:
  return sweep._latest_step(workdir)  # pylint: disable=protected-access


def _diff_keys(a, b, prefix='') -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      keys += _diff_keys(va, vb, f'{prefix}{k}.')
    elif va != vb:
      keys.append(f'{prefix}{k}')
  return keys


def plan_runs(cfg, rows: Sequence[Row], out_dir: str) -> dict:
  """{(row name, seed): distill workdir}: an existing run with the same training settings is
  reused (row.json), rows with equal settings share one; a row dir trained with other settings
  is an error (before any work)."""
  existing = {}
  for marker in sorted(glob.glob(os.path.join(out_dir, ROWS_DIR, '*', 'seed*', ROW_MARKER))):
    with open(marker, encoding='utf-8') as f:
      rec = json.load(f)
    existing[os.path.dirname(marker)] = rec['training']
  runs = {}
  for row in rows:
    for k, s in enumerate(seeds(cfg)):
      key = training_key(row_config(cfg, row, k))
      same = next((d for d, t in existing.items() if t == key), None)
      if same is None:
        same = os.path.join(out_dir, ROWS_DIR, row.name, f'seed{s}')
        if same in existing:
          diff = _diff_keys(existing[same], key)
          raise errors.ConfigError(
              f'{same} was distilled with other settings (differs in {", ".join(diff[:5])}): '
              'move it away, or use another --workdir for this ablation')
        existing[same] = key
      runs[(row.name, s)] = same
  return runs


def _write_marker(path: str, row: Row, seed: int, key: dict) -> None:
  marker = os.path.join(path, ROW_MARKER)
  if not os.path.exists(marker):
    artifacts.write_json(marker, {'row': row.name, 'seed': seed, 'training': key})


def _result(row_name, seed, row_dict, judge_names) -> dict:
  js = row_dict.get('judges') or {judge_names[0]: {'gen_ppl': row_dict['gen_ppl'],
                                                  'gen_ppl_ci': row_dict['gen_ppl_ci']}}
  return {'row': row_name, 'seed': seed, 'nfe': row_dict['nfe'], 'sampler': row_dict['sampler'],
          'precision': row_dict['precision'], 'entropy': row_dict['entropy'],
          'entropy_ci': row_dict['entropy_ci'], 'judges': js,
          'source': row_dict.get('source'), 'source_step': row_dict.get('source_step')}


class Cells:
  """The sweep cells of the ablation (cells.json), computed once and reused by settings. A row's
  `per_sample` path is relative to the cells' directory (the sweep's `attach_frontier` reads
  every row's from there); with the frontier on, a cell without its per-sample file is computed
  again; with eval.mauve, each row holds its MAUVE record (as the sweep's rows do)."""

  def __init__(self, cfg, out_dir: str):
    self.cfg, self.out_dir, self.path = cfg, out_dir, os.path.join(out_dir, CELLS)
    self.rows = sweep.read_rows(self.path)
    self.judge = None
    self.extra = None
    self.mauve_reference = None
    self.needs_scores = sweep.frontier_on(cfg)
    self.mesh = parallel.make_mesh(cfg.mesh)
    self.computed = self.reused = 0

  def judges(self):
    if self.judge is None:
      e = self.cfg.eval
      self.judge = judges.load_judge(e.judge, int(e.judge_context))
      self.extra = judges.load_extra_judges(e)
      if e.mauve:
        metrics.require_mauve()
        self.mauve_reference = sweep.mauve_reference_features(self.cfg, self.judge)
    return self.judge, self.extra

  def get(self, rcfg, workdir: str, cell: sweep.Cell, models: sweep.Models, label: str) -> dict:
    settings = sweep.cell_settings(rcfg, cell, models.entries[cell.model])
    hit = next((r for r in self.rows if r.get('settings') == settings
                and (not self.needs_scores or sweep.has_scores(r, self.out_dir))), None)
    if hit is not None:
      self.reused += 1
      return hit
    judge, extra = self.judges()
    t0 = time.time()
    row, res = sweep.run_cell(rcfg, workdir, cell, models, judge, self.mesh, extra,
                              mauve_reference=self.mauve_reference)
    row['settings'] = settings
    if row.get('per_sample'):
      row['per_sample'] = os.path.relpath(
          os.path.join(workdir, sweep.SWEEP_DIR, row['per_sample']), self.out_dir)
    self.rows = [r for r in self.rows if r.get('settings') != settings]   # one without scores
    samples.write_samples(rcfg, workdir, res,
                          sweep.cell_name(cell, int(rcfg.eval.seed), prefix='ablation'))
    self.rows.append(row)
    artifacts.write_json(self.path, self.rows)
    self.computed += 1
    ppl = ' | '.join(f'{n} {v["gen_ppl"]:.2f}' for n, v in (row.get('judges') or {
        judge.name: row}).items())
    print(f'ablate {label} {cell.label}: Gen PPL {ppl} | entropy {row["entropy"]:.3f} | '
          f'{time.time() - t0:.1f}s', flush=True)
    return row


def run(cfg, workdir: str) -> dict:
  """The ablate job (see the module docstring); returns a summary with the output paths."""
  rows = check(cfg)
  out_dir = os.path.join(workdir, ABLATION_DIR)
  os.makedirs(out_dir, exist_ok=True)
  judge_names = [cfg.eval.judge] + judges.extra_judge_names(cfg.eval)
  cells = Cells(cfg, out_dir)
  planned = plan(cfg, rows, out_dir)
  done = distill_all(cfg, planned, 'ablate')
  if done.get('stopped'):
    paths = _write_outputs(cfg, out_dir, rows, [], [], judge_names, cells, [done.pop('note')])
    return {**done, **paths}
  if cfg.ablation.stage == 'distill':
    print(f'ablate: {len(done["distilled"])} distilled, {len(done["reused_runs"])} reused; '
          'stage=distill stops here: run the command again without '
          '--config.ablation.stage=distill to evaluate.', flush=True)
    return {'stage': 'distill', **done, 'cells_computed': 0, 'cells_reused': 0}
  teacher_results, results, _ = evaluate_all(cfg, planned, cells, out_dir, judge_names)
  summary = _write_outputs(cfg, out_dir, rows, results, teacher_results, judge_names, cells, [])
  print(f'ablate: {len(rows)} rows × {len(seeds(cfg))} seeds ({len(done["distilled"])} '
        f'distilled, {len(done["reused_runs"])} reused; cells {cells.computed} computed, '
        f'{cells.reused} reused) -> {out_dir}', flush=True)
  return {'rows': [r.name for r in rows], **done, 'cells_computed': cells.computed,
          'cells_reused': cells.reused, **summary}


def plan(cfg, rows: Sequence[Row], out_dir: str) -> list[tuple]:
  """(row, seed, its distill config, its workdir, its progress label) in the order of the
  table, one per row and run seed."""
  runs = plan_runs(cfg, rows, out_dir)
  pairs = [(row, k, s) for row in rows for k, s in enumerate(seeds(cfg))]
  return [(row, s, row_config(cfg, row, k), runs[(row.name, s)],
           f'[{i}/{len(pairs)}] {row.name} seed {s}') for i, (row, k, s) in enumerate(pairs, 1)]


def distill_all(cfg, planned: Sequence[tuple], job: str) -> dict:
  """Stage 1: every planned distillation, in order (no judge is loaded while networks train);
  each method's run through `train.family`. A stopped run ends the stage: the summary then has
  'stopped', 'seed', 'step' and a 'note' for the table."""
  distilled, reused_runs = [], []
  for row, s, rcfg, wd, label in planned:
    os.makedirs(wd, exist_ok=True)
    _write_marker(wd, row, s, training_key(rcfg))
    total = family.total_iterations(rcfg)
    step = _latest_step(wd)
    if step is not None and step >= total:
      print(f'{job} {label}: distillation in {wd} is complete (iteration {step}), reused',
            flush=True)
      reused_runs.append((row.name, s))
      continue
    print(f'{job} {label}: distilling ({family.method(rcfg)}) into {wd}'
          + (f' (resuming at iteration {step})' if step else ''), flush=True)
    out = family.run(rcfg, wd, reward_judge=judges.reward_judge)
    distilled.append((row.name, s))
    if not out.get('complete'):
      print(f'{job}: {row.name} seed {s} stopped at iteration {out.get("step")} of {total}; run '
            'the same command again to resume.', flush=True)
      return {'stopped': row.name, 'seed': s, 'step': out.get('step'), 'distilled': distilled,
              'reused_runs': reused_runs,
              'note': f'stopped in row {row.name} (seed {s}) at iteration {out.get("step")}: no '
                      'row is evaluated until every distillation is complete'}
  return {'distilled': distilled, 'reused_runs': reused_runs}


def teacher_cells(cfg) -> list:
  """The ablation's teacher cells: ancestral at every sweep.teacher_nfes and precision (none when
  sweep.models leaves the teacher out)."""
  if 'teacher' not in config_lib.parse_list(cfg.sweep.models, 'sweep.models'):
    return []
  precisions = config_lib.parse_list(cfg.sweep.precisions, 'sweep.precisions',
                                     config_lib.PRECISIONS)
  return [sweep.Cell('teacher', 'ancestral', n, p)
          for n in config_lib.parse_nfes(cfg.sweep.teacher_nfes, 'sweep.teacher_nfes')
          for p in precisions]


def evaluate_all(cfg, planned: Sequence[tuple], cells: 'Cells', out_dir: str,
                 judge_names: Sequence[str], teacher: Optional[Sequence] = None):
  """Stage 2: the teacher's cells (`teacher`, default `teacher_cells(cfg)`; once for every
  row), then each row's student cells at its sampler. Returns (teacher results, row results,
  the sweep rows of every cell, each labelled with its model: 'teacher' or the row's name)."""
  precisions = config_lib.parse_list(cfg.sweep.precisions, 'sweep.precisions',
                                     config_lib.PRECISIONS)
  teacher_results, results, sweep_rows = [], [], []
  teacher = teacher_cells(cfg) if teacher is None else teacher
  if teacher:
    tmodels = sweep.Models(cfg, out_dir)
    tmodels.resolve('teacher')
    for cell in teacher:
      r = cells.get(cfg, out_dir, cell, tmodels, 'teacher')
      teacher_results.append(_result('teacher', int(cfg.seed), r, judge_names))
      sweep_rows.append(r)
  for row, s, rcfg, wd, label in planned:
    with rcfg.unlocked():
      rcfg.sample.checkpoint = wd
    models = sweep.Models(rcfg, wd)
    models.resolve('student')
    sampler = row_sampler(rcfg)
    for n in config_lib.parse_nfes(cfg.sweep.nfes, 'sweep.nfes'):
      for p in precisions:
        r = cells.get(rcfg, wd, sweep.Cell('student', sampler, n, p), models, label)
        results.append(_result(row.name, s, r, judge_names))
        sweep_rows.append({**r, 'model': row.name})
  return teacher_results, results, sweep_rows


def _write_outputs(cfg, out_dir, rows, results, teacher_results, judge_names, cells, notes):
  entries = summarize(rows, results, judge_names)
  info = {cfg.eval.judge: {'context': int(cfg.eval.judge_context)}}
  for j in (cells.extra or []):
    info[j.name] = {'context': int(j.context)}
  for j in judge_names:
    info.setdefault(j, {'context': '–'})
  teacher = list(teacher_results)
  md = markdown(entries, teacher, info, cfg, notes)
  paths = {'table': os.path.join(out_dir, TABLE_MD), 'table_json': os.path.join(out_dir,
                                                                              TABLE_JSON),
           'plot': os.path.join(out_dir, PLOT)}
  with open(paths['table'] + '.tmp', 'w', encoding='utf-8') as f:
    f.write(md)
  os.replace(paths['table'] + '.tmp', paths['table'])
  artifacts.write_json(paths['table_json'], {'judges': info, 'entries': entries,
                                             'teacher': teacher, 'results': results,
                                             'notes': list(notes)})
  if entries:
    plots.ablation(entries, teacher, list(info), paths['plot'],
                   title=f'{cfg.distill.num_iterations} iterations per row, '
                         f'{cfg.eval.num_samples} samples per point')
  return paths
