"""Gen-PPL judges vs `transformers` on the same random weights, and the Gen PPL protocol vs an
independent reference (transformers tokenizers and models + a NumPy counting rule).

* GPT-2: a random `GPT2LMHeadModel` saved with `save_pretrained` loads through our HF-dir loader
  (`hub.load_gpt2`); per-token NLL equal within 1e-4 (float32).
* Llama: a random `LlamaForCausalLM` is converted to GGUF the way llama.cpp's converter does (q/k
  rows permuted, GGUF names; transformers' own GGUF reader is used to check the file) and loads
  through `hub.load_llama_gguf`, the only Llama loader we have; per-token NLL within 1e-4.
* Protocol: GPT-2 sample ids (0, 1, several EOS, EOS at position 0, EOS runs, retokenisation that
  truncates) are decoded and judged by our `evaluate.judge_scores` / `metrics.gen_ppl`, and by the
  official recipe written out here with transformers (HF tokenizer with padding=True,
  truncation, pad = EOS; model with the attention mask; per-token cross entropy) and the counting
  rule re-implemented from its description: target j >= 1 counts if it is not EOS or is the row's
  first EOS (pads are EOS, so a row without EOS that is shorter than the longest row of its call
  has its first pad counted).
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from didi_jax.checkpoint import hub
from didi_jax.data.tokenizers import GPT2_EOS, get_tokenizer, gpt2_files_dir
from didi_jax.evaluation import evaluate, judges, metrics

NLL_ATOL = 1e-4
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']     # SmolLM2's first three specials
CORPUS = [
    'The cat sat on the mat and the dog ran off into the night.',
    'In 2024 there were 12345 cats, 678 dogs and 90 birds in the town of Springfield.',
    'A quick brown fox jumps over the lazy dog; the end of the story is near.',
    'one two three four five six seven eight nine ten eleven twelve',
    'It was the best of times, it was the worst of times, it was the age of wisdom.',
]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """O(1) random weights (norm scales near 1, biases near 0) so every tensor moves the NLL."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(min(p.shape)))
  return model.eval()


def hf_token_nll(model, ids, attention_mask=None) -> np.ndarray:
  """(B, L-1) float32 NLL of ids[:, 1:], computed as the official Gen PPL code does."""
  ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
  with torch.no_grad():
    logits = model(ids, attention_mask=attention_mask).logits.float()
  logits = logits.transpose(-1, -2)
  return F.cross_entropy(logits[..., :-1], ids[..., 1:], reduction='none').numpy()


def our_token_nll(model, ids) -> np.ndarray:
  """(B, L-1) NLL through the judge's own function, jitted as `Judge` does."""
  graphdef, state = nnx.split(model)
  nll = jax.jit(functools.partial(judges._token_nll, graphdef))
  return np.asarray(nll(state, jnp.asarray(np.asarray(ids), jnp.int32)))


def assert_nll_close(got, want):
  assert got.shape == want.shape
  err = float(np.max(np.abs(got.astype(np.float64) - want)))
  assert err < NLL_ATOL, f'max per-token NLL difference {err:.3g}'
  assert float(np.std(want)) > 0.5          # the weights matter: NLLs are far from uniform


# ------------------------------------------------------------------------------------------------
# GPT-2 (HF directory: config.json + model.safetensors)


def hf_gpt2(vocab: int, *, n_positions: int, d: int, n_layer: int, n_head: int, tie: bool,
            seed: int, n_inner=None):
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d,
                                n_layer=n_layer, n_head=n_head, n_inner=n_inner,
                                tie_word_embeddings=tie, bos_token_id=vocab - 1,
                                eos_token_id=vocab - 1, attn_implementation='eager')
  return randomize_(transformers.GPT2LMHeadModel(cfg), seed)


@pytest.mark.parametrize('tie', [True, False])
def test_gpt2_token_nll_matches_transformers(tmp_path, tie):
  hf = hf_gpt2(384, n_positions=40, d=64, n_layer=2, n_head=4, tie=tie, seed=1,
               n_inner=None if tie else 160)
  hf.save_pretrained(str(tmp_path))
  with safetensors.safe_open(str(tmp_path / 'model.safetensors'), 'np') as f:
    keys = set(f.keys())
  assert 'transformer.h.1.attn.c_attn.weight' in keys and ('lm_head.weight' in keys) != tie
  ours = hub.load_gpt2(str(tmp_path))
  assert ours.cfg.tie_embeddings == tie and ours.cfg.d_mlp == (256 if tie else 160)
  rng = np.random.default_rng(2)
  for shape in ((3, 40), (2, 9)):             # all learned positions, and a short input
    ids = rng.integers(0, 384, shape)
    assert_nll_close(our_token_nll(ours, ids), hf_token_nll(hf, ids))


