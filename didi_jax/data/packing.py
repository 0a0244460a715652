"""Packing token streams into fixed-length blocks, exactly as docs/method.md §2 ("wrap").

Each document's ids (tokenised without special tokens) get EOS appended; the documents of a group
are concatenated and cut into (L-2)-token pieces; each piece becomes `[BOS] + piece + [EOS]`
(length L).
Groups hold `pack_group` consecutive documents (1000 = the official HF map batch) and each group's
remainder is dropped; `pack_group=0` packs one global stream and drops only its final remainder.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from didi_jax import errors

SPECIAL_PER_BLOCK = 2    # BOS + EOS around every piece


PackingError = errors.PackingError   # a packing problem; the message names the fix


class Packer:
  """Streaming packer: `add(ids)` per document returns the blocks it completed; then `finish()`.

  Attributes: `num_docs`, `num_tokens` (ids fed in, appended EOS included), `num_dropped` (tokens in
  dropped remainders), `num_blocks`.
  """

  def __init__(self, seq_len: int, bos_id: int, eos_id: int, pack_group: int = 0,
               dtype: np.dtype = np.int32):
    if seq_len <= SPECIAL_PER_BLOCK:
      raise PackingError(f'seq_len={seq_len} leaves no room between BOS and EOS: use a length '
                         f'of at least {SPECIAL_PER_BLOCK + 1}')
    if pack_group < 0:
      raise PackingError(f'pack_group={pack_group} must be >= 0 (0 = one global stream)')
    self.seq_len = int(seq_len)
    self.piece_len = self.seq_len - SPECIAL_PER_BLOCK
    self.bos_id, self.eos_id = int(bos_id), int(eos_id)
    self.pack_group = int(pack_group)
    self.dtype = np.dtype(dtype)
    self.num_docs = self.num_tokens = self.num_dropped = self.num_blocks = 0
    self._pending: list[np.ndarray] = []
    self._pending_len = 0
    self._docs_in_group = 0

  def _empty(self) -> np.ndarray:
    return np.zeros((0, self.seq_len), self.dtype)

  def _cut(self, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full blocks from the front of `stream`, and the leftover tokens."""
    n = len(stream) // self.piece_len
    blocks = np.empty((n, self.seq_len), self.dtype)
    blocks[:, 0] = self.bos_id
    blocks[:, 1:-1] = stream[:n * self.piece_len].reshape(n, self.piece_len)
    blocks[:, -1] = self.eos_id
    self.num_blocks += n
    return blocks, stream[n * self.piece_len:]

  def _take_pending(self) -> np.ndarray:
    stream = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int64)
    self._pending, self._pending_len = [], 0
    return stream

  def add(self, ids: Sequence[int]) -> np.ndarray:
    """Adds one document's ids; returns the (k, L) blocks completed by it (k may be 0)."""
    doc = np.empty(len(ids) + 1, np.int64)
    doc[:-1] = ids
    doc[-1] = self.eos_id
    self._pending.append(doc)
    self._pending_len += len(doc)
    self.num_docs += 1
    self.num_tokens += len(doc)
    if self.pack_group:
      self._docs_in_group += 1
      if self._docs_in_group < self.pack_group:
        return self._empty()
      return self._flush_group()
    if self._pending_len < self.piece_len:
      return self._empty()
    blocks, rest = self._cut(self._take_pending())
    if len(rest):
      self._pending, self._pending_len = [rest], len(rest)
    return blocks

  def _flush_group(self) -> np.ndarray:
    blocks, rest = self._cut(self._take_pending())
    self.num_dropped += len(rest)
    self._docs_in_group = 0
    return blocks

  def finish(self) -> np.ndarray:
    """Blocks of the last (partial) group; drops the final remainder."""
    if self.pack_group and self._docs_in_group:
      return self._flush_group()
    self.num_dropped += self._pending_len
    self._pending, self._pending_len = [], 0
    return self._empty()


def pack_documents(token_docs: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
                   pack_group: int = 0, dtype: np.dtype = np.int32) -> np.ndarray:
  """All blocks (N, L) of `token_docs` (ids without special tokens); N may be 0."""
  packer = Packer(seq_len, bos_id, eos_id, pack_group, dtype)
  parts = [packer.add(ids) for ids in token_docs]
  parts.append(packer.finish())
  return np.concatenate(parts)
