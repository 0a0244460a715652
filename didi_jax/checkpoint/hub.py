"""Loading the judges' causal LMs: GPT-2 from the HF hub or a local HF folder (safetensors), and
Llama from a llama.cpp GGUF file (SmolLM2, the offline judge). Each fills the model name by name
and reports every missing, unexpected or mis-shaped tensor in one error.
"""
from __future__ import annotations

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from didi_jax.checkpoint import hf
from didi_jax.data.bpe import ByteLevelBPETokenizer, gguf_value
from didi_jax.models.gpt2 import GPT2, GPT2Config
from didi_jax.models.llama import Llama, LlamaConfig

HF_GPT2_REPOS = {               # short names -> HF hub repositories
    'gpt2': 'openai-community/gpt2',
    'gpt2-medium': 'openai-community/gpt2-medium',
    'gpt2-large': 'openai-community/gpt2-large',
    'gpt2-xl': 'openai-community/gpt2-xl',
}
_GPT2_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias')  # HF causal-mask buffers


def _assign(abstract_model: nnx.Module, tensors: dict, source: str) -> nnx.Module:
  """Fills an abstract model from {dotted name: array}; one error lists every mismatch."""
  graphdef, state = nnx.split(abstract_model)
  flat = list(nnx.to_flat_state(state))
  expected = {'.'.join(str(p) for p in path): var for path, var in flat}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(f'{n}: file {tuple(np.shape(tensors[n]))} vs model {tuple(v.shape)}'
                     for n, v in expected.items()
                     if n in tensors and tuple(np.shape(tensors[n])) != tuple(v.shape))
  if missing or unexpected or misshaped:
    raise ValueError(f'{source} does not match the model: missing {missing[:8]} '
                     f'({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), '
                     f'mis-shaped {misshaped[:8]} ({len(misshaped)}); check that the checkpoint '
                     'and its config.json/metadata belong together')
  items = [(path, var.replace(jnp.asarray(tensors['.'.join(str(p) for p in path)],
                                          jnp.float32)))
           for path, var in flat]
  return nnx.merge(graphdef, nnx.from_flat_state(items))


def _read_safetensors(path: str) -> dict:
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(single):
    return load_file(single)
  if os.path.exists(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for shard in shards:
      out.update(load_file(os.path.join(path, shard)))
    return out
  raise FileNotFoundError(f'{path} has no model.safetensors (or sharded index): save the HF '
                          'model with save_pretrained(..., safe_serialization=True)')


def resolve_gpt2_source(source: str) -> str:
  """'hf:ORG/NAME' or a short name ('gpt2-large') -> local snapshot dir; a dir passes through."""
  if source in HF_GPT2_REPOS:
    source = 'hf:' + HF_GPT2_REPOS[source]
  if source.startswith('hf:'):
    return hf.snapshot(source[3:], ['config.json', 'model.safetensors',
                                     'model.safetensors.index.json', 'model-*.safetensors'])
  if not os.path.isdir(source):
    raise FileNotFoundError(f'GPT-2 source {source!r} is not a directory: pass a local HF dir '
                            "(config.json + model.safetensors), 'hf:ORG/NAME' or one of "
                            f'{sorted(HF_GPT2_REPOS)}')
  return source


def load_gpt2(source: str, dtype=jnp.float32) -> GPT2:
  """GPT-2 from a local HF dir (config.json + model.safetensors), 'hf:ORG/NAME' or a short name.

  Accepts a 'transformer.' prefix, ignores the attn.bias/masked_bias buffers and a tied
  lm_head.weight; every other difference is one error naming all mismatches.
  """
  path = resolve_gpt2_source(source)
  with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  if hf.get('model_type', 'gpt2') != 'gpt2':
    raise ValueError(f'{path} holds a {hf.get("model_type")!r} model, not GPT-2: use a .gguf file '
                     'for Llama-family judges')
  cfg = GPT2Config.from_hf(hf, compute_dtype=jnp.dtype(dtype).name)
  tensors = {}
  for name, arr in _read_safetensors(path).items():
    name = name[len('transformer.'):] if name.startswith('transformer.') else name
    if name.endswith(_GPT2_IGNORED_SUFFIXES):
      continue
    if name == 'lm_head.weight' and cfg.tie_embeddings:
      continue
    tensors[name] = arr
  abstract = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))
  return _assign(abstract, tensors, path)


