"""The `sweep` job (docs/method.md §12): Gen PPL and entropy over models × samplers × NFEs × precisions.

Grid (config section `sweep`):
  models      teacher | student | ar  (the teacher from `network_source`, the student and its
              discriminator from this workdir — a distillation run — or `sample.checkpoint`,
              the AR baseline from `sweep.ar_checkpoint`)
  samplers    ancestral (DDPM-cache off) | cached (cache on) | rgas (student only)
  nfes        student NFEs; `teacher_nfes` for the teacher; the AR row has nfe = L (KV cache)
  precisions  float32 | float64 (float64 rows run under a scoped `jax.enable_x64`)

Every row draws `eval.num_samples` samples with seed `eval.seed` (batch `sample.batch_size`) and is
judged by one judge loaded once (plus the further judges of `eval.extra_judges`, whose Gen PPL
goes to each row's `judges` record and to extra table columns). Outputs in WORKDIR/sweep/:
results.json (rows), results.md (table), curve.png (Gen PPL and entropy vs NFE) and
curve_flops.png (vs TFLOPs per sample), per_sample/ (each row's per-sample judge scores and
entropies). A row whose settings equal a row already in results.json is reused, so a killed sweep
continues where it stopped; rows of an earlier grid that no longer match go to results.stale.json.

Teacher frontier (`sweep.frontier_temperatures`, docs/method.md §12.1): the teacher also runs at
each listed temperature at every teacher NFE, and every non-teacher row gets `frontier`: per judge,
the teacher's Gen PPL interpolated at the row's entropy and the gap with its bootstrap interval
(recomputed from per_sample/ at the end of every run); the curve gets a Gen PPL-against-entropy
panel. MAUVE (`eval.mauve`, §12.2): each row's `mauve` record, against validation blocks of the
same length on the primary judge's features, with its protocol.

Protein data (`data.tokenizer` 'protein' | 'esm'): no judge is loaded; each row holds the protein
metrics of `evaluation.protein_sweep` (composition KL / JS and lengths vs the training data,
diversity, repetition, the teacher's NELBO of the samples, pLDDT when `eval.structure_scorer` is
set), results.md is the protein table and curve.png plots teacher NELBO and composition JS vs NFE.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from didi_jax import artifacts, parallel, samples
from didi_jax import config as config_lib
from didi_jax.checkpoint import hub
from didi_jax.checkpoint import loader
from didi_jax.data import pipeline
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.evaluation import evaluate, frontier, judges, metrics, plots, protein_sweep
from didi_jax.sampling import ar
from didi_jax.sampling import categorical, cost as cost_lib, runner
from didi_jax.train import common

MODELS = config_lib.SWEEP_MODELS
SAMPLERS = config_lib.SWEEP_SAMPLERS
PRECISIONS = config_lib.PRECISIONS
SWEEP_DIR = 'sweep'        # WORKDIR/sweep: the job's outputs, each row's per-sample scores
RESULTS, TABLE, STALE = 'results.json', 'results.md', 'results.stale.json'
CURVE, CURVE_FLOPS = 'curve.png', 'curve_flops.png'


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of the grid."""
  model: str        # teacher | student | ar
  sampler: str      # ancestral | cached | rgas | ar
  nfe: int
  precision: str
  temperature: Optional[float] = None   # None: sampler.temperature; set for frontier rows

  @property
  def label(self) -> str:
    temp = '' if self.temperature is None else f' T={self.temperature:g}'
    return f'{self.model} {self.sampler} nfe={self.nfe} {self.precision}{temp}'

  @property
  def weight(self) -> float:
    """Relative cost for the ETA: network calls, RGAS about 3× an ancestral step, an AR
    one-token KV-cache step about 1/8 of a full-sequence call."""
    if self.sampler == 'ar':
      return 1.0 + self.nfe / 8.0
    return (self.nfe + 1) * (3.0 if self.sampler == 'rgas' else 1.0)


def parse_list(text: str, key: str, choices: Optional[tuple] = None) -> list[str]:
  return config_lib.parse_list(text, f'sweep.{key}', choices)


def parse_nfes(text: str, key: str) -> list[int]:
  return config_lib.parse_nfes(text, f'sweep.{key}')


# ---------------------------------------------------------------------------------- networks


def _latest_step(source: str) -> Optional[int]:
  ckpt = loader.checkpoint_dir(source)
  if ckpt is None:
    return None
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()]
  return max(steps) if steps else None


def _workdir_job(source: str) -> Optional[str]:
  """'pretrain' / 'distill' for a didi_jax workdir, None for other sources."""
  if loader.checkpoint_dir(source) is None:
    return None
  _, mngr = loader.read_workdir_config(source)
  try:
    return mngr.read_meta().get('job')
  finally:
    mngr.close()


@dataclasses.dataclass
class ModelEntry:
  """A model of the sweep: where it comes from and, once loaded, its networks."""
  name: str
  role: str                    # network role passed to the loaders
  source: str
  step: Optional[int]
  length: Optional[int] = None
  nets: Optional[tuple] = None         # (denoiser, discriminator or None) / (GPT2, model_cfg)
  disc_error: str = ''


