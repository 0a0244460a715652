"""The `compare` job: DiDi-Instruct and SDTT distilled from the same teacher with comparable
compute, then one sweep over the teacher, both students (ancestral) and DiDi's student with RGAS,
in one table and one figure (README "DiDi-Instruct against SDTT"; docs/method.md §14).

Compute (`compare.budget`): 'flops' (default) gives SDTT as many training model FLOPs as DiDi's
`distill.num_iterations` use, by the counts of `didi_jax.bench` (DiDi: the student's two-step
rollout forward and backward, the teacher's KL forwards, the discriminator's forward, backward
and a whole reward forward, as in the recorded comparisons, though the reward pass now runs only
the trainable blocks (docs/method.md §14.4); SDTT: two teacher forwards and the student's forward and backward per row,
`sdtt.flops_per_iteration`); 'iterations' gives SDTT DiDi's iteration count; 'config' keeps
`distill.sdtt.round_iterations` as given. The total is split evenly over `distill.sdtt.rounds`.

It is the ablation's machinery with three fixed rows (didi_jax/ablation.py): every distillation
is an ordinary resumable workdir WORKDIR/compare/rows/<row>/seed<S>/ (DiDi's ancestral and RGAS
rows share one run), all distillations run before any cell is judged, cells are reused by
settings (WORKDIR/compare/cells.json), and a killed job resumes where it stopped. The teacher's
cells are the sweep's own plan for the teacher (`sweep.plan`), and the table is the sweep's own
(`sweep.markdown` over every cell, the teacher's and each row's, the row name as the model), so
teacher rows and columns the sweep gains appear here too: with `sweep.frontier_temperatures` the
teacher's temperature rows and each student row's gap to that frontier per judge
(`sweep.attach_frontier`, from the per-sample scores the cells keep), with `eval.mauve` each
row's MAUVE; the figure is the sweep's curve (its Gen PPL-against-entropy panel draws the
frontier). Outputs: WORKDIR/compare/{table.md, table.json, curve.png}.
"""
from __future__ import annotations

import copy
import math
import os

from didi_jax import ablation, artifacts, bench, errors
from didi_jax import config as config_lib
from didi_jax.distill import didi, sdtt
from didi_jax.evaluation import judges, plots, sweep
from didi_jax.train import family

COMPARE_DIR = 'compare'
TABLE, TABLE_JSON, CURVE = 'table.md', 'table.json', 'curve.png'


def didi_flops(cfg) -> float:
  """Model FLOPs of DiDi's whole distillation (`distill.num_iterations` iterations)."""
  d = cfg.distill
  per = bench.distill_flops(cfg.model, int(d.batch_size), int(d.group_size),
                            int(d.disc_unfreeze_blocks), kl_on=didi.kl_enabled(d))['total']
  return per * int(d.num_iterations)


def sdtt_round_iterations(cfg) -> int:
  """SDTT's iterations per round under `compare.budget` (see the module docstring)."""
  s = cfg.distill.sdtt
  budget = cfg.compare.budget
  if budget == 'config':
    return int(s.round_iterations)
  if budget == 'iterations':
    total = int(cfg.distill.num_iterations)
  else:
    total = didi_flops(cfg) / sdtt.flops_per_iteration(cfg.model, int(s.batch_size))
  return max(1, math.ceil(total / int(s.rounds)))


def rows(cfg) -> list[ablation.Row]:
  """didi (ancestral), didi_rgas (when compare.rgas) and sdtt (ancestral), as ablation rows."""
  r_it = sdtt_round_iterations(cfg)
  out = [ablation.Row('didi', 'compare', 'DiDi-Instruct, ancestral', (),
                      (('sampler.kind', 'ancestral'),))]
  if cfg.compare.rgas:
    out.append(ablation.Row('didi_rgas', 'compare', 'DiDi-Instruct + RGAS', (),
                            (('sampler.kind', 'rgas'),)))
  out.append(ablation.Row(
      'sdtt', 'compare', f'SDTT, {cfg.distill.sdtt.rounds} rounds × {r_it} iterations, ancestral',
      (), (('distill.method', 'sdtt'), ('sampler.kind', 'ancestral'),
           ('distill.sdtt.round_iterations', r_it))))
  return out


def check(cfg) -> list[ablation.Row]:
  """Everything the comparison needs, before any work: the teacher, each row's config, NFEs."""
  if not cfg.teacher.checkpoint:
    raise errors.ConfigError('the compare job distils a given teacher: set '
                             '--config.teacher.checkpoint (a pretrain workdir or a file)')
  out = rows(cfg)
  for row in out:
    try:
      config_lib.validate(ablation.row_config(cfg, row))
    except errors.ConfigError as e:
      raise errors.ConfigError(f'compare row {row.name!r}: {e}') from None
  if not config_lib.parse_nfes(cfg.sweep.nfes, 'sweep.nfes'):
    raise errors.ConfigError('--config.sweep.nfes is empty: the comparison sweeps each student '
                             'at these NFEs, e.g. 8,16')
  return out