def unpermute_gguf_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts llama.cpp's convert permute (rotate-half -> interleaved rows per head)."""
  out, d_in = w_OxI.shape
  return w_OxI.reshape(n_head, out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_hf_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permute (HF rotate-half rows -> GGUF interleaved rows)."""
  out, d_in = w_OxI.shape
  return w_OxI.reshape(n_head, 2, out // n_head // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _gguf_tensor(t) -> np.ndarray:
  if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    arr = np.asarray(t.data, np.float32)
  else:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
  shape = tuple(int(s) for s in reversed(t.shape))   # GGUF lists dims innermost first
  return np.asarray(arr, np.float32).reshape(shape)


def llama_config_from_gguf(reader, compute_dtype: str = 'float32') -> LlamaConfig:
  arch = gguf_value(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'GGUF architecture {arch!r} is not supported: only llama-architecture '
                     'files (e.g. SmolLM2) load here')
  if f'{arch}.rope.scaling.type' in reader.fields and gguf_value(
      reader, f'{arch}.rope.scaling.type') not in ('none', ''):
    raise ValueError('GGUF model uses rope scaling, which is not implemented: use a model '
                     'without rope scaling')
  names = {t.name for t in reader.tensors}
  d = int(gguf_value(reader, f'{arch}.embedding_length'))
  n_head = int(gguf_value(reader, f'{arch}.attention.head_count'))
  rot = int(gguf_value(reader, f'{arch}.rope.dimension_count', d // n_head))
  if rot != d // n_head:
    raise ValueError(f'GGUF rope.dimension_count={rot} differs from the head dim {d // n_head}: '
                     'partial rotary is not implemented')
  if f'{arch}.vocab_size' in reader.fields:
    vocab = int(gguf_value(reader, f'{arch}.vocab_size'))
  else:
    vocab = len(gguf_value(reader, 'tokenizer.ggml.tokens'))
  return LlamaConfig(
      vocab_size=vocab,
      context_length=int(gguf_value(reader, f'{arch}.context_length')), d_model=d,
      n_layer=int(gguf_value(reader, f'{arch}.block_count')), n_head=n_head,
      n_kv_head=int(gguf_value(reader, f'{arch}.attention.head_count_kv', n_head)),
      d_ff=int(gguf_value(reader, f'{arch}.feed_forward_length')),
      rope_theta=float(gguf_value(reader, f'{arch}.rope.freq_base', 10000.0)),
      rms_eps=float(gguf_value(reader, f'{arch}.attention.layer_norm_rms_epsilon')),
      tie_embeddings='output.weight' not in names, compute_dtype=compute_dtype)


def load_llama_gguf(path: str, dtype=jnp.float32):
  """(Llama model, ByteLevelBPETokenizer) from a llama-architecture GGUF file.

  Quantised tensors are dequantised to float32; q/k rows are un-permuted back to the HF
  rotate-half layout (llama.cpp's converter interleaves them for its rotary kernel).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} not found: fix the path')
  reader = gguf.GGUFReader(path)
  cfg = llama_config_from_gguf(reader, jnp.dtype(dtype).name)
  tensors = {}
  for t in reader.tensors:
    arr = _gguf_tensor(t)
    name = t.name
    if name.endswith('.attn_q.weight'):
      arr = unpermute_gguf_qk(arr, cfg.n_head)
    elif name.endswith('.attn_k.weight'):
      arr = unpermute_gguf_qk(arr, cfg.n_kv_head)
    if name.startswith('blk.') and arr.ndim == 2:
      arr = arr.T                                   # (out, in) -> (in, out)
    tensors[name] = arr
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  model = _assign(abstract, tensors, path)
  return model, ByteLevelBPETokenizer.from_gguf(reader)
