r"""Prompts: the placeholder syntax, tokenisation, and the layout of one output sequence.

A prompt says which tokens of the output are fixed and which the model fills. Three forms:

* **text** (`str`). Without a placeholder it is a *prefix*: its tokens are positions 0.. of the
  output and the rest, up to `length`, is filled. With placeholders it is a *template*:
    `[MASK]{n}`  n tokens (model tokens: bytes for the byte tokenizer, BPE tokens for GPT-2) to fill;
    `[MASK]{*}`  as many tokens as make the output `length` long (at most one per prompt);
  e.g. `"To be, or [MASK]{40} the question"` (infilling), `"[MASK]{*}the end."` (a suffix: the
  text ends the output). A template is laid out from position 0; if it is shorter than `length`
  the positions after it are filled as well (a continuation).
  Only the exact form `[MASK]{digits}` / `[MASK]{*}` is a placeholder, and only when it does not
  sit inside a word (a letter, digit or `_` directly on *both* sides, as in `un[MASK]{2}able`,
  makes it text). A backslash right before it (`\[MASK]{3}`) makes it the literal text `[MASK]{3}`
  (the backslash is dropped; every other backslash is kept). Everything else is text: a bare
  `[MASK]`, `[MASK]{x}`, and special-token spellings such as `<|endoftext|>` are encoded as the
  characters they are, never as control tokens.
* **segments** (`template('To be, or ', 40, ' the question')`): text pieces (never parsed), ints
  (that many tokens to fill) and `FILL` (= `[MASK]{*}`).
* **ids** (a 1-D int array): the tokens themselves; -1 (or the model's [MASK] id) marks a position
  to fill. The only form that needs no tokenizer.

Tokens of a text piece are exactly `tokenizer.encode(piece)` (GPT-2 BPE: `encode_ordinary`, so
`<|endoftext|>` in the text is BPE text; byte: its UTF-8 bytes). Pieces are encoded separately, so
a template's fixed tokens are the concatenation of its pieces' encodings. With GPT-2 BPE a space
next to a placeholder is a token of its own (`"or "` -> `or`, ` `); write it on one side only, e.g.
`"To be, or[MASK]{40} the question"`, which lets the filled span start with a space-prefixed token.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import numpy as np

from didi_jax import errors

FILL = Ellipsis                  # a template segment: fill up to `length` ([MASK]{*})
MASKED = -1                      # a position to fill, in layouts and id prompts
PLACEHOLDER = re.compile(r'(\\?)\[MASK\]\{(\d+|\*)\}')
_WORD = re.compile(r'\w')


class PromptError(errors.UserError, ValueError):
  """A prompt that cannot be laid out (too long, bad ids, no tokenizer); one line with the fix."""


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt given as segments: str (text, not parsed), int n (n tokens to fill), FILL."""
  segments: tuple

  def __repr__(self):
    return 'template(' + ', '.join('FILL' if s is FILL else repr(s) for s in self.segments) + ')'


def template(*segments) -> Template:
  """A prompt from segments: text pieces, ints (that many tokens to fill) and `FILL`."""
  for s in segments:
    if not (isinstance(s, str) or s is FILL or (isinstance(s, (int, np.integer))
                                                 and not isinstance(s, bool) and s >= 0)):
      raise PromptError(f'template segment {s!r} is not text, a count >= 0 or FILL: use e.g. '
                        "template('To be, or ', 40, ' the question')")
  return Template(tuple(int(s) if isinstance(s, (int, np.integer)) else s for s in segments))


def _is_word_char(ch: str) -> bool:
  return bool(_WORD.match(ch))


def parse(text: str) -> list:
  """Segments of a text prompt: str pieces, ints (placeholders) and FILL (see the module doc)."""
  out: list = []
  buf: list[str] = []
  pos = 0
  for m in PLACEHOLDER.finditer(text):
    a, b = m.span()
    escaped = m.group(1) == '\\'
    body = text[a + len(m.group(1)):b]
    inside_word = (a > 0 and _is_word_char(text[a - 1]) and b < len(text)
                   and _is_word_char(text[b]))
    buf.append(text[pos:a])
    if escaped or inside_word:
      buf.append(body)          # literal text ([MASK]{n} without the escaping backslash)
    else:
      if buf and ''.join(buf):
        out.append(''.join(buf))
      buf = []
      out.append(FILL if m.group(2) == '*' else int(m.group(2)))
    pos = b
  buf.append(text[pos:])
  if ''.join(buf):
    out.append(''.join(buf))
  return out


