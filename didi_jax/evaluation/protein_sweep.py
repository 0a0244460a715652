"""The protein rows of the `sweep` job: judge-free protein metrics instead of Gen PPL.

For protein data (`data.tokenizer` 'protein' | 'esm', `config.is_protein`) no judge is loaded;
every sweep row (model × sampler × NFE) gets, from its generated rows decoded to proteins
(`data.protein.protein_strings`: cut at the first EOS, a leading BOS skipped):

  composition_kl / composition_js   residue composition KL(gen ‖ ref) and Jensen–Shannon (nats)
                                    against `eval.protein_reference` TRAINING records (the first
                                    ones of the cached training rows, in file order)
  length_ks / length_w1             length distribution vs those records (KS statistic; W1 in
                                    residues), mean_length, eos_fraction (rows that ended)
  unique_fraction / mean_identity   diversity (alignment-free positional identity of pairs)
  kmer_repeat / homopolymer_max     3-mer repetition, longest single-residue run (mean and max)
  teacher_nelbo                     the TEACHER's Monte-Carlo MDLM NELBO per token of the
                                    generated rows (`evaluation.protein.denoiser_nelbo`,
                                    `eval.nelbo_draws` noise draws, seed `eval.seed`): a
                                    judge-free likelihood; lower = more teacher-like
  plddt_mean                        only with `eval.structure_scorer` (ESMFold), never faked

The data reference line scores validation records the same way (their composition JS against the
training reference, the teacher's NELBO of validation rows). `curve(...)` plots teacher NELBO and
composition JS against NFE.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from didi_jax.data import pipeline
from didi_jax.data import protein as protein_data
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.evaluation import plots
from didi_jax.evaluation import protein as metrics

STRUCTURE_DEFAULT = 'facebook/esmfold_v1'


def structure_scorer(cfg):
  """The configured StructureScorer, or None ('' = off). Missing packages or weights raise."""
  name = str(cfg.eval.get('structure_scorer', '') or '')
  if not name:
    return None
  return metrics.esmfold_scorer(STRUCTURE_DEFAULT if name == 'esmfold' else name)


class Context:
  """What every protein row needs, computed once: reference proteins, teacher, scorer."""

  def __init__(self, cfg, teacher_model, length: int):
    self.cfg = cfg
    self.tok = get_tokenizer(cfg.data.tokenizer)
    self.length = int(length)
    n = int(cfg.eval.protein_reference)
    train = np.asarray(pipeline.load_blocks(cfg.data, self.length, 'train')[:n], np.int32)
    self.reference_rows = train
    self.reference = protein_data.protein_strings(train, self.tok).sequences
    self.teacher = teacher_model
    self.scorer = structure_scorer(cfg)

  def nelbo(self, ids: np.ndarray) -> dict:
    e = self.cfg.eval
    return metrics.denoiser_nelbo(self.teacher, np.asarray(ids, np.int32),
                                  int(self.cfg.model.vocab_size) - 1,
                                  num_t=int(e.nelbo_draws), seed=int(e.seed),
                                  batch_size=int(self.cfg.sample.batch_size))

  def row_metrics(self, ids: np.ndarray, *, structure: bool = True) -> dict:
    """The flat metric fields of one row (plus `protein`: the full metric record)."""
    ids = np.asarray(ids, np.int32)
    dec = protein_data.protein_strings(ids, self.tok)
    bos = self.tok.bos_id if self.tok.bos_id != self.tok.eos_id else None
    _, has_eos = protein_data.generated_lengths(ids, self.tok.eos_id, bos_id=bos)
    seqs = dec.sequences
    if metrics.residue_counts(seqs)[0].sum():
      full = metrics.protein_metrics(seqs, self.reference, seed=int(self.cfg.eval.seed),
                                     structure_scorer=self.scorer if structure else None)
    else:                 # no standard residue generated (e.g. all rows end at once): no
      nan = math.nan      # composition, the rest as usual
      full = {'num_generated': len(seqs), 'num_reference': len(self.reference),
              'composition': {'kl': nan, 'kl_reverse': nan, 'js': nan,
                              'note': 'no standard residue generated'},
              'length': metrics.length_comparison([len(q) for q in seqs],
                                                  [len(q) for q in self.reference]),
              'diversity': metrics.diversity(seqs, seed=int(self.cfg.eval.seed)),
              'repetition': metrics.repetition(seqs)}
    nelbo = self.nelbo(ids)
    comp, lens, div, rep = (full['composition'], full['length'], full['diversity'],
                            full['repetition'])
    out = {'composition_kl': comp['kl'], 'composition_js': comp['js'],
           'length_ks': lens['ks'], 'length_w1': lens['wasserstein'],
           'mean_length': lens['generated']['mean'], 'eos_fraction': float(np.mean(has_eos)),
           'invalid_tokens': int(dec.invalid_tokens),
           'unique_fraction': div['unique_fraction'], 'mean_identity': div['mean_identity'],
           'kmer_repeat': rep['kmer_repeat'], 'homopolymer_mean': rep['homopolymer_mean'],
           'homopolymer_max': rep['homopolymer_max'],
           'teacher_nelbo': nelbo['per_token'], 'teacher_nelbo_stderr': nelbo['stderr_per_token'],
           'protein': {k: v for k, v in full.items()}}
    out['protein']['teacher_nelbo'] = {k: v for k, v in nelbo.items() if k != 'per_sequence'}
    if 'structure' in full:
      out['plddt_mean'] = full['structure']['plddt_mean']
    return out

  def data_reference(self) -> dict:
    """Validation records scored as a row (the metrics a perfect generator would get)."""
    n = max(int(self.cfg.eval.num_samples), 2)
    rows = np.asarray(pipeline.load_blocks(self.cfg.data, self.length, 'valid')[:n], np.int32)
    out = self.row_metrics(rows, structure=False)
    out.pop('protein')
    out.update(num_rows=int(rows.shape[0]), num_reference=len(self.reference),
               source=self.cfg.data.source, length=self.length)
    return out


def _f(v, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '–'
  if isinstance(v, float):
    return f'{v:.{digits}f}'
  return str(v)


COLUMNS = (('composition_js', 'comp. JS', 4), ('composition_kl', 'comp. KL', 4),
           ('length_ks', 'length KS', 3), ('mean_length', 'mean len', 1),
           ('eos_fraction', 'ended', 2), ('unique_fraction', 'unique', 2),
           ('mean_identity', 'identity', 3), ('kmer_repeat', '3-mer rep.', 3),
           ('homopolymer_max', 'max homopol.', 0), ('teacher_nelbo', 'teacher NELBO/tok', 3))


def markdown(rows: Sequence[dict], cfg, reference: Optional[dict], skipped: Sequence[str]) -> str:
  e = cfg.eval
  structure = any(r.get('plddt_mean') is not None for r in rows)
  head = ['model', 'sampler', 'precision', 'NFE', 'student fwd', 'TFLOPs/sample',
          *(c[1] for c in COLUMNS), *(['pLDDT'] if structure else []), 'seconds']
  lines = [f'# NFE sweep — proteins ({cfg.data.tokenizer} tokens, L={cfg.model.length}), '
           f'{e.num_samples} samples per row, seed {e.seed}; no judge (protein metrics)', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * 3 + '---:|' * (len(head) - 3)]

  def line(r, name):
    tf = r.get('tflops_per_sample')
    cells = [*name, '–' if tf is None else f'{tf:.4g}',
             *(_f(r.get(k), d) for k, _, d in COLUMNS)]
    if structure:
      cells.append(_f(r.get('plddt_mean'), 1))
    cells.append(_f(r.get('seconds'), 2))
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'
  for r in rows:
    lines.append(line(r, [r['model'], r['sampler'], r['precision'], r['nfe'],
                          r.get('student_forwards')]))
  if reference:
    lines.append(line(reference, ['validation data', '–', '–', '–', '–']))
  lines.append('')
  if reference:
    lines.append(f'Reference: {reference["num_reference"]} training proteins (composition, '
                 f'lengths); the "validation data" line scores {reference["num_rows"]} held-out '
                 'records the same way. teacher NELBO/tok: the teacher\'s Monte-Carlo MDLM bound '
                 f'(nats per position, {e.nelbo_draws} draws). Gen PPL judges do not apply to '
                 'proteins and are not loaded.')
  lines.append('')
  lines.append(COLUMN_NOTES)
  short = short_rows(rows, reference)
  if short:
    lens = [r['mean_length'] for r in short]
    lines.append('')
    lines.append(
        f'Short proteins: {", ".join(_label(r) for r in short)} end after {min(lens):.0f}–'
        f'{max(lens):.0f} residues on average (mean len), far below '
        + (f'the data\'s {reference["mean_length"]:.0f}' if reference else 'the data') +
        '. A NELBO per position (EOS positions included) favours such rows, so in this table '
        'and in curve.png they can look best by teacher NELBO: read it with the length '
        'columns.')
  for reason in skipped:
    lines.append(f'Skipped: {reason}')
  return '\n'.join(lines) + '\n'


COLUMN_NOTES = (
    'Columns: comp. JS / KL = residue composition against the training reference (nats); '
    'length KS = Kolmogorov–Smirnov statistic of the length distributions; mean len = mean '
    'residues per protein; ended = fraction of rows in which the protein ended (an EOS within '
    'the L positions; the others were cut at L); unique = fraction of distinct proteins; '
    'identity = mean positional identity of pairs of generated proteins (alignment-free, over '
    'the shorter one: 1 = identical, lower = more diverse); 3-mer rep. = 1 − distinct / all '
    '3-mers of a protein, averaged; max homopol. = longest single-residue run of the row; '
    'seconds = wall time of drawing the '
    "row's samples, compilation excluded (the sweep's log line per row also counts compilation "
    'and these metrics, so it is longer).')
SHORT_FRACTION = 0.25      # a row whose mean length is below this share of the data's is "short"


def short_rows(rows: Sequence[dict], reference: Optional[dict]) -> list:
  """Rows whose proteins are much shorter than the data's (below SHORT_FRACTION of its mean
  length), e.g. RGAS rows of a briefly distilled student that end after a few residues."""
  if not reference or not reference.get('mean_length'):
    return []
  cut = SHORT_FRACTION * float(reference['mean_length'])
  return [r for r in rows if r.get('mean_length') is not None and r['mean_length'] < cut]


def _label(r: dict) -> str:
  return f'{r["model"]} {r["sampler"]} at {r["nfe"]} NFE'


def curve(rows: Sequence[dict], path: str, *, reference: Optional[dict] = None,
          title: str = '') -> list[str]:
  """Two panels against NFE (log-2): the teacher's NELBO per token of the samples (± stderr) and
  the composition JS against the training data; the validation data as dashed lines. Returns the
  series labels."""
  fig = Figure(figsize=(11, 4.2))
  FigureCanvasAgg(fig)
  ax_n, ax_js = fig.subplots(1, 2)
  groups: dict = {}
  for r in rows:
    if r.get('teacher_nelbo') is None:
      continue
    groups.setdefault((r['model'], r['sampler'], r.get('precision', 'float32')), []).append(r)
  labels = []
  plotted = {id(ax_n): False, id(ax_js): False}

  def finite(v):
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r['nfe'])
    label = ' / '.join(key[:2])
    labels.append(label)
    for ax, value in ((ax_n, 'teacher_nelbo'), (ax_js, 'composition_js')):
      pts = [r for r in rs if finite(r.get(value))]
      if not pts:
        continue
      plotted[id(ax)] = True
      err = None
      if value == 'teacher_nelbo':
        err = [r['teacher_nelbo_stderr'] if finite(r.get('teacher_nelbo_stderr')) else 0.0
               for r in pts]
      ax.errorbar([r['nfe'] for r in pts], [r[value] for r in pts], yerr=err, marker='o',
                  capsize=3, label=label)
  if reference:
    for ax, value in ((ax_n, 'teacher_nelbo'), (ax_js, 'composition_js')):
      if finite(reference.get(value)):
        ax.axhline(reference[value], color='gray', linestyle='--', linewidth=1,
                   label='validation data')
  ax_n.set_ylabel('teacher NELBO (nats / position)')
  ax_js.set_ylabel('composition JS vs training data (nats)')
  for ax in (ax_n, ax_js):
    if plotted[id(ax)]:               # a log axis needs points (an all-NaN panel stays empty)
      plots.log2_axis(ax, 'NFE (sampler steps)')
    else:
      ax.set_xlabel('NFE (sampler steps)')
      ax.grid(True, which='both', alpha=0.3)
    if labels:
      ax.legend(fontsize=8)
  plots.save(fig, path, title)
  return labels