# ------------------------------------------------------------------------------------------------
# Llama (GGUF as llama.cpp writes it)


def train_tiny_bpe(vocab_size: int = 400):
  """(tokens by id, merges) of a byte-level BPE trained by `tokenizers` on CORPUS.

  Trained with the plain GPT-2 pre-tokenizer, so it learns digit merges ('2 0', ...) that the
  SmolLM2 pre-tokenizer (digits split one by one) must never apply."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 3, trainer)
  model = json.loads(tok.to_str())['model']
  tokens = [t for t, _ in sorted(model['vocab'].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
  assert tokens[:3] == SPECIALS and len(tokens) == vocab_size
  assert any(a.isdigit() and b.isdigit() for a, b in (m.split(' ') for m in merges))
  return tokens, merges


def smollm2_style_tokenizer(tokens, merges):
  """The SmolLM2 tokenizer.json pipeline (Digits(individual) then ByteLevel), in `tokenizers`,
  with pad = EOS = '<|endoftext|>' as the Gen PPL code sets it."""
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                   merges=[tuple(m.split(' ')) for m in merges])
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(SPECIALS)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0],
                                              pad_token=SPECIALS[0])


def hf_llama(vocab: int, *, tie: bool, seed: int, context: int = 96):
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
      rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, attn_implementation='eager')
  return randomize_(transformers.LlamaForCausalLM(cfg), seed)


def llamacpp_permute(weights, n_head, n_head_kv=None):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in NumPy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


_GGUF_BLOCK_NAMES = {
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down', 'input_layernorm': 'attn_norm',
    'post_attention_layernorm': 'ffn_norm'}


def write_llama_gguf(path: str, hf, tokens, merges):
  """convert_hf_to_gguf.py for a llama model: metadata, GGUF names, q/k permuted, f32."""
  c = hf.config
  n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
  w = gguf.GGUFWriter(path, 'llama')
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_rope_dimension_count(c.hidden_size // n_head)
  w.add_head_count(n_head)
  w.add_head_count_kv(n_kv)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'] if getattr(c, 'rope_parameters', None)
                       else c.rope_theta)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(tokens)
  w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) +
                    [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  top = {'model.embed_tokens.weight': 'token_embd.weight',
         'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight'}
  for name, t in hf.state_dict().items():
    if name == 'lm_head.weight' and c.tie_word_embeddings:
      continue
    arr = t.numpy()
    if name in top:
      w.add_tensor(top[name], np.ascontiguousarray(arr))
      continue
    _, _, i, *rest = name.split('.')
    base = '.'.join(rest[:-1])
    if base == 'self_attn.q_proj':
      arr = llamacpp_permute(arr, n_head, n_head)
    elif base == 'self_attn.k_proj':
      arr = llamacpp_permute(arr, n_head, n_kv)
    w.add_tensor(f'blk.{i}.{_GGUF_BLOCK_NAMES[base]}.weight', np.ascontiguousarray(arr))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope='module')
def tiny_bpe():
  return train_tiny_bpe()


@pytest.mark.parametrize('tie', [True, False])
def test_llama_gguf_token_nll_matches_transformers(tmp_path, tiny_bpe, tie):
  tokens, merges = tiny_bpe
  hf = hf_llama(len(tokens), tie=tie, seed=3)
  write_llama_gguf(str(tmp_path / 'tiny.gguf'), hf, tokens, merges)
  # transformers' own GGUF reader (its reverse permute) gets the original weights back: the file
  # is what llama.cpp would have written.
  back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file='tiny.gguf')
  want_sd, got_sd = hf.state_dict(), back.state_dict()
  for k, v in want_sd.items():
    assert torch.equal(got_sd[k], v), k
  ours, _ = hub.load_llama_gguf(str(tmp_path / 'tiny.gguf'))
  assert (ours.cfg.n_kv_head, ours.cfg.rope_theta, ours.cfg.tie_embeddings) == (2, 50000.0, tie)
  rng = np.random.default_rng(4)
  for shape in ((3, 96), (2, 11)):
    ids = rng.integers(0, len(tokens), shape)
    assert_nll_close(our_token_nll(ours, ids), hf_token_nll(hf, ids))


# ------------------------------------------------------------------------------------------------
# The Gen PPL protocol


def reference_counted(ids_BxC: np.ndarray, eos: int) -> np.ndarray:
  """(B, C-1): target j >= 1 counts iff ids[j] != EOS, or ids[j] is the first EOS of its row
  (EOS at position 0 included in the count). Written as a plain loop, from the rule's text."""
  B, C = ids_BxC.shape
  out = np.zeros((B, C - 1), bool)
  for b in range(B):
    seen = 0
    for j in range(C):
      is_eos = int(ids_BxC[b, j]) == eos
      seen += is_eos
      if j >= 1 and (not is_eos or seen == 1):
        out[b, j - 1] = True
  return out


