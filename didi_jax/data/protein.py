"""Protein data: amino-acid tokenizers, a streaming FASTA / Swiss-Prot reader, one-protein-per-row
blocks, and the length statistics of generated rows.

Tokenizers (same interface as `data.tokenizers`: `name`, `vocab_size`, `eos_id`, `bos_id`,
`encode`, `encode_batch`, `decode`; plus `pad_id`, `mask_id`, `residues`, `tokens`). As for text,
`vocab_size` counts the ids the tokenizer emits and the diffusion model's [MASK] is `vocab_size`,
so the model vocabulary is `vocab_size + 1` and [MASK] = model vocab − 1:

* `ProteinTokenizer` ('protein', ours): ids 0-19 = the 20 standard residues `ACDEFGHIKLMNPQRSTVWY`,
  20-24 = the rare / ambiguous `U O B Z X`, 25 = EOS (= BOS), 26 = PAD; vocab_size 27, [MASK] 27,
  model vocab 28.
* `EsmTokenizer` ('esm'): the exact ESM-2 alphabet that DPLM uses (33 tokens, `<cls>`=0, `<pad>`=1,
  `<eos>`=2, `<unk>`=3, `L A G V S E R T I D P K Q N F Y M H W C X B U Z O . -` = 4..30,
  `<null_1>`=31, `<mask>`=32); BOS = `<cls>`. vocab_size 32 (the ids it emits); its `<mask>` (32) is
  exactly the diffusion [MASK] = model vocab (33) − 1, so an ESM-2 / DPLM checkpoint plugs in as is.

Rows (`encode_rows`): one protein per row of length L, never packed:

    layout='eos' (default; the text path's convention, EOS doubles as pad):
        [BOS]? r_1 ... r_n EOS EOS ... EOS
    layout='pad' (the ESM / DPLM convention):
        [BOS]? r_1 ... r_n EOS PAD ... PAD

`bos=True` puts `tokenizer.bos_id` in front (ESM `<cls>`; the default for the ESM tokenizer, whose
models always saw it; off for ours). In layout 'eos' every position is an ordinary token: the MDLM
loss runs over all L positions exactly as for packed text (`diffusion.nelbo_per_token` needs no pad
mask), the samplers fill all L positions from all-[MASK], and a generated protein ends at its first
EOS (everything after it is ignored; `generated_lengths`). In layout 'pad' only the residue
positions are part of the data: a DPLM-style loss masks and scores only `maskable_positions(rows)`
(BOS, EOS and PAD stay clean and are never targets), an ESM model masks PAD keys in attention
(`models.esm`, `pad_attention_mask`), and a sampler must start from a template `[BOS] [MASK]*n EOS
PAD*` with n chosen beforehand (e.g. drawn from the data's length distribution) and keep the special
positions fixed. Layout 'eos' is what the generic pipeline (loss over every position, samplers over
every position) runs unchanged.

Reader (`iter_records`): FASTA (plain or gzip, detected by content), and UniProt / Swiss-Prot flat
files (`ID ... SQ ... //`); many files and glob patterns; streaming, line by line.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import os
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from didi_jax.errors import DataError

STANDARD_RESIDUES = 'ACDEFGHIKLMNPQRSTVWY'
RARE_RESIDUES = 'UOBZX'        # selenocysteine, pyrrolysine, D/N, E/Q, unknown
RESIDUES = STANDARD_RESIDUES + RARE_RESIDUES
UNKNOWN_RESIDUE = 'X'


# ------------------------------------------------------------------------------------ tokenizers


class _ResidueTokenizer:
  """Shared single-letter logic: `_ids` maps one upper-case character to an id."""
  name = ''
  residues = ''
  tokens: tuple = ()
  _special_names: dict = {}

  def __init__(self):
    self._ids = {c: self.tokens.index(c) for c in self.residues}
    self._residue_ids = frozenset(self._ids.values())
    self._lut = np.full(128, -1, np.int32)
    for c, i in self._ids.items():
      self._lut[ord(c)] = i
      self._lut[ord(c.lower())] = i

  @property
  def mask_id(self) -> int:
    """The diffusion model's [MASK] id (= vocab_size; model vocab = vocab_size + 1)."""
    return self.vocab_size

  @property
  def model_vocab_size(self) -> int:
    return self.vocab_size + 1

  def is_residue(self, i: int) -> bool:
    return int(i) in self._residue_ids

  def encode(self, text: str) -> list[int]:
    """One id per residue letter (upper or lower case), no special tokens added.

    Raises DataError naming the first character outside the alphabet (e.g. '*', a digit, a gap
    '-' for our alphabet): clean the sequence with `iter_records` first.
    """
    raw = text.encode('ascii', errors='replace')
    arr = np.frombuffer(raw, np.uint8)
    ids = self._lut[np.minimum(arr, 127)]
    bad = np.flatnonzero((ids < 0) | (arr > 127))
    if bad.size:
      k = int(bad[0])
      raise DataError(f'{self.name} tokenizer: character {text[k]!r} at position {k} is not in the '
                      f'alphabet {self.residues!r}: clean the sequence (iter_records does)')
    return ids.tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def token(self, i: int) -> str:
    i = int(i)
    if not 0 <= i < len(self.tokens):
      raise ValueError(f'{self.name} ids must lie in [0, {len(self.tokens)}); got {i}')
    return self.tokens[i]

  def decode(self, ids: Sequence[int]) -> str:
    """Every id rendered: residues as letters, special tokens as `<eos>`, `<pad>`, ... ([MASK]
    raises, as for text: a leftover [MASK] means the sampler ran without noise removal)."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.mask_id:
        raise ValueError(f'{self.name} id {i} is [MASK] (a leftover [MASK]? run the sampler with '
                         'noise removal)')
      out.append(self.token(i))
    return ''.join(out)

  def to_protein(self, ids: Sequence[int]) -> str:
    """The protein a row holds: a leading BOS (if distinct from EOS) skipped, cut at the first
    EOS; any other non-residue token before it ([MASK], PAD, `<unk>`, gap) becomes 'X' (unknown
    residue). `protein_strings` also counts those."""
    return _row_to_protein(np.asarray(ids), self)[0]


class ProteinTokenizer(_ResidueTokenizer):
  """Our amino-acid alphabet: 20 standard + `UOBZX` (ids 0-24), EOS = BOS = 25, PAD = 26."""
  name = 'protein'
  residues = RESIDUES
  tokens = tuple(RESIDUES) + ('<eos>', '<pad>')

  def __init__(self):
    super().__init__()
    self.vocab_size = 27
    self.eos_id = 25
    self.bos_id = 25
    self.pad_id = 26
    self.unk_id = RESIDUES.index(UNKNOWN_RESIDUE)


ESM_TOKENS = ('<cls>', '<pad>', '<eos>', '<unk>',
              'L', 'A', 'G', 'V', 'S', 'E', 'R', 'T', 'I', 'D', 'P', 'K', 'Q', 'N', 'F', 'Y',
              'M', 'H', 'W', 'C', 'X', 'B', 'U', 'Z', 'O', '.', '-', '<null_1>', '<mask>')


class EsmTokenizer(_ResidueTokenizer):
  """The ESM-2 / DPLM alphabet (HF `facebook/esm2_*`, `airkingbd/dplm_*` vocab.txt), 33 tokens.

  `encode` emits residue ids only (as HF `encode(s, add_special_tokens=False)`); `<cls>` (BOS)
  and `<eos>` are added by `encode_rows`. '.' and '-' (ESM's insertion / gap tokens) are
  accepted by `encode` but not by the FASTA reader's default alphabet.
  """
  name = 'esm'
  residues = 'LAGVSERTIDPKQNFYMHWCXBUZO.-'
  tokens = ESM_TOKENS

  def __init__(self):
    super().__init__()
    self.vocab_size = 32          # ids 0..31; <mask> = 32 is the model's [MASK]
    self.bos_id = 0               # <cls>
    self.pad_id = 1
    self.eos_id = 2
    self.unk_id = 3
    assert self.tokens[self.mask_id] == '<mask>'


PROTEIN_TOKENIZERS = {'protein': ProteinTokenizer, 'esm': EsmTokenizer}


def get_protein_tokenizer(name: str):
  if name not in PROTEIN_TOKENIZERS:
    raise ValueError(f'Unknown protein tokenizer {name!r}: choose one of '
                     f'{sorted(PROTEIN_TOKENIZERS)}')
  return PROTEIN_TOKENIZERS[name]()


# ---------------------------------------------------------------------------------------- reader


class Record(NamedTuple):
  """One protein: `name` (first word of the header / the ID), upper-case `sequence` (cropped if
  asked), `line` (1-based line of its header), `path`."""
  name: str
  sequence: str
  line: int
  path: str


LONG_RECORDS = ('crop', 'skip')


def expand_paths(paths) -> list[str]:
  """Files of `paths` (a path, a glob, or a list of them), in the given order, globs sorted."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.path.expanduser(os.fspath(p))
    if glob.has_magic(p):
      hits = sorted(h for h in glob.glob(p) if os.path.isfile(h))
      if not hits:
        raise DataError(f'no file matches {p!r}: fix the glob pattern')
      out.extend(hits)
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise DataError(f'{p} does not exist or is not a file: fix the sequence file path')
  if not out:
    raise DataError('no sequence files given: pass at least one FASTA path or glob')
  return out


def _open_text(path: str) -> io.TextIOBase:
  with open(path, 'rb') as f:
    magic = f.read(2)
  if magic == b'\x1f\x8b':
    return io.TextIOWrapper(gzip.open(path, 'rb'), encoding='ascii', errors='replace')
  return open(path, encoding='ascii', errors='replace')


def _clean(chunk: str, allowed: frozenset, path: str, name: str, line: int, last: bool) -> str:
  """Upper-cased residues of one sequence line (whitespace removed); DataError on a bad char.
  A '*' is accepted only as the record's final character (the stop codon; stripped by caller)."""
  s = ''.join(chunk.split()).upper()
  for k, c in enumerate(s):
    if c not in allowed and not (c == '*' and last and k == len(s) - 1):
      raise DataError(f'{path}:{line}: record {name!r} has invalid character {c!r} (allowed: '
                      f'{"".join(sorted(allowed))} and a final "*"): fix or drop the record')
  return s


def _raw_records(path: str, allowed: frozenset) -> Iterator[tuple[str, list, int]]:
  """(name, [cleaned sequence pieces], header line) of each record of one file, streaming."""
  with _open_text(path) as f:
    first = ''
    lineno = 0
    for raw in f:
      lineno += 1
      if raw.strip():
        first = raw
        break
    if not first:
      return
    if first.startswith('>'):
      yield from _fasta(f, first, lineno, path, allowed)
    elif first.startswith('ID '):
      yield from _swissprot(f, first, lineno, path, allowed)
    else:
      raise DataError(f'{path}:{lineno}: neither FASTA (">name") nor Swiss-Prot ("ID   ...") '
                      f'(starts with {first.strip()[:20]!r}): pass protein FASTA files')


def _header_name(header: str, path: str, line: int) -> str:
  parts = header[1:].split()
  if not parts:
    raise DataError(f'{path}:{line}: FASTA header without a name: give every record a ">name"')
  return parts[0]


def _fasta(f, first: str, first_line: int, path: str, allowed: frozenset):
  name, start, pieces = _header_name(first, path, first_line), first_line, []
  stopped = False        # a '*' was seen: nothing may follow in this record
  lineno = first_line
  for raw in f:
    lineno += 1
    if raw.startswith('>'):
      yield name, pieces, start
      name, start, pieces, stopped = _header_name(raw, path, lineno), lineno, [], False
      continue
    if raw.startswith(';') or not raw.strip():
      continue
    s = _clean(raw, allowed, path, name, lineno, last=True)
    if stopped and s:
      raise DataError(f'{path}:{lineno}: record {name!r} has residues after the stop codon "*": '
                      'a "*" may only end a record')
    if s.endswith('*'):
      s, stopped = s[:-1], True
    pieces.append(s)
  yield name, pieces, start


def _swissprot(f, first: str, first_line: int, path: str, allowed: frozenset):
  name, start = first.split()[1], first_line
  pieces, in_seq = [], False
  lineno = first_line
  for raw in f:
    lineno += 1
    if raw.startswith('//'):
      yield name, pieces, start
      name, pieces, in_seq = None, [], False
      continue
    if raw.startswith('ID '):
      name, start, pieces, in_seq = raw.split()[1], lineno, [], False
    elif raw.startswith('SQ '):
      in_seq = True
    elif in_seq and raw.startswith('     '):
      pieces.append(_clean(raw, allowed, path, name, lineno, last=False))
  if name is not None and (pieces or in_seq):
    yield name, pieces, start


def crop_start(length: int, max_length: int, seed: int, name: str, sequence: str) -> int:
  """The window start of a cropped record, uniform over [0, length − max_length] (both ends
  included); a function of (seed, name, sequence) only, so reproducible and order-free."""
  digest = hashlib.sha256(f'{seed}\x00{name}\x00{sequence}'.encode()).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
  return int(rng.integers(0, length - max_length + 1))


def iter_records(paths, *, max_length: Optional[int] = None, long_records: str = 'crop',
                 seed: int = 0, dedup: bool = False,
                 alphabet: str = RESIDUES) -> Iterator[Record]:
  """Streams the protein records of FASTA (plain / gzip) or Swiss-Prot files.

  paths: a path, glob, or list of them (files in order, each glob sorted). Names are the first
  word of the header. Sequences are upper-cased, whitespace removed, a final '*' (stop codon)
  stripped; any other character outside `alphabet` raises DataError naming file, line and record.
  Records longer than `max_length` residues are cropped to a random window (long_records='crop',
  reproducible: see `crop_start`) or dropped ('skip'). dedup=True drops every record whose full
  (uncropped) sequence was seen before (in any file; a 16-byte hash per sequence is kept).
  A file that yields nothing (empty, or every record a duplicate / too long) raises DataError, as
  does a record without residues.
  """
  if long_records not in LONG_RECORDS:
    raise DataError(f'long_records={long_records!r} is not valid: use one of {LONG_RECORDS}')
  if max_length is not None and max_length < 1:
    raise DataError(f'max_length={max_length} leaves no room for residues: use at least 1')
  allowed = frozenset(alphabet.upper())
  seen: set = set()
  for path in expand_paths(paths):
    n_in = n_out = n_dup = n_long = 0
    for name, pieces, line in _raw_records(path, allowed):
      n_in += 1
      seq = ''.join(pieces)
      if not seq:
        raise DataError(f'{path}:{line}: record {name!r} has no residues: drop the empty record')
      if dedup:
        key = hashlib.blake2b(seq.encode(), digest_size=16).digest()
        if key in seen:
          n_dup += 1
          continue
        seen.add(key)
      if max_length is not None and len(seq) > max_length:
        if long_records == 'skip':
          n_long += 1
          continue
        s = crop_start(len(seq), max_length, seed, name, seq)
        seq = seq[s:s + max_length]
      n_out += 1
      yield Record(name, seq, line, path)
    if not n_in:
      raise DataError(f'{path} holds no protein records (empty file): remove it from the paths')
    if not n_out:
      why = (f'all {n_in} records are duplicates of earlier ones' if n_dup == n_in else
             f'{n_dup} duplicates and {n_long} records longer than max_length={max_length} '
             'were skipped')
      raise DataError(f'{path} contributes no records ({why}): remove it, or use '
                      "long_records='crop' / a larger max_length")


# ------------------------------------------------------------------------------------------ rows

LAYOUTS = ('eos', 'pad')


def residue_capacity(length: int, bos: bool) -> int:
  """Residues that fit in a row of `length`: one EOS always, plus the BOS if used."""
  return length - 1 - int(bool(bos))


def default_bos(tokenizer) -> bool:
  """BOS in front by default only where it is a distinct token (ESM `<cls>`)."""
  return tokenizer.bos_id != tokenizer.eos_id


def encode_rows(sequences: Iterable[str], length: int, tokenizer, *, layout: str = 'eos',
                bos: Optional[bool] = None, dtype=np.int32) -> np.ndarray:
  """(N, length) rows, one protein each (see the module docstring for the two layouts).

  A sequence longer than `residue_capacity(length, bos)` raises DataError (crop or skip it when
  reading: `iter_records(max_length=residue_capacity(...))`).
  """
  if layout not in LAYOUTS:
    raise DataError(f'layout={layout!r} is not valid: use one of {LAYOUTS}')
  bos = default_bos(tokenizer) if bos is None else bool(bos)
  cap = residue_capacity(length, bos)
  if cap < 1:
    raise DataError(f'length={length} leaves no room for residues: use at least {2 + bos}')
  fill = tokenizer.eos_id if layout == 'eos' else tokenizer.pad_id
  rows = []
  for k, seq in enumerate(sequences):
    ids = tokenizer.encode(seq)
    if len(ids) > cap:
      raise DataError(f'sequence {k} has {len(ids)} residues, more than the {cap} that fit in '
                      f'length {length}: read with iter_records(max_length={cap})')
    row = np.full(length, fill, dtype)
    o = int(bos)
    if bos:
      row[0] = tokenizer.bos_id
    row[o:o + len(ids)] = ids
    row[o + len(ids)] = tokenizer.eos_id
    rows.append(row)
  if not rows:
    return np.zeros((0, length), dtype)
  return np.stack(rows)


def maskable_positions(rows: np.ndarray, tokenizer) -> np.ndarray:
  """Bool (N, L): the positions that hold residues (not BOS / EOS / PAD) — what a DPLM-style loss
  masks and scores in layout 'pad'."""
  rows = np.asarray(rows)
  special = np.isin(rows, [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id])
  return ~special


def generated_lengths(ids_BxL: np.ndarray, eos_id: int, *,
                      bos_id: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """(lengths (B,), has_eos (B,)): a row's length is the position of its first EOS, counted after
  a leading BOS when `bos_id` is given and the row starts with it; a row without EOS has length
  L (minus that BOS)."""
  ids = np.asarray(ids_BxL)
  B, L = ids.shape
  start = np.zeros(B, np.int64)
  if bos_id is not None and bos_id != eos_id:
    start = (ids[:, 0] == bos_id).astype(np.int64)
  is_eos = ids == eos_id
  is_eos &= np.arange(L)[None] >= start[:, None]
  has = is_eos.any(axis=1)
  first = np.where(has, np.argmax(is_eos, axis=1), L)
  return first - start, has


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def length_summary(lengths: Sequence[int]) -> dict:
  """mean, std (population), min, max and the QUANTILES of a length sample."""
  x = np.asarray(lengths, np.float64)
  if not x.size:
    raise ValueError('no lengths to summarise')
  out = {'count': int(x.size), 'mean': float(x.mean()), 'std': float(x.std()),
         'min': float(x.min()), 'max': float(x.max())}
  for q, v in zip(QUANTILES, np.quantile(x, QUANTILES)):
    out[f'q{int(round(q * 100)):02d}'] = float(v)
  return out


def length_distribution(ids_BxL: np.ndarray, tokenizer) -> dict:
  """Length statistics of generated rows (`generated_lengths` with the tokenizer's BOS/EOS) plus
  `no_eos_fraction` and the raw `lengths` list."""
  lengths, has = generated_lengths(ids_BxL, tokenizer.eos_id, bos_id=tokenizer.bos_id)
  out = length_summary(lengths)
  out['no_eos_fraction'] = float(1.0 - has.mean())
  out['lengths'] = lengths.tolist()
  return out


def _row_to_protein(row: np.ndarray, tokenizer) -> tuple[str, int]:
  lengths, _ = generated_lengths(row[None], tokenizer.eos_id, bos_id=tokenizer.bos_id)
  start = int(tokenizer.bos_id != tokenizer.eos_id and len(row) and row[0] == tokenizer.bos_id)
  body = row[start:start + int(lengths[0])]
  out, bad = [], 0
  for i in body.tolist():
    if tokenizer.is_residue(i):
      out.append(tokenizer.tokens[i])
    else:
      out.append(UNKNOWN_RESIDUE)
      bad += 1
  return ''.join(out), bad


@dataclasses.dataclass
class DecodedProteins:
  sequences: list            # one string per row (see `_ResidueTokenizer.to_protein`)
  invalid_tokens: int        # non-residue tokens inside proteins (rendered 'X')
  residues: int              # total residues (invalid ones included)


def protein_strings(ids_BxL: np.ndarray, tokenizer) -> DecodedProteins:
  """The proteins of generated rows, for the metrics of `evaluation.protein`."""
  seqs, bad = [], 0
  for row in np.asarray(ids_BxL):
    s, b = _row_to_protein(row, tokenizer)
    seqs.append(s)
    bad += b
  return DecodedProteins(seqs, bad, sum(len(s) for s in seqs))