@dataclasses.dataclass
class Layout:
  """A prompt in tokens: `tokens` (MASKED where filled) and where a FILL goes (None: none)."""
  tokens: np.ndarray             # int64 (T,)
  fill_at: Optional[int]         # index into tokens where FILL's run is inserted
  is_prefix: bool                # a bare prefix (no placeholder): default length = a window

  @property
  def fixed_count(self) -> int:
    return int(np.sum(self.tokens != MASKED))

  def resolve(self, length: int, index: int = 0) -> np.ndarray:
    """The output's (length,) int64 ids, MASKED where the model fills."""
    t = len(self.tokens)
    if self.fill_at is not None:
      if t > length:
        raise PromptError(f'prompt {index} needs {t} tokens besides [MASK]{{*}} but length='
                          f'{length}: raise the length (--length) or shorten the prompt')
      fill = np.full(length - t, MASKED, np.int64)
      return np.concatenate([self.tokens[:self.fill_at], fill, self.tokens[self.fill_at:]])
    if t > length:
      raise PromptError(f'prompt {index} is {t} tokens long but length={length}: raise the '
                        'length (--length) or shorten the prompt')
    return np.concatenate([self.tokens, np.full(length - t, MASKED, np.int64)])

  def default_length(self, window: Optional[int]) -> int:
    """A bare prefix or a FILL template: one window (at least the prompt); else the template."""
    if self.is_prefix or self.fill_at is not None:
      if window is None:
        raise PromptError('this model has no fixed length: pass length=N')
      return max(window, len(self.tokens))
    return len(self.tokens)


def layout(prompt: Any, tokenizer, mask_id: int, index: int = 0) -> Layout:
  """The Layout of one prompt (str, Template, or 1-D int ids); see the module docstring."""
  if isinstance(prompt, str):
    segments = parse(prompt)
    is_prefix = all(isinstance(s, str) for s in segments)
  elif isinstance(prompt, Template):
    segments, is_prefix = list(prompt.segments), False
  elif isinstance(prompt, (np.ndarray, list, tuple)) and _is_id_list(prompt):
    ids = np.asarray(prompt, np.int64).reshape(-1)
    ids = np.where(ids == mask_id, MASKED, ids)
    bad = ids[(ids < MASKED) | (ids >= mask_id)]
    if bad.size:
      raise PromptError(f'prompt {index} has ids {bad[:5].tolist()} outside [0, {mask_id}): use '
                        f'token ids, and -1 (or {mask_id}) for positions to fill')
    return Layout(ids, None, False)
  elif isinstance(prompt, (bytes, bytearray)):
    raise PromptError(f'prompt {index} is bytes, not text: decode it first (e.g. '
                      "prompt.decode('utf-8')), or pass token ids as a 1-D int array")
  else:
    raise PromptError(f'prompt {index} is a {type(prompt).__name__}: pass text, '
                      'template(...) segments, or a 1-D array of token ids (-1 = fill)')
  pieces: list[np.ndarray] = []
  fill_at = None
  n = 0
  for s in segments:
    if s is FILL:
      if fill_at is not None:
        raise PromptError(f'prompt {index} has more than one [MASK]{{*}}: keep one and give the '
                          'others a count, [MASK]{n}')
      fill_at = n
      continue
    if isinstance(s, str):
      ids = encode(tokenizer, s, mask_id, index)
    elif int(s) == 0:
      raise PromptError(f'prompt {index} has [MASK]{{0}}, which fills nothing: write the number '
                        'of tokens to fill, [MASK]{n} with n >= 1, or remove it')
    else:
      ids = np.full(int(s), MASKED, np.int64)
    pieces.append(ids)
    n += len(ids)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  return Layout(tokens, fill_at, is_prefix)


def _is_id_list(prompt) -> bool:
  arr = np.asarray(prompt)
  return arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))


def encode(tokenizer, text: str, mask_id: int, index: int = 0) -> np.ndarray:
  """Exactly `tokenizer.encode(text)` as int64, checked to be real tokens (never [MASK])."""
  if not text:
    return np.zeros(0, np.int64)
  if tokenizer is None:
    raise PromptError(f'prompt {index} is text but this model has no tokenizer: pass '
                      'tokenizer=... (e.g. "gpt2" or "byte") or give the prompt as token ids')
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    raise PromptError(f'prompt {index} is not valid text: character {e.start} is an undecodable '
                      f'byte ({text[e.start]!r}, e.g. input that is not UTF-8): convert the input '
                      'to UTF-8 (iconv -t utf-8) or pass token ids') from None
  ids = np.asarray(tokenizer.encode(text), np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= mask_id):
    raise PromptError(f'the tokenizer gave ids outside [0, {mask_id}) for prompt {index}: the '
                      'tokenizer does not match the model (pass tokenizer=...)')
  return ids


def display(tokenizer, ids: Sequence[int], mask_id: int, mask_char: str = '_') -> str:
  """Text of ids with every still-masked position shown as `mask_char` (for --show-steps)."""
  out, run = [], []
  for i in ids:
    i = int(i)
    if i == mask_id or i == MASKED:
      if run:
        out.append(tokenizer.decode(run))
        run = []
      out.append(mask_char)
    else:
      run.append(i)
  if run:
    out.append(tokenizer.decode(run))
  return ''.join(out)