def reference_scores(hf_model, hf_tok, texts, *, context: int, eos: int, group_size: int):
  """The official compute_generative_perplexity, one tokenizer call per group (padding=True)."""
  nll, count, batches = [], [], []
  for start in range(0, len(texts), group_size):
    enc = hf_tok(list(texts[start:start + group_size]), return_tensors='pt',
                 return_token_type_ids=False, return_attention_mask=True, truncation=True,
                 padding=True, max_length=context)
    ids = enc['input_ids']
    assert hf_tok.pad_token_id == eos
    tok_nll = hf_token_nll(hf_model, ids, enc['attention_mask']).astype(np.float64)
    counted = reference_counted(ids.numpy(), eos)
    nll.append(np.where(counted, tok_nll, 0.0).sum(1))
    count.append(counted.sum(1))
    batches.append((ids.numpy(), enc['attention_mask'].numpy(), counted))
  return np.concatenate(nll), np.concatenate(count), batches


SAMPLE_LEN = 16


def gpt2_samples(hf_tok) -> np.ndarray:
  """(S, 16) GPT-2 ids like a diffusion model's samples, built with the reference tokenizer."""
  e = GPT2_EOS

  def t(text):
    return hf_tok(text, add_special_tokens=False)['input_ids']

  filler = t(' and so the story went on and on without any end in sight at all today')
  rows = [
      t(' The cat sat on the mat and the dog ran off into the night.'),      # no EOS
      t(' one two three four') + [e] + t(' five six seven eight nine'),      # one EOS
      t(' a b') + [e, e] + t(' c d') + [e] + t(' e f') + [e],                # several, repeats
      [e] + t(' starts with a boundary') + [e] + t(' then more'),            # EOS at position 0
      t(' short doc.') + [e] * SAMPLE_LEN,                                   # EOS padding run
      [e] * SAMPLE_LEN,                                                      # only EOS
      list(np.random.default_rng(5).integers(0, e, SAMPLE_LEN)),           # random ids
      [i for ch in ' no boundary here' for i in t(ch)],                      # one id per char
      t(' In 2024 there were 12345 cats, 678 dogs.'),                        # digits
  ]
  return np.asarray([(r + filler)[:SAMPLE_LEN] for r in rows], np.int64)