class Models:
  """Resolves sources up front (cheap) and loads each network once, on first use."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.entries: dict[str, ModelEntry] = {}

  def resolve(self, name: str) -> ModelEntry:
    """The entry of model `name`; raises ValueError/FileNotFoundError with the fix when the
    model cannot be swept here."""
    cfg, workdir = self.cfg, self.workdir
    if name == 'teacher':
      source = samples.network_source(cfg, workdir, 'teacher')
      if _workdir_job(source) == 'distill':
        raise ValueError(f'the teacher source {source} is a distillation run (its networks are the '
                         'student): set --config.teacher.checkpoint to the teacher')
      entry = ModelEntry('teacher', 'teacher', source, _latest_step(source))
    elif name == 'student':
      role = cfg.sampler.network if cfg.sampler.network in ('student', 'student_ema') \
          else 'student_ema'
      source = samples.network_source(cfg, workdir, role, cfg.sample.checkpoint)
      if _workdir_job(source) == 'pretrain':
        raise ValueError(f'{source} is a pre-training run and holds no student: run the distill '
                         'job there, or set --config.sample.checkpoint to a distillation run')
      entry = ModelEntry('student', role, source, _latest_step(source))
    else:
      source = cfg.sweep.ar_checkpoint
      if not source:
        raise ValueError('no AR baseline: set --config.sweep.ar_checkpoint to a model.kind=ar '
                         'pretrain workdir (or gpt2 / hf:ORG/NAME / a HF GPT-2 dir)')
      if loader.checkpoint_dir(source) is not None:
        acfg, mngr = loader.read_workdir_config(source)
        mngr.close()
        if acfg.model.kind != 'ar':
          raise ValueError(f'sweep.ar_checkpoint={source} holds a {acfg.model.kind!r} model: '
                           'point it at a model.kind=ar pretrain run')
        length = int(acfg.model.length)
      else:
        if cfg.data.tokenizer != 'gpt2':
          raise ValueError(f'the HF AR baseline {source} uses GPT-2 BPE but data.tokenizer is '
                           f'{cfg.data.tokenizer!r}: use a didi_jax AR run with that tokenizer')
        length = int(cfg.model.length)
      entry = ModelEntry('ar', 'ar', source, _latest_step(source), length=length)
    self.entries[name] = entry
    return entry

  def networks_for(self, name: str, need_disc: bool):
    entry = self.entries[name]
    if entry.nets is None:
      t0 = time.time()
      if name == 'ar':
        entry.nets = self._load_ar(entry)
      else:
        den, _ = samples.load_sampling_networks(self.cfg, self.workdir, entry.role, 'ancestral',
                                             entry.source)
        entry.nets = (den, None)
        entry.length = int(den.model_cfg.length)
      print(f'sweep: loaded {name} ({entry.role}) from {entry.source} in '
            f'{time.time() - t0:.1f}s', flush=True)
    if need_disc and entry.nets[1] is None and not entry.disc_error:
      try:
        entry.nets = (entry.nets[0], loader.load(entry.source, 'discriminator'))
      except (FileNotFoundError, ValueError, KeyError) as err:
        entry.disc_error = f'no discriminator in {entry.source}: {err}'
    if need_disc and entry.disc_error:
      raise ValueError(entry.disc_error)
    return entry.nets

  def _load_ar(self, entry: ModelEntry):
    tok = get_tokenizer(self.cfg.data.tokenizer)
    if loader.checkpoint_dir(entry.source) is not None:
      net = loader.load(entry.source, 'ar', weights=self.cfg.teacher.weights)
      model, model_cfg = net.model(), net.model_cfg
    else:
      model = hub.load_gpt2(entry.source)
      c = model.cfg
      model_cfg = ml_collections.ConfigDict(dict(
          kind='ar', hidden_size=c.d_model, n_blocks=c.n_layer, n_heads=c.n_head,
          mlp_dim=c.d_mlp, vocab_size=c.vocab_size, length=entry.length))
    if int(model_cfg.vocab_size) != tok.vocab_size:
      raise ValueError(f'the AR baseline has vocabulary {model_cfg.vocab_size} but tokenizer '
                       f'{self.cfg.data.tokenizer!r} has {tok.vocab_size}: set '
                       '--config.data.tokenizer to the one it was trained with')
    return model, model_cfg


# ------------------------------------------------------------------------------------ grid


def plan(cfg, models: Models) -> tuple[list[Cell], list[str]]:
  """(cells to run, skip reasons) for the configured grid."""
  s = cfg.sweep
  names = parse_list(s.models, 'models', MODELS)
  samplers = parse_list(s.samplers, 'samplers', SAMPLERS)
  precisions = parse_list(s.precisions, 'precisions', PRECISIONS)
  nfes, teacher_nfes = parse_nfes(s.nfes, 'nfes'), parse_nfes(s.teacher_nfes, 'teacher_nfes')
  temps = config_lib.parse_temperatures(s.frontier_temperatures, 'sweep.frontier_temperatures')
  if not names or not precisions:
    raise ValueError('the sweep grid is empty: set --config.sweep.models and sweep.precisions')
  cells, skipped = [], []
  for name in names:
    try:
      entry = models.resolve(name)
    except (FileNotFoundError, ValueError) as err:
      skipped.append(f'{name}: {err}')
      continue
    if name == 'ar':
      cells += [Cell('ar', 'ar', int(entry.length), p) for p in precisions]
      continue
    if not samplers:
      raise ValueError('--config.sweep.samplers is empty: use a comma list of '
                       f'{list(SAMPLERS)}')
    for sampler in samplers:
      if name == 'teacher' and sampler == 'rgas':
        skipped.append('teacher × rgas: a teacher has no discriminator (RGAS is for the student)')
        continue
      for p in precisions:
        cells += [Cell(name, sampler, n, p) for n in (teacher_nfes if name == 'teacher' else nfes)]
  if temps:
    cells += frontier_cells(cfg, models, cells, temps, samplers, precisions, teacher_nfes,
                            skipped)
  return cells, skipped


def frontier_cells(cfg, models: Models, cells: list[Cell], temps: list[float], samplers,
                   precisions, teacher_nfes, skipped: list[str]) -> list[Cell]:
  """The teacher at every frontier temperature × teacher NFE × precision (docs/method.md §12.1),
  drawn with the grid's first plain sampler (ancestral / cached: the same law); a temperature
  that a grid row already draws at is not drawn twice."""
  if 'teacher' not in models.entries:
    try:
      models.resolve('teacher')
    except (FileNotFoundError, ValueError) as err:
      skipped.append(f'teacher frontier: {err}')
      return []
  sampler = next((x for x in samplers if x in ('ancestral', 'cached')), 'ancestral')
  grid_temp = float(cfg.sampler.temperature)
  have = {(c.sampler, c.nfe, c.precision) for c in cells if c.model == 'teacher'}
  out = []
  for p in precisions:
    for n in teacher_nfes:
      for t in temps:
        if t == grid_temp and (sampler, n, p) in have:
          continue
        out.append(Cell('teacher', sampler, n, p, temperature=t))
  return out


def row_sampler_config(cfg, cell: Cell):
  """cfg.sampler with the cell's kind, steps, cache and precision."""
  sc = copy.deepcopy(cfg.sampler)
  with sc.unlocked():
    sc.kind = 'rgas' if cell.sampler == 'rgas' else 'ancestral'
    sc.steps = int(cell.nfe)
    sc.precision = cell.precision
    if cell.temperature is not None:
      sc.temperature = float(cell.temperature)
    if cell.sampler in ('ancestral', 'cached'):
      sc.cache = cell.sampler == 'cached'
  return sc


