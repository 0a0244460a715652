"""A byte-level BPE tokenizer read from GGUF metadata (SmolLM2's judge tokenizer), and reading
GGUF metadata values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tiktoken

from didi_jax.data.tokenizers import GPT2_PATTERN, bytes_to_unicode


def gguf_value(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f'GGUF metadata lacks {key!r}: the file is not a complete llama.cpp '
                       'model export; re-convert it with convert_hf_to_gguf.py')
    return default
  return field.contents()


# Pre-tokenizer patterns (llama.cpp `tokenizer.ggml.pre` names). 'smollm' & co. are HF's
# Sequence[Digits(individual_digits), ByteLevel]: digits split off one by one first, then the
# GPT-2 regex inside each digit-free piece. The single pattern below is equivalent: digits are
# isolated by the first alternative, and whitespace before a digit ends its piece, so the
# `\s+(?!\S)` look-ahead lets a digit follow.
_DIGIT_SPLIT_PATTERN = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                        r"""|\s+(?![^\s\p{N}])|\s+""")
PRETOKENIZERS = {
    'gpt2': GPT2_PATTERN,
    'default': GPT2_PATTERN,
    'smollm': _DIGIT_SPLIT_PATTERN,
    'starcoder': _DIGIT_SPLIT_PATTERN,
    'refact': _DIGIT_SPLIT_PATTERN,
}
GGUF_TOKEN_CONTROL = 3        # gguf.TokenType.CONTROL
GGUF_TOKEN_USER_DEFINED = 4   # gguf.TokenType.USER_DEFINED


class ByteLevelBPETokenizer:
  """GPT-2-style byte-level BPE from a vocabulary and a merge list (as GGUF/HF store them).

  Encoding uses tiktoken with ranks = merge order, so pair priorities are the merge list's;
  special tokens found in the text are emitted as their ids (HF behaviour, also with
  `add_special_tokens=False`). Bytes that have no token of their own are dropped.
  """

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], special_ids: Sequence[int],
               *, pre: str = 'gpt2', eos_id: int, bos_id: int, name: str = 'bpe'):
    if pre not in PRETOKENIZERS:
      raise ValueError(f'pre-tokenizer {pre!r} is not implemented: supported '
                       f'{sorted(PRETOKENIZERS)}')
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    self.name = name
    self.vocab_size = len(tokens)
    self.eos_id, self.bos_id = int(eos_id), int(bos_id)
    self.special_tokens = {tokens[i]: int(i) for i in special_ids}
    token_id = {t: i for i, t in enumerate(tokens)}

    def to_bytes(tok: str) -> bytes:
      try:
        return bytes(byte_decoder[c] for c in tok)
      except KeyError:
        raise ValueError(f'token {tok!r} is not byte-level BPE text: this tokenizer needs a '
                         "GPT-2-style vocabulary (tokenizer.ggml.model='gpt2')") from None

    special_set = set(int(i) for i in special_ids)
    self._id_bytes = [t.encode('utf-8') if i in special_set else to_bytes(t)
                      for i, t in enumerate(tokens)]
    # Ranks: single bytes 0..255, merge i -> 256 + i, specials after; rank_to_id maps back.
    ranks = {bytes([b]): b for b in range(256)}
    rank_to_id = [token_id.get(c, -1) for c in (bytes_to_unicode()[b] for b in range(256))]
    for i, merge in enumerate(merges):
      a, b = merge.split(' ')
      result = a + b
      if result not in token_id:
        raise ValueError(f'merge {i} {merge!r} produces {result!r}, which is not in the '
                         'vocabulary: the tokenizer metadata is inconsistent')
      key = to_bytes(result)
      if key not in ranks:
        ranks[key] = len(rank_to_id)
        rank_to_id.append(token_id[result])
    specials = {}
    for text, i in self.special_tokens.items():
      specials[text] = len(rank_to_id)
      rank_to_id.append(i)
    self._rank_to_id = np.asarray(rank_to_id, np.int64)
    self._enc = tiktoken.Encoding(name=f'{name}_bpe', pat_str=PRETOKENIZERS[pre],
                                  mergeable_ranks=ranks, special_tokens=specials)

  @classmethod
  def from_gguf(cls, reader) -> 'ByteLevelBPETokenizer':
    model = gguf_value(reader, 'tokenizer.ggml.model')
    if model != 'gpt2':
      raise ValueError(f'GGUF tokenizer model {model!r} is not byte-level BPE: only '
                       "tokenizer.ggml.model='gpt2' (e.g. SmolLM2) is implemented")
    tokens = list(gguf_value(reader, 'tokenizer.ggml.tokens'))
    types = list(gguf_value(reader, 'tokenizer.ggml.token_type', [1] * len(tokens)))
    merges = list(gguf_value(reader, 'tokenizer.ggml.merges'))
    special = [i for i, t in enumerate(types) if t in (GGUF_TOKEN_CONTROL,
                                                        GGUF_TOKEN_USER_DEFINED)]
    eos = int(gguf_value(reader, 'tokenizer.ggml.eos_token_id'))
    bos = int(gguf_value(reader, 'tokenizer.ggml.bos_token_id', eos))
    pre = str(gguf_value(reader, 'tokenizer.ggml.pre', 'default'))
    name = str(gguf_value(reader, 'general.basename', 'gguf'))
    return cls(tokens, merges, special, pre=pre, eos_id=eos, bos_id=bos, name=name)

  def token_id(self, text: str) -> Optional[int]:
    """Id of a special token's text, or None."""
    return self.special_tokens.get(text)

  def _map(self, ranks) -> list[int]:
    ids = self._rank_to_id[np.asarray(ranks, np.int64)] if ranks else np.zeros((0,), np.int64)
    return [int(i) for i in ids if i >= 0]

  def encode(self, text: str) -> list[int]:
    """Encodes with special tokens recognised, no BOS/EOS added."""
    return self._map(self._enc.encode(text, allowed_special='all'))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._map(r) for r in self._enc.encode_batch(list(texts), allowed_special='all')]

  def decode(self, ids: Sequence[int]) -> str:
    return b''.join(self._id_bytes[int(i)] for i in ids).decode('utf-8', errors='replace')