def teacher_cells(cfg, out_dir: str) -> list:
  """The teacher's cells as the sweep plans them (`sweep.plan` with the teacher alone), so every
  teacher row the sweep computes, at every NFE, sampler and precision, is in the table."""
  if 'teacher' not in config_lib.parse_list(cfg.sweep.models, 'sweep.models'):
    return []
  tcfg = copy.deepcopy(cfg)
  with tcfg.unlocked():
    tcfg.sweep.models = 'teacher'
  return sweep.plan(tcfg, sweep.Models(tcfg, out_dir))[0]   # (teacher × rgas is skipped)


def header(cfg, planned) -> list[str]:
  """What was compared and with how much compute, above the sweep's table."""
  lines = [f'# DiDi-Instruct against SDTT, teacher {cfg.teacher.checkpoint}', '',
           f'Compute: compare.budget={cfg.compare.budget!r}.']
  for row, _, rcfg, wd, _ in planned:
    if row.name == 'didi_rgas':
      continue
    it = family.total_iterations(rcfg)
    if family.method(rcfg) == 'sdtt':
      flops = sdtt.flops_per_iteration(rcfg.model, int(rcfg.distill.sdtt.batch_size)) * it
    else:
      flops = didi_flops(rcfg)
    lines.append(f'- {row.name}: {row.label}; {it} iterations, {flops / 1e12:.4g} training '
                 f'TFLOPs (model FLOPs, didi_jax.bench counts); run in {wd}')
  temps = config_lib.parse_temperatures(cfg.sweep.frontier_temperatures,
                                        'sweep.frontier_temperatures')
  frontier = (f'; the teacher also at T={",".join(f"{t:g}" for t in temps)} (its entropy '
              'frontier: each student row\'s gap to it per judge)' if temps else '')
  return lines + ['', f'Rows: teacher (ancestral){frontier}, each student at its sampler; '
                  'model = the row.', '']


def run(cfg, workdir: str) -> dict:
  """The compare job (see the module docstring); returns a summary with the output paths."""
  rs = check(cfg)
  out_dir = os.path.join(workdir, COMPARE_DIR)
  os.makedirs(out_dir, exist_ok=True)
  judge_names = [cfg.eval.judge] + judges.extra_judge_names(cfg.eval)
  planned = ablation.plan(cfg, rs, out_dir)
  done = ablation.distill_all(cfg, planned, 'compare')
  if done.get('stopped'):
    done.pop('note')
    return done
  cells = ablation.Cells(cfg, out_dir)
  _, _, rows_ = ablation.evaluate_all(cfg, planned, cells, out_dir, judge_names,
                                      teacher_cells(cfg, out_dir))
  if sweep.frontier_on(cfg):       # each student row's gap to the teacher's frontier, per judge
    sweep.attach_frontier(rows_, cfg, out_dir)
  judge, extra = cells.judges()
  e = cfg.eval
  references = {n: sweep.data_reference(cfg, n, judge, extra)
                for n in sorted({int(r['length']) for r in rows_ if r.get('length')})}
  paths = {'table': os.path.join(out_dir, TABLE), 'table_json': os.path.join(out_dir, TABLE_JSON),
           'curve': os.path.join(out_dir, CURVE)}
  text = '\n'.join(header(cfg, planned)) + sweep.markdown(rows_, cfg, references, [])
  with open(paths['table'] + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(paths['table'] + '.tmp', paths['table'])
  artifacts.write_json(paths['table_json'], {'rows': rows_, 'header': header(cfg, planned),
                                             'references': {str(k): v for k, v in
                                                            references.items()}})
  ref = references[max(references)] if references else {}
  plots.curve(rows_, paths['curve'], x='nfe',
              title=f'DiDi-Instruct vs SDTT; judge {", ".join(judge_names)}, '
                    f'{e.num_samples} samples per point',
              data_entropy=ref.get('entropy'), data_gen_ppl=ref.get('gen_ppl'),
              data_gen_ppl_judges={j: v['gen_ppl'] for j, v in (ref.get('judges') or {}).items()})
  print(f'compare: {len(rows_)} cells ({cells.computed} computed, {cells.reused} reused) -> '
        f'{paths["table"]}', flush=True)
  return {'rows': [r.name for r in rs], **done, 'cells_computed': cells.computed,
          'cells_reused': cells.reused, **paths}
