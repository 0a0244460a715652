"""Packed token blocks (tokenisation cache) and the grain-based training / evaluation iterators.

`load_blocks` tokenises and packs a split once (docs/method.md §2) and caches it under
`cache_root(data_cfg)/blocks/<key>/<split>.npy` (uint16 when the vocabulary fits, else int32), keyed
by a hash of the source identity (pinned hash, or files with sizes and mtimes), tokenizer, L,
pack_group and split rule; later runs memory-map the file. Files are written to a temporary name
and renamed, so a killed run never leaves a corrupt cache. `data.source='npy'` reads pre-packed
`train.npy` / `valid.npy` (N, L) from the directory `data.paths` instead.

`data.source='fasta'` caches one protein per row instead (`fasta_rows`: `data.protein.encode_rows`
of the split's records, `data.sources.iter_protein_records`); the iterators below treat those rows
exactly as packed blocks (same shuffling, same exact resume).

`TrainIterator` yields this host's contiguous slice of each global batch. Epoch e visits the blocks
in a grain permutation seeded by (seed, e); the last incomplete global batch of an epoch is dropped.
Its state (epoch, index, seed, num_blocks, global_batch) is JSON-serialisable and resuming from it
continues with exactly the next batch. A batch is a gather of rows from a memory-mapped file and a
pure function of (seed, epoch, index); `data.num_workers > 0` prepares that many upcoming batches in
background threads, which changes nothing about their content.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Iterator

import grain
import numpy as np

from didi_jax.data import protein, tokenizers
from didi_jax.data.packing import Packer
from didi_jax.data.sources import DataError, cache_root, check_split, iter_documents, \
    iter_protein_records, source_fingerprint, split_rule

CACHE_FORMAT = 1            # bump when tokenisation, splitting or packing changes
CACHE_KEY_CHARS = 16
TOKENIZE_BATCH_DOCS = 256   # documents per tokenizer call
UINT16_IDS = 1 << 16
STATE_KEYS = ('epoch', 'index', 'seed', 'num_blocks', 'global_batch')
NPY_SOURCE = 'npy'

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- cache


class _BlockWriter:
  """Appends (k, L) blocks to `<path>` as .npy through a temporary file renamed on success."""

  def __init__(self, path: str, seq_len: int, dtype: np.dtype):
    self.path, self.seq_len, self.dtype = path, seq_len, np.dtype(dtype)
    self.num_rows = 0
    fd, self._tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp',
                                     dir=os.path.dirname(path))
    self._f = os.fdopen(fd, 'wb')
    self._header_len = self._write_header(0)

  def _write_header(self, rows: int) -> int:
    self._f.seek(0)
    # numpy pads the header so the leading dimension can grow in place.
    np.lib.format.write_array_header_1_0(self._f, {
        'descr': np.lib.format.dtype_to_descr(self.dtype), 'fortran_order': False,
        'shape': (rows, self.seq_len)})
    return self._f.tell()

  def write(self, blocks: np.ndarray) -> None:
    if len(blocks):
      self._f.write(np.ascontiguousarray(blocks, self.dtype).tobytes())
      self.num_rows += len(blocks)

  def __enter__(self) -> '_BlockWriter':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        if self._write_header(self.num_rows) != self._header_len:
          raise RuntimeError('numpy .npy header changed length while writing the block cache')
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
    finally:
      if not self._f.closed:
        self._f.close()
      if os.path.exists(self._tmp):
        os.remove(self._tmp)


def _write_json_atomic(path: str, obj: dict) -> None:
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp',
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cache_key(data_cfg, seq_len: int) -> dict:
  """Everything the packed blocks depend on (hashed into the cache directory name)."""
  rule = split_rule(data_cfg)
  return {'format': CACHE_FORMAT, 'source': data_cfg.source,
          'fingerprint': source_fingerprint(data_cfg), 'tokenizer': data_cfg.tokenizer,
          'seq_len': int(seq_len), 'pack_group': int(data_cfg.pack_group),
          'split_rule': [rule.kind, rule.value]}


def cache_dir_for(data_cfg, seq_len: int) -> str:
  """The block-cache directory of this data config and length (not created)."""
  key = cache_key(data_cfg, seq_len)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:CACHE_KEY_CHARS]
  name = f'{data_cfg.source}_{data_cfg.tokenizer}_L{seq_len}_{digest}'
  return os.path.join(cache_root(data_cfg), 'blocks', name)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _build_split(data_cfg, seq_len: int, split: str, directory: str) -> None:
  """Tokenises and packs one split into `directory/<split>.npy` (+ `<split>.json` statistics)."""
  tok = tokenizers.get_tokenizer(data_cfg.tokenizer)
  dtype = np.uint16 if tok.vocab_size <= UINT16_IDS else np.int32
  packer = Packer(seq_len, tok.bos_id, tok.eos_id, data_cfg.pack_group, dtype)
  os.makedirs(directory, exist_ok=True)
  _log.info('Tokenising %s/%s into %s', data_cfg.source, split, directory)
  num_bytes = 0
  path = os.path.join(directory, f'{split}.npy')
  with _BlockWriter(path, seq_len, dtype) as writer:
    for texts in _batched(iter_documents(data_cfg, split), TOKENIZE_BATCH_DOCS):
      num_bytes += sum(len(t.encode('utf-8')) for t in texts)
      for ids in tok.encode_batch(texts):
        writer.write(packer.add(ids))
    writer.write(packer.finish())
    if not packer.num_docs:
      raise DataError(f'data.source={data_cfg.source!r} has no {split} documents: check '
                      '--config.data.paths (and data.valid_fraction / data.valid_docs)')
    if not writer.num_rows:
      raise DataError(f'the {split} split of data.source={data_cfg.source!r} has '
                      f'{packer.num_tokens} tokens, fewer than one block of {seq_len}: add text, '
                      'shorten --config.model.length, or set --config.data.pack_group=0')
    stats = {'split': split, 'num_docs': packer.num_docs, 'num_bytes': num_bytes,
             'num_tokens': packer.num_tokens, 'num_dropped_tokens': packer.num_dropped,
             'num_blocks': writer.num_rows, 'dtype': np.dtype(dtype).name,
             'key': cache_key(data_cfg, seq_len)}
    # Statistics first: the .npy (renamed last) marks a complete cache entry.
    _write_json_atomic(os.path.join(directory, f'{split}.json'), stats)


def fasta_rows(data_cfg, seq_len: int, split: str) -> np.ndarray:
  """(N, L) rows of the fasta `split`: `protein.encode_rows` of its records in file order."""
  tok = tokenizers.get_tokenizer(data_cfg.tokenizer)
  seqs = [r.sequence for r in iter_protein_records(data_cfg, split, seq_len)]
  return protein.encode_rows(seqs, seq_len, tok, layout=data_cfg.layout, bos=bool(data_cfg.bos))


def _build_fasta_split(data_cfg, seq_len: int, split: str, directory: str) -> None:
  """One protein per row into `directory/<split>.npy` (+ `<split>.json`), like `_build_split`."""
  os.makedirs(directory, exist_ok=True)
  rows = fasta_rows(data_cfg, seq_len, split)
  if not len(rows):
    raise DataError(f'the {split} split of data.fasta={data_cfg.fasta!r} holds no records: add '
                    'records or change --config.data.valid_fraction')
  tok = tokenizers.get_tokenizer(data_cfg.tokenizer)
  with _BlockWriter(os.path.join(directory, f'{split}.npy'), seq_len, np.uint16) as writer:
    writer.write(rows)
    lengths, _ = protein.generated_lengths(rows, tok.eos_id,
                                           bos_id=tok.bos_id if data_cfg.bos else None)
    stats = {'split': split, 'num_docs': len(rows), 'num_blocks': len(rows),
             'num_residues': int(np.sum(lengths)), 'dtype': 'uint16',
             'key': cache_key(data_cfg, seq_len)}
    _write_json_atomic(os.path.join(directory, f'{split}.json'), stats)


def _npy_blocks(data_cfg, seq_len: int, split: str) -> np.ndarray:
  path = os.path.join(os.path.expanduser(data_cfg.paths), f'{split}.npy')
  if not os.path.exists(path):
    raise DataError(f'{path} does not exist: data.source=npy needs a directory with train.npy and '
                    'valid.npy of shape (N, L)')
  blocks = np.load(path, mmap_mode='r')
  if blocks.ndim != 2 or blocks.shape[1] != seq_len or not np.issubdtype(blocks.dtype, np.integer):
    raise DataError(f'{path} holds {blocks.dtype}{list(blocks.shape)}, expected integer (N, '
                    f'{seq_len}): repack it or set --config.model.length={blocks.shape[-1]}')
  if not len(blocks):
    raise DataError(f'{path} holds no blocks: repack it with at least one row')
  return blocks


def load_blocks(data_cfg, seq_len: int, split: str) -> np.ndarray:
  """Packed blocks (N, L) of `split`, memory-mapped (uint16 or int32); built on first use."""
  check_split(split)
  if data_cfg.source == NPY_SOURCE:
    return _npy_blocks(data_cfg, seq_len, split)
  directory = cache_dir_for(data_cfg, seq_len)
  path = os.path.join(directory, f'{split}.npy')
  if not os.path.exists(path):
    build = _build_fasta_split if data_cfg.source == 'fasta' else _build_split
    build(data_cfg, seq_len, split, directory)
  return np.load(path, mmap_mode='r')


def corpus_stats(data_cfg, seq_len: int, split: str) -> dict:
  """Statistics of a cached split: num_docs, num_bytes, num_tokens, num_dropped_tokens, ..."""
  blocks = load_blocks(data_cfg, seq_len, split)
  if data_cfg.source == NPY_SOURCE:
    return {'split': split, 'num_blocks': len(blocks), 'dtype': blocks.dtype.name}
  with open(os.path.join(cache_dir_for(data_cfg, seq_len), f'{split}.json')) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- iterators


def _host_batch(global_batch: int, process_index: int, process_count: int) -> int:
  if global_batch <= 0:
    raise DataError(f'global batch {global_batch} must be positive')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} must lie in [0, process_count={process_count})')
  if global_batch % process_count:
    raise DataError(f'global batch {global_batch} is not divisible by {process_count} processes: '
                    'use a multiple of the process count')
  return global_batch // process_count


def epoch_seed(seed: int, epoch: int) -> int:
  """32-bit shuffle seed of one epoch, a fixed function of (seed, epoch)."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint32)[0])