def _x64(cell: Cell):
  return jax.enable_x64(True) if cell.precision == 'float64' else contextlib.nullcontext()


def cell_settings(cfg, cell: Cell, entry: ModelEntry, teacher_source: str = '') -> dict:
  """Everything that moves a row's numbers (the resume key), JSON-normalised."""
  sc = row_sampler_config(cfg, cell)
  with _x64(cell):
    x64 = bool(jax.config.jax_enable_x64)
  if cell.model == 'ar':
    sampler = {'sampler': 'ar', 'nfe': cell.nfe,
               'regime': categorical.Regime.from_config(sc).as_dict(),
               'top_p': float(sc.top_p), 'temperature': float(sc.temperature)}
  else:
    sampler = runner.sampler_settings(sc, entry.role, cell.nfe)
    sampler['t_min'] = float(sc.t_min)
    sampler['sparse_capacity'] = float(sc.get('sparse_capacity', 0.0))
  e = cfg.eval
  out = {'model': cell.model, 'sampler_name': cell.sampler, 'nfe': cell.nfe,
         'precision': cell.precision, 'network': entry.role, 'source': entry.source,
         'source_step': entry.step, 'teacher_weights': cfg.teacher.weights,
         'num_samples': int(e.num_samples), 'seed': int(e.seed),
         'batch_size': int(cfg.sample.batch_size), 'judge': e.judge,
         'judge_context': int(e.judge_context), 'judge_group_size': int(cfg.sample.batch_size),
         'bootstrap': int(e.bootstrap), 'x64': x64, 'sampler': sampler}
  if config_lib.is_protein(cfg):  # no judge: the protein metrics' settings instead
    for key in ('judge', 'judge_context', 'judge_group_size'):
      out.pop(key)
    out['protein'] = {'reference': int(e.protein_reference), 'nelbo_draws': int(e.nelbo_draws),
                      'structure_scorer': str(e.structure_scorer),
                      'teacher': teacher_source}      # the NELBO's teacher
    return json.loads(json.dumps(out, default=artifacts.json_default))
  extra = judges.extra_judge_names(e)
  if extra:                       # only then: rows of earlier sweeps keep their resume key
    out['extra_judges'] = extra
    out['extra_judge_context'] = int(e.get('extra_judge_context', 0))
  if e.get('mauve'):              # likewise
    out['mauve'] = mauve_settings(cfg)
  return json.loads(json.dumps(out, default=artifacts.json_default))


# ------------------------------------------------------------------------------------ rows


def _ar_cost(model_cfg) -> dict:
  """AR with a KV cache: L one-token forwards; attention over t cached positions at step t."""
  L = int(model_cfg.length)
  flops = (cost_lib.trunk_dense_flops(model_cfg) + cost_lib.output_layer_flops(model_cfg)
           + cost_lib.attention_flops(model_cfg) * (L + 1) / (2 * L))
  return {'nfe': L, 'student_forwards': L, 'disc_forwards': 0, 'disc_backwards': 0,
          'network_evaluations': L, 'flops': flops, 'tflops_per_sample': flops / cost_lib.TERA}