def check_protocol(judge, hf_model, hf_tok, samples, *, context: int, eos: int):
  """Our decode -> judge_scores -> gen_ppl against the reference, for several groupings."""
  ours_tok = get_tokenizer('gpt2')
  texts = [ours_tok.decode(r) for r in samples]
  # The official decode (self.tokenizer.batch_decode) of the GPT-2 samples gives the same texts.
  gpt2_ref = gpt2_reference_tokenizer()
  assert texts == gpt2_ref.batch_decode(samples.tolist())
  seen = set()
  for group_size in (len(texts), 3):
    want_nll, want_count, batches = reference_scores(hf_model, hf_tok, texts, context=context,
                                                     eos=eos, group_size=group_size)
    for ids, mask, counted in batches:     # which protocol cases this grouping exercises
      n = mask.sum(1)
      for b in range(ids.shape[0]):
        n_eos = int((ids[b, :n[b]] == eos).sum())
        seen.add(('eos', min(n_eos, 3)))
        if n_eos == 0 and n[b] < ids.shape[1]:
          assert counted[b, n[b] - 1]                  # the first pad is a counted target
          seen.add('first pad counted')
        if n[b] == context:
          seen.add('truncated')
        if ids[b, 0] == eos:
          seen.add('eos at 0')
    for batch_size in (2, 5):
      nll, count = evaluate.judge_scores(judge, texts, group_size, batch_size)
      np.testing.assert_array_equal(count, want_count)
      assert np.all(np.abs(nll - want_nll) <= NLL_ATOL * np.maximum(count, 1)), (nll, want_nll)
      ppl = metrics.gen_ppl(nll, count)
      assert ppl == pytest.approx(math.exp(want_nll.sum() / want_count.sum()), rel=1e-5)
  assert seen >= {('eos', 0), ('eos', 1), ('eos', 3), 'first pad counted', 'truncated',
                  'eos at 0'}, seen


def check_features(judge, hf_trunk, texts):
  """Judge.features (MAUVE's input) = the reference trunk's last hidden state (after the final
  norm) at each text's last judge token, or its mean over the text's tokens; truncation at the
  context and padding of a shorter row in the batch included."""
  rows = judge.tokenize(texts)
  assert len({len(r) for r in rows}) > 1 and max(len(r) for r in rows) == judge.context
  with torch.no_grad():
    hidden = [hf_trunk(torch.tensor([r])).last_hidden_state[0].numpy() for r in rows]
  for pool, want in (('last', [h[-1] for h in hidden]), ('mean', [h.mean(0) for h in hidden])):
    got = judge.features(texts, batch_size=2, pool=pool)
    assert got.shape == (len(texts), hidden[0].shape[-1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def gpt2_reference_tokenizer():
  """transformers' GPT2Tokenizer over the same vocab.json/merges.txt, pad = EOS (official)."""
  with tempfile.TemporaryDirectory() as d:
    shutil.copy(os.path.join(gpt2_files_dir(), 'encoder.json'), os.path.join(d, 'vocab.json'))
    shutil.copy(os.path.join(gpt2_files_dir(), 'vocab.bpe'), os.path.join(d, 'merges.txt'))
    tok = transformers.GPT2Tokenizer.from_pretrained(d)
  tok.pad_token = tok.eos_token
  assert tok.eos_token_id == GPT2_EOS and len(tok) == 50257
  return tok


def test_gen_ppl_protocol_gpt2_judge_matches_reference(tmp_path):
  context = 14
  hf = hf_gpt2(50257, n_positions=32, d=32, n_layer=2, n_head=2, tie=True, seed=6)
  hf.save_pretrained(str(tmp_path))
  judge = judges.load_judge(str(tmp_path), context)
  assert judge.eos_id == judge.pad_id == GPT2_EOS
  check_protocol(judge, hf, gpt2_reference_tokenizer(), gpt2_samples(gpt2_reference_tokenizer()),
                 context=context, eos=GPT2_EOS)
  check_features(judge, hf.transformer, gpt2_reference_tokenizer().batch_decode(
      gpt2_samples(gpt2_reference_tokenizer()).tolist()))


def test_gen_ppl_protocol_llama_gguf_judge_matches_reference(tmp_path, tiny_bpe):
  tokens, merges = tiny_bpe
  context = 64
  hf = hf_llama(len(tokens), tie=False, seed=7)
  path = str(tmp_path / 'judge.gguf')
  write_llama_gguf(path, hf, tokens, merges)
  judge = judges.load_judge(path, context)
  ref_tok = smollm2_style_tokenizer(tokens, merges)
  eos = ref_tok.convert_tokens_to_ids('<|endoftext|>')
  assert judge.eos_id == judge.pad_id == eos == 0         # the document separator, not im_end
  texts = ['In 2024 there were 12345 cats<|endoftext|>', 'the  end\n\n of 90 birds']
  assert judge.tokenize(texts) == ref_tok(texts, add_special_tokens=False)['input_ids']
  check_protocol(judge, hf, ref_tok, gpt2_samples(gpt2_reference_tokenizer()), context=context,
                 eos=eos)
  check_features(judge, hf.model, texts + ['word ' * 80])