class TrainIterator:
  """Endless training batches: `next(it)` -> (global_batch // process_count, L) int32.

  Host p gets rows [p*H, (p+1)*H) of each global batch (H = global_batch // process_count).
  """

  def __init__(self, data_cfg, seq_len: int, global_batch: int, *, seed: int | None = None,
               process_index: int = 0, process_count: int = 1):
    self._host = _host_batch(global_batch, process_index, process_count)
    self._blocks = load_blocks(data_cfg, seq_len, 'train')
    self.num_blocks = len(self._blocks)
    if self.num_blocks < global_batch:
      raise DataError(f'the training split has {self.num_blocks} blocks of {seq_len} tokens, fewer '
                      f'than one global batch of {global_batch}: lower the batch size or use more '
                      'data')
    self.global_batch = int(global_batch)
    self.process_index, self.process_count = process_index, process_count
    self.batches_per_epoch = self.num_blocks // self.global_batch
    self.seed = int(data_cfg.shuffle_seed if seed is None else seed)
    if self.seed < 0:
      raise DataError(f'shuffle seed {self.seed} must be >= 0')
    self.epoch = 0
    self.index = 0
    self._datasets: dict[tuple[int, int], grain.MapDataset] = {}
    self._prefetch = int(data_cfg.num_workers)
    self._pool = (concurrent.futures.ThreadPoolExecutor(self._prefetch) if self._prefetch > 0
                  else None)
    self._pending: collections.deque = collections.deque()   # (position, future)

  def _epoch_dataset(self, seed: int, epoch: int) -> grain.MapDataset:
    """The epoch's permutation of block numbers (a lazy grain index shuffle)."""
    if (seed, epoch) not in self._datasets:
      self._datasets = {(seed, epoch): grain.MapDataset.range(self.num_blocks)
                                       .shuffle(seed=epoch_seed(seed, epoch))}
    return self._datasets[(seed, epoch)]

  def _batch(self, order: grain.MapDataset, index: int) -> np.ndarray:
    # Batch b is permutation positions [b*G, (b+1)*G); host p reads its H of them in one gather.
    start = index * self.global_batch + self.process_index * self._host
    rows_H = np.fromiter((order[j] for j in range(start, start + self._host)), np.int64,
                         self._host)
    return np.asarray(self._blocks[rows_H], np.int32)

  def _advance(self, epoch: int, index: int) -> tuple[int, int]:
    index += 1
    return (epoch + 1, 0) if index == self.batches_per_epoch else (epoch, index)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> np.ndarray:
    position = (self.seed, self.epoch, self.index)
    if self._pool is None:
      batch = self._batch(self._epoch_dataset(self.seed, self.epoch), self.index)
    else:
      if self._pending and self._pending[0][0] != position:
        self._pending.clear()
      if not self._pending:
        self._submit(position)
      batch = self._pending.popleft()[1].result()
      while len(self._pending) < self._prefetch:
        last = self._pending[-1][0] if self._pending else position
        self._submit((last[0], *self._advance(last[1], last[2])))
    self.epoch, self.index = self._advance(self.epoch, self.index)
    return batch

  def _submit(self, position: tuple[int, int, int]) -> None:
    dataset = self._epoch_dataset(position[0], position[1])
    self._pending.append((position, self._pool.submit(self._batch, dataset, position[2])))

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: the next batch is batch `index` of epoch `epoch`."""
    return {'epoch': self.epoch, 'index': self.index, 'seed': self.seed,
            'num_blocks': self.num_blocks, 'global_batch': self.global_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `get_state()` output (the state's seed replaces this iterator's)."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise DataError(f'data iterator state lacks {missing}: restore a state saved by '
                      'TrainIterator.get_state()')
    if int(state['num_blocks']) != self.num_blocks:
      raise DataError(f'the checkpoint\'s data iterator saw {state["num_blocks"]} training blocks '
                      f'but the data now has {self.num_blocks}: the data or its settings changed; '
                      'restore the original data/config or start a fresh run')
    if int(state['global_batch']) != self.global_batch:
      raise DataError(f'the checkpoint\'s data iterator used global batch {state["global_batch"]}, '
                      f'now {self.global_batch}: resume with the original batch size')
    if not 0 <= int(state['index']) < self.batches_per_epoch or int(state['epoch']) < 0:
      raise DataError(f'data iterator state {dict(state)} is out of range for '
                      f'{self.batches_per_epoch} batches per epoch: the state is corrupt')
    self.seed = int(state['seed'])
    self.epoch, self.index = int(state['epoch']), int(state['index'])
    self._pending.clear()


def eval_batches(data_cfg, seq_len: int, global_batch: int, num_batches: int, *,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """A fixed list of `num_batches` validation batches: this host's (global_batch // P, L) int32.

  The `global_batch * num_batches` blocks are spread evenly over the validation split in order; a
  split smaller than that is cycled (wraps around).
  """
  host = _host_batch(global_batch, process_index, process_count)
  if num_batches <= 0:
    raise DataError(f'num_batches={num_batches} must be positive')
  blocks = load_blocks(data_cfg, seq_len, 'valid')
  n, total = len(blocks), global_batch * num_batches
  order = np.arange(total, dtype=np.int64)
  order = order * n // total if total <= n else order % n
  rows_NxH = order.reshape(num_batches, global_batch)[:, process_index * host:
                                                      (process_index + 1) * host]
  return [np.asarray(blocks[rows_H], np.int32) for rows_H in rows_NxH]