def _sample_ar(cfg, cell: Cell, nets, mesh) -> runner.SampleResult:
  del mesh                       # the KV-cache sampler runs replicated
  model, model_cfg = nets
  sc = row_sampler_config(cfg, cell)
  tok = get_tokenizer(cfg.data.tokenizer)
  num, bs, seed = int(cfg.eval.num_samples), int(cfg.sample.batch_size), int(cfg.eval.seed)
  regime = categorical.Regime.from_config(sc)
  categorical.check_precision(regime.precision)
  base = jax.random.PRNGKey(seed)
  outs, t0, compile_s = [], time.time(), 0.0
  for b in range(-(-num // bs)):
    ids = ar.gpt2_generate(model, jax.random.fold_in(base, b), batch_size=bs,
                                  length=int(model_cfg.length), bos_id=tok.eos_id,
                                  temperature=float(sc.temperature), top_p=float(sc.top_p),
                                  regime=regime)
    outs.append(np.asarray(jax.device_get(ids), np.int32))
    if b == 0:                   # the first batch includes compilation
      compile_s = time.time() - t0
      t0 = time.time()
  seconds = time.time() - t0
  n_timed = len(outs) - 1
  if n_timed == 0:               # one batch: its time includes compilation
    seconds, compile_s = compile_s, 0.0
  else:
    seconds *= len(outs) / n_timed
  return runner.SampleResult(
      ids=np.concatenate(outs)[:num], stats={}, cost=_ar_cost(model_cfg), seconds=seconds,
      compile_seconds=compile_s,
      settings={'sampler': 'ar', 'network': 'ar', 'nfe': int(model_cfg.length),
                'regime': regime.as_dict(), 'sigma': None, 'top_p': float(sc.top_p),
                'temperature': float(sc.temperature), 'bos_id': int(tok.eos_id)})


def judge_record(quality: dict, judge) -> dict:
  """The per-judge part of a row: Gen PPL, its interval and the judge's context."""
  return {'gen_ppl': quality['gen_ppl'], 'gen_ppl_ci': list(quality['gen_ppl_ci']),
          'mean_sample_ppl': quality['mean_sample_ppl'],
          'num_judge_tokens': quality['num_judge_tokens'], 'judge_context': int(judge.context)}


def run_cell(cfg, workdir: str, cell: Cell, models: Models, judge, mesh,
             extra_judges=(), proteins=None, mauve_reference=None) -> tuple[dict, object]:
  """Draws and judges one cell; returns (row without settings, SampleResult). With
  `extra_judges` the row also holds `judges`: {name: judge_record} for every judge. With
  `proteins` (a `protein_sweep.Context`; protein data) the row holds the protein metrics and no
  judge is used. Text rows write their per-sample judge scores and entropies to
  sweep/per_sample/ (the frontier's bootstrap reads them); with `mauve_reference` (length ->
  validation features; eval.mauve) the row holds its MAUVE record."""
  entry = models.entries[cell.model]
  nets = models.networks_for(cell.model, need_disc=cell.sampler == 'rgas')
  with _x64(cell):
    x64 = bool(jax.config.jax_enable_x64)
    if cell.model == 'ar':
      res = _sample_ar(cfg, cell, nets, mesh)
    else:
      rcfg = copy.deepcopy(cfg)
      with rcfg.unlocked():
        rcfg.sampler = row_sampler_config(cfg, cell)
      res = samples.draw_samples(rcfg, workdir, network=entry.role,
                              num_samples=int(cfg.eval.num_samples),
                              batch_size=int(cfg.sample.batch_size), seed=int(cfg.eval.seed),
                              explicit=entry.source, nets=nets, mesh=mesh)
  ids = np.asarray(res.ids, np.int32)
  e = cfg.eval
  if proteins is not None:
    row = {'model': cell.model, 'sampler': cell.sampler, 'nfe': cell.nfe,
           'precision': cell.precision, 'network': entry.role, 'source': entry.source,
           'source_step': entry.step, 'length': int(ids.shape[1]),
           **proteins.row_metrics(ids), **evaluate.cost_fields(res.cost),
           'cache_hits': res.stats.get('cache_hits'),
           'seconds': float(res.seconds), 'compile_seconds': float(res.compile_seconds),
           'tokens_per_second': float(ids.size / max(res.seconds, 1e-9)),
           'seed': int(e.seed), 'regime': res.settings.get('regime'),
           'sigma': res.settings.get('sigma'), 'x64': x64}
    return row, res
  texts = samples.decode_all(cfg, ids)
  scores = {judge.name: {}}
  quality = evaluate.sample_quality(judge, ids, texts, group_size=int(cfg.sample.batch_size),
                                    judge_batch_size=int(e.judge_batch_size),
                                    n_bootstrap=int(e.bootstrap), seed=int(e.seed),
                                    per_sample=scores[judge.name])
  settings = res.settings
  row = {'model': cell.model, 'sampler': cell.sampler, 'nfe': cell.nfe,
         'precision': cell.precision, 'network': entry.role, 'source': entry.source,
         'source_step': entry.step, 'length': int(ids.shape[1]), **quality,
         **evaluate.cost_fields(res.cost),
         'cache_hits': res.stats.get('cache_hits'),
         'seconds': float(res.seconds), 'compile_seconds': float(res.compile_seconds),
         'tokens_per_second': float(ids.size / max(res.seconds, 1e-9)),
         'seed': int(e.seed), 'judge': e.judge, 'judge_context': int(e.judge_context),
         'regime': settings.get('regime'), 'sigma': settings.get('sigma'), 'x64': x64,
         'temperature': float(settings.get('temperature', cfg.sampler.temperature))}
  if extra_judges:
    row['judges'] = {e.judge: judge_record(quality, judge)}
    for other in extra_judges:
      scores[other.name] = {}
      q = evaluate.sample_quality(other, ids, texts, group_size=int(cfg.sample.batch_size),
                                  judge_batch_size=int(e.judge_batch_size),
                                  n_bootstrap=int(e.bootstrap), seed=int(e.seed),
                                  per_sample=scores[other.name])
      row['judges'][other.name] = judge_record(q, other)
  row['per_sample'] = write_per_sample(os.path.join(workdir, SWEEP_DIR),
                                       cell_name(cell, int(e.seed)), ids, scores)
  if mauve_reference is not None:
    row['mauve'] = mauve_record(cfg, judge, texts, mauve_reference(int(ids.shape[1])))
  if x64 and cell.precision == 'float64':
    row['note'] = 'jax_enable_x64 on (scoped to this row)'
  return row, res


# ------------------------------------------------------------------------------------ output


def _fmt_ci(v, ci, digits: int) -> str:
  if v is None:
    return '–'
  if not ci:
    return f'{v:.{digits}f}'
  return f'{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]'


def _fmt_frontier(rec: Optional[dict]) -> str:
  """'gap [CI] (teacher F) verdict' of a frontier record (verdict: below / above / tie /
  extrapolated); '–' when the row has no frontier (the record's note says why)."""
  if not rec:
    return ''
  if 'gap' not in rec:
    return '–'
  text = (f'{_fmt_ci(rec["gap"], rec.get("gap_ci"), 2)} (teacher {rec["teacher_gen_ppl"]:.2f}) '
          f'{rec["verdict"]}')
  if rec['verdict'] in ('dominates', 'dominated'):
    text += (f' (end point {rec["end_gen_ppl"]:.2f}: '
             f'{_fmt_ci(rec["end_gap"], rec.get("end_gap_ci"), 2)})')
  return text


def _sampler_label(r: dict) -> str:
  t = frontier.row_temperature(r)
  return r['sampler'] if t == 1.0 else f'{r["sampler"]} T={t:g}'


def markdown(rows: list[dict], cfg, references: dict, skipped: list[str]) -> str:
  """The results table (one line per row) plus the data reference and skipped combinations;
  with a frontier, a gap column per judge; with MAUVE, its column and protocol line."""
  e = cfg.eval
  extra = judges.extra_judge_names(e)
  all_judges = [e.judge] + extra
  has_frontier = any(r.get('frontier') for r in rows)
  has_mauve = any(r.get('mauve') for r in rows)
  gap_heads = [f'gap to teacher frontier {j} [95% CI]' for j in all_judges] if has_frontier else []
  heads = (['model', 'sampler', 'precision', 'NFE', 'student fwd', 'disc fwd / bwd', 'net evals',
            'TFLOPs/sample', 'Gen PPL [95% CI]']
           + [f'Gen PPL {name} [95% CI]' for name in extra] + ['entropy [95% CI]'] + gap_heads
           + (['MAUVE'] if has_mauve else []) + ['rep. 4-gram', 'seconds', 'tok/s'])
  right = {'NFE', 'student fwd', 'disc fwd / bwd', 'net evals', 'TFLOPs/sample', 'MAUVE',
           'rep. 4-gram', 'seconds', 'tok/s'}
  lines = [f'# NFE sweep — judge {e.judge} (context {e.judge_context}), {e.num_samples} samples '
           f'per row, seed {e.seed}', '', '| ' + ' | '.join(heads) + ' |',
           '|' + ''.join('---:|' if h in right else '---|' for h in heads)]
  for r in rows:
    tf = r.get('tflops_per_sample')
    fr = r.get('frontier') or {}
    cells = [r['model'], _sampler_label(r), r['precision'], r['nfe'], r.get('student_forwards'),
             f'{r.get("disc_forwards")} / {r.get("disc_backwards")}',
             r.get('network_evaluations'), '–' if tf is None else f'{tf:.4g}',
             _fmt_ci(r.get('gen_ppl'), r.get('gen_ppl_ci'), 2),
             *(_fmt_ci(r.get('judges', {}).get(name, {}).get('gen_ppl'),
                       r.get('judges', {}).get(name, {}).get('gen_ppl_ci'), 2) for name in extra),
             _fmt_ci(r.get('entropy'), r.get('entropy_ci'), 3),
             *([_fmt_frontier(fr.get(j)) for j in all_judges] if has_frontier else []),
             *([_fmt_ci((r.get('mauve') or {}).get('mauve'), None, 3)] if has_mauve else []),
             f'{r.get("repeated_4gram_rate", float("nan")):.3f}',
             f'{r.get("seconds", 0.0):.2f}', f'{r.get("tokens_per_second", 0.0):,.0f}']
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  lines.append('')
  for length, ref in sorted(references.items()):
    ent = _fmt_ci(ref['entropy'], ref['entropy_ci'], 3)
    ppl = (f', Gen PPL {_fmt_ci(ref["gen_ppl"], ref["gen_ppl_ci"], 2)}'
           if ref.get('gen_ppl') is not None else '')
    for name, other in ref.get('judges', {}).items():
      ppl += f', Gen PPL ({name}) {_fmt_ci(other["gen_ppl"], other["gen_ppl_ci"], 2)}'
    lines.append(f'Data reference: validation blocks score unigram entropy {ent} nats{ppl} '
                 f'({ref["num_blocks"]} blocks of {length} tokens, {ref["source"]}).')
  if rows:
    regimes = sorted({json.dumps(r.get('regime'), sort_keys=True) for r in rows})
    sigmas = sorted({str(r.get('sigma')) for r in rows if r.get('sigma') is not None})
    lines.append(f'Regime(s): {"; ".join(regimes)}. σ convention: {", ".join(sigmas) or "–"}. '
                 'NFE is the paper\'s count (sampler steps; the AR row: L one-token KV-cache '
                 'forwards); student fwd adds noise removal and subtracts cache hits.')
  if has_frontier:
    lines.append(FRONTIER_NOTE)
    notes = {rec['note'] for r in rows for rec in (r.get('frontier') or {}).values()
             if rec.get('note')}
    lines += [f'No frontier (–): {note}' for note in sorted(notes)]
  if has_mauve:
    p = next(r['mauve']['protocol'] for r in rows if r.get('mauve'))
    lines.append(f'MAUVE (mauve-text {p["package"]}): {p["num_samples"]} samples vs '
                 f'{p["num_reference"]} {p["reference"]} of the same length, features of judge '
                 f'{p["judge"]} (context {p["judge_context"]}, {FEATURES[p["feature"]]}, '
                 f'{p["feature_dim"]} dims), {p["buckets"]} k-means clusters, scaling '
                 f'c = {p["scaling"]:g}, seed {p["seed"]}.')
  for reason in skipped:
    lines.append(f'Skipped: {reason}')
  return '\n'.join(lines) + '\n'


FRONTIER_NOTE = (
    'Teacher frontier: the teacher at the same NFE sampled at the temperatures T of the teacher '
    'rows; "teacher" is its Gen PPL at the row\'s entropy (log Gen PPL linear in entropy between '
    'the two bracketing temperatures), the gap is the row\'s Gen PPL minus it (negative: below '
    'the frontier; "below", the row beats the teacher at equal entropy, only when the whole '
    'interval is negative, "tie" when it straddles 0). Outside the frontier\'s entropy range: '
    '"dominates" when the row is hotter than every teacher point and its Gen PPL lies '
    'significantly below the hottest point\'s, "dominated" when it is colder than every point '
    'and significantly above the coldest point\'s (the frontier rises with entropy; "end point" '
    'gives that point\'s Gen PPL and the row\'s difference to it), "extrapolated" otherwise (no '
    'verdict). Interval: bootstrap over the row\'s and the frontier points\' samples.')
FEATURES = {'last': "final-norm hidden state at the last token",
            'mean': 'final-norm hidden states mean-pooled'}


def frontier_on(cfg) -> bool:
  """Whether the teacher's frontier is computed (text data with sweep.frontier_temperatures)."""
  return not config_lib.is_protein(cfg) and bool(config_lib.parse_temperatures(
      cfg.sweep.frontier_temperatures, 'sweep.frontier_temperatures'))


def attach_frontier(rows: list[dict], cfg, out_dir: str) -> dict:
  """Writes each non-teacher row's frontier record per judge into row['frontier'] (recomputed
  every run); returns {judge: {(nfe, precision): [(temperature, Samples)]}}."""
  e = cfg.eval
  read = per_sample_reader(out_dir)
  names = [e.judge] + judges.extra_judge_names(e)
  points = {j: frontier.frontier_points(rows, read, j) for j in names}
  for r in rows:
    r.pop('frontier', None)
    if r.get('model') == 'teacher' or r.get('gen_ppl') is None:
      continue
    key = (int(r['nfe']), r.get('precision', 'float32'))
    r['frontier'] = {j: frontier.row_record(r, points[j].get(key), read, j,
                                            n_bootstrap=int(e.bootstrap), seed=int(e.seed))
                     for j in names}
  return points


def _write_text(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)
  if not isinstance(rows, list):
    raise ValueError(f'{path} is not a list of sweep rows: move it away to start a fresh sweep')
  return rows


def _fmt_eta(seconds: float) -> str:
  return common._fmt_time(seconds)  # pylint: disable=protected-access


def cell_name(cell: Cell, seed: int, prefix: str = 'sweep') -> str:
  """A cell's file name (samples, per-sample scores): one per model, sampler, NFE, precision,
  temperature and seed."""
  temp = '' if cell.temperature is None else f'_T{cell.temperature:g}'
  return f'{prefix}_{cell.model}_{cell.sampler}_nfe{cell.nfe}_{cell.precision}{temp}_seed{seed}'


# ------------------------------------------------------------------- per-sample scores, MAUVE

PER_SAMPLE = 'per_sample'


def write_per_sample(out_dir: str, name: str, ids: np.ndarray, scores: dict) -> str:
  """Writes OUT_DIR/per_sample/NAME.npz (unigram entropy per sample; per judge, in order, the
  counted NLL sum and token count per sample); returns its path relative to OUT_DIR."""
  rel = os.path.join(PER_SAMPLE, name + '.npz')
  path = os.path.join(out_dir, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  names = list(scores)
  tmp = path + '.tmp.npz'
  np.savez(tmp, entropy=samples.unigram_entropy(ids), judges=np.asarray(names, dtype=str),
           nll_sum=np.stack([scores[n]['nll_sum'] for n in names]),
           count=np.stack([scores[n]['count'] for n in names]))
  os.replace(tmp, path)
  return rel


def has_scores(row: dict, out_dir: str) -> bool:
  """Whether a row's per-sample file exists (rows of sweeps before the frontier have none)."""
  return bool(row.get('per_sample')) and os.path.exists(os.path.join(out_dir, row['per_sample']))


def per_sample_reader(out_dir: str):
  """(row, judge) -> frontier.Samples from the row's per-sample file, or None when it has none."""
  cache: dict[str, Optional[dict]] = {}

  def read(row: dict, judge: str):
    rel = row.get('per_sample')
    if not rel:
      return None
    if rel not in cache:
      path = os.path.join(out_dir, rel)
      if os.path.exists(path):
        with np.load(path) as z:
          cache[rel] = {k: z[k] for k in z.files}
      else:
        cache[rel] = None
    z = cache[rel]
    if z is None or judge not in list(z['judges']):
      return None
    j = list(z['judges']).index(judge)
    return frontier.Samples(z['nll_sum'][j], z['count'][j], z['entropy'])
  return read


def mauve_settings(cfg) -> dict:
  """The MAUVE protocol's settings (the resume key's part and the record's)."""
  e = cfg.eval
  return {'judge': e.judge, 'judge_context': int(e.judge_context), 'feature': e.mauve_feature,
          'buckets': int(e.mauve_buckets), 'scaling': float(e.mauve_scaling),
          'seed': int(e.seed), 'reference': 'validation blocks'}


def mauve_reference_features(cfg, judge):
  """length -> the judge's features of `eval.num_samples` validation blocks of that length
  (computed once per length)."""
  cache: dict[int, np.ndarray] = {}
  e = cfg.eval

  def get(length: int) -> np.ndarray:
    if length not in cache:
      blocks = pipeline.eval_batches(cfg.data, length, int(e.num_samples), 1)[0]
      cache[length] = judge.features(samples.decode_all(cfg, blocks),
                                     int(e.judge_batch_size), e.mauve_feature)
    return cache[length]
  return get


def mauve_record(cfg, judge, texts, reference: np.ndarray) -> dict:
  """MAUVE of `texts` (the judge's features) against the reference features, with its protocol."""
  e = cfg.eval
  feats = judge.features(texts, int(e.judge_batch_size), e.mauve_feature)
  rec = metrics.mauve(feats, reference, buckets=int(e.mauve_buckets),
                      scaling=float(e.mauve_scaling), seed=int(e.seed))
  rec['protocol'] = dict(mauve_settings(cfg), num_samples=int(feats.shape[0]),
                         num_reference=int(reference.shape[0]),
                         feature_dim=int(feats.shape[1]), **rec.pop('protocol'))
  return rec


def data_reference(cfg, length: int, judge, extra_judges=()) -> dict:
  """evaluate.data_reference under the primary judge, plus `judges`: {name: Gen PPL record} of
  the same validation blocks under each extra judge."""
  e = cfg.eval
  ref = evaluate.data_reference(cfg, length, int(e.num_samples), int(e.bootstrap), int(e.seed),
                                judge, int(cfg.sample.batch_size), int(e.judge_batch_size))
  for other in extra_judges or ():
    q = evaluate.data_reference(cfg, length, int(e.num_samples), int(e.bootstrap), int(e.seed),
                                other, int(cfg.sample.batch_size), int(e.judge_batch_size))
    ref.setdefault('judges', {})[other.name] = {
        'gen_ppl': q['gen_ppl'], 'gen_ppl_ci': q['gen_ppl_ci'], 'judge_context': other.context}
  return ref


# --------------------------------------------------------------------------------------- job


def _protein_context(cfg, models: Models) -> protein_sweep.Context:
  """The protein metrics' context: training reference and the teacher (the NELBO judge-free
  likelihood; loaded once, shared with the teacher's rows)."""
  if 'teacher' not in models.entries:
    models.resolve('teacher')
  teacher = models.networks_for('teacher', need_disc=False)[0]
  return protein_sweep.Context(cfg, teacher.model(), int(teacher.model_cfg.length))


def _finish_protein(cfg, out_dir, rows, skipped, models, proteins, computed, reused,
                    results_path) -> dict:
  reference = None
  if rows:
    proteins = proteins or _protein_context(cfg, models)
    reference = proteins.data_reference()
  _write_text(os.path.join(out_dir, TABLE), protein_sweep.markdown(rows, cfg, reference, skipped))
  artifacts.write_json(os.path.join(out_dir, 'reference.json'), reference or {})
  title = f'proteins, {cfg.eval.num_samples} samples per point'
  series = protein_sweep.curve(rows, os.path.join(out_dir, CURVE), reference=reference,
                               title=title)
  print(f'sweep: {len(rows)} protein rows ({computed} computed, {reused} reused, {len(skipped)} '
        f'skipped) -> {out_dir}', flush=True)
  return {'rows': len(rows), 'computed': computed, 'reused': reused, 'skipped': skipped,
          'results': results_path, 'table': os.path.join(out_dir, TABLE),
          'curve': os.path.join(out_dir, CURVE), 'curve_series': series,
          'reference': reference}


def run(cfg, workdir: str) -> dict:
  """The sweep job (see the module docstring); returns a summary with the output paths."""
  out_dir = os.path.join(workdir, SWEEP_DIR)
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, RESULTS)
  models = Models(cfg, workdir)
  cells, skipped = plan(cfg, models)
  for reason in skipped:
    print(f'sweep: skipping {reason}', flush=True)
  previous = read_rows(results_path)
  unused = list(range(len(previous)))
  mesh = parallel.make_mesh(cfg.mesh)
  judge = None
  extra_judges = None
  mauve_reference = None         # length -> validation features (eval.mauve), with the judge
  protein = config_lib.is_protein(cfg)
  proteins = None                # protein_sweep.Context, made on the first computed row
  teacher_source = ''
  if protein:
    teacher_source = samples.network_source(cfg, workdir, 'teacher')
  # The frontier's bootstrap reads per-sample scores: a row of an older sweep without them is
  # computed again rather than reused.
  needs_scores = frontier_on(cfg)
  rows: list[dict] = []
  computed = reused = 0
  done_weight, elapsed = 0.0, 0.0
  todo_weight = sum(c.weight for c in cells)

  def save():
    pending = [previous[i] for i in unused]
    artifacts.write_json(results_path, rows + pending)

  for i, cell in enumerate(cells):
    entry = models.entries[cell.model]
    settings = cell_settings(cfg, cell, entry, teacher_source)
    hit = next((j for j in unused if previous[j].get('settings') == settings
                and (not needs_scores or has_scores(previous[j], out_dir))), None)
    todo_weight -= cell.weight
    prefix = f'sweep [{i + 1}/{len(cells)}] {cell.label}'
    if hit is not None:
      unused.remove(hit)
      rows.append(previous[hit])
      reused += 1
      key = 'teacher_nelbo' if protein else 'gen_ppl'
      print(f'{prefix}: reused ({key} {previous[hit].get(key, float("nan")):.3f})', flush=True)
      continue
    if protein and proteins is None:
      proteins = _protein_context(cfg, models)
    if judge is None and not protein:
      judge = judges.load_judge(cfg.eval.judge, int(cfg.eval.judge_context))
      extra_judges = judges.load_extra_judges(cfg.eval)
      if cfg.eval.mauve:
        metrics.require_mauve()
        mauve_reference = mauve_reference_features(cfg, judge)
    t0 = time.time()
    try:
      row, res = run_cell(cfg, workdir, cell, models, judge, mesh, extra_judges, proteins,
                          mauve_reference)
    except ValueError as err:
      if cell.sampler == 'rgas' and models.entries[cell.model].disc_error:
        skipped.append(f'{cell.label}: {err}')
        print(f'{prefix}: skipped, {err}', flush=True)
        continue
      raise
    row['settings'] = settings
    rows.append(row)
    samples.write_samples(cfg, workdir, res, cell_name(cell, int(cfg.eval.seed)))
    computed += 1
    dt = time.time() - t0
    elapsed += dt
    done_weight += cell.weight
    eta = elapsed / done_weight * todo_weight if done_weight else float('nan')
    save()
    if protein:
      _write_text(os.path.join(out_dir, TABLE), protein_sweep.markdown(rows, cfg, None, skipped))
      print(f'{prefix}: teacher NELBO {row["teacher_nelbo"]:.3f}/tok | composition JS '
            f'{row["composition_js"]:.4f} | length KS {row["length_ks"]:.3f} | unique '
            f'{row["unique_fraction"]:.2f} | {row["student_forwards"]} fwd | {dt:.1f}s | ETA '
            f'{_fmt_eta(eta)}', flush=True)
      continue
    _write_text(os.path.join(out_dir, TABLE), markdown(rows, cfg, {}, skipped))
    lo, hi = row['gen_ppl_ci']
    mauve_text = f' | MAUVE {row["mauve"]["mauve"]:.3f}' if row.get('mauve') else ''
    print(f'{prefix}: Gen PPL {row["gen_ppl"]:.2f} [{lo:.2f}, {hi:.2f}] | entropy '
          f'{row["entropy"]:.3f}{mauve_text} | {row["student_forwards"]} fwd, '
          f'{row["disc_forwards"]} disc | {dt:.1f}s | ETA {_fmt_eta(eta)}', flush=True)

  stale = [previous[i] for i in unused]
  if not protein:
    if needs_scores:
      attach_frontier(rows, cfg, out_dir)
    else:
      for r in rows:
        r.pop('frontier', None)
  artifacts.write_json(results_path, rows)
  stale_path = os.path.join(out_dir, STALE)
  if stale:
    old = read_rows(stale_path)
    artifacts.write_json(stale_path, old + stale)
    print(f'sweep: {len(stale)} rows of {RESULTS} had other settings: moved to {stale_path}',
          flush=True)

  e = cfg.eval
  if protein:
    return _finish_protein(cfg, out_dir, rows, skipped, models, proteins, computed, reused,
                           results_path)
  references = {}
  for length in sorted({int(r['length']) for r in rows if r.get('length')}):
    if judge is None:
      judge = judges.load_judge(e.judge, int(e.judge_context))
      extra_judges = judges.load_extra_judges(e)
    references[length] = data_reference(cfg, length, judge, extra_judges)
  _write_text(os.path.join(out_dir, TABLE), markdown(rows, cfg, references, skipped))
  ref = references[max(references)] if references else {}
  refs = {'data_entropy': ref.get('entropy'), 'data_gen_ppl': ref.get('gen_ppl'),
          'data_gen_ppl_judges': {j: v['gen_ppl'] for j, v in (ref.get('judges') or {}).items()}}
  title = f'judge {", ".join([e.judge] + judges.extra_judge_names(e))}, {e.num_samples} samples per point'
  curve = plots.curve(rows, os.path.join(out_dir, CURVE), x='nfe', title=title, **refs)
  curve_flops = plots.curve(rows, os.path.join(out_dir, CURVE_FLOPS), x='tflops_per_sample',
                            title=title, **refs)
  print(f'sweep: {len(rows)} rows ({computed} computed, {reused} reused, {len(skipped)} skipped) '
        f'-> {out_dir}', flush=True)
  return {'rows': len(rows), 'computed': computed, 'reused': reused, 'skipped': skipped,
          'results': results_path, 'table': os.path.join(out_dir, TABLE),
          'curve': curve.path, 'curve_flops': curve_flops.path,
          'curve_series': curve.series,
          'data_entropy': {str(k): v['entropy'] for k, v in references.items()},
          'data_gen_ppl': {str(k): v.get('gen_ppl') for k, v in references.items()}}
