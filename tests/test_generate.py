"""Generation for users (`didi_jax.generate`, `python -m didi_jax.generate`): values, not shapes.

* fixed tokens are never changed and only masked positions are filled, for every sampler;
* the law of the filled positions given a prompt equals the exact law of the sampler's chain for
  a fake denoiser (closed form, NumPy enumeration; chi-square, with a power check that the law
  given another prompt token is rejected), for ancestral, cached, top-p, float64 and RGAS;
* semi-autoregressive output: requested length, earlier windows kept, cost counted per window;
* a custom reward steers toward / away from its target; a zero reward reproduces plain sampling
  draw for draw;
* one compiled program per (batch, bucket), not per prompt length; deterministic for a seed;
* the tokenizer round trip at the boundaries (placeholders, `<|endoftext|>`, bare `[MASK]`);
* the command line on a smoke checkpoint (saved through the exporter) and on the shipped teacher.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

import didi_jax
from didi_jax import config as config_lib
from didi_jax import diffusion
from didi_jax import errors
from didi_jax import generation
from didi_jax.data import tokenizers
from didi_jax.generation import cli
from didi_jax.generation import core
from didi_jax.generation import prompts as prompts_lib
from didi_jax.generation import rewards
from didi_jax.models import discriminator as disc_lib
from didi_jax.models import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P_MIN = 1e-4
# Tiny programs: XLA's LLVM optimisation dominates the runtime, so skip it (same semantics).
FAST = {'compiler_options': {'xla_backend_optimization_level': 0}}
BYTE = tokenizers.get_tokenizer('byte')

# ---------------------------------------------------------------------------------------------
# A fake denoiser with a closed-form law: V = 4 (tokens 0..2, [MASK] = 3), L = 3; the logits at
# position l depend on the tokens at the other positions, so the order of reveals matters.

V, MASK, L = 4, 3, 3
_rng = np.random.default_rng(1)      # every conditional below has 4+ states, also with top-p
W = _rng.normal(0, 1.0, (L, V))
U = _rng.normal(0, 1.0, (L, L, V, V)) * (1 - np.eye(L))[:, :, None, None]


def fake_denoiser(x_BxL, sigma_B):
  oh = jax.nn.one_hot(x_BxL, V, dtype=jnp.float32)
  inter = jnp.einsum('bjv,ljvu->blu', oh, jnp.asarray(U, jnp.float32))
  return jnp.asarray(W, jnp.float32) + inter + 0.0 * sigma_B[:, None, None]


def np_logits(x):
  return np.stack([W[l] + sum(U[l, j, x[j]] for j in range(L)) for l in range(L)])


def np_softmax(z):
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def np_top_p(p, top_p):
  out = np.zeros_like(p)
  for r in range(p.shape[0]):
    total = 0.0
    for v in sorted(range(p.shape[1]), key=lambda v: (-p[r, v], v)):
      if total >= top_p:
        break
      out[r, v] = p[r, v]
      total += p[r, v]
  return out / out.sum(-1, keepdims=True)


def subs_probs(x, top_p=1.0, tilt=None):
  z = np_logits(x)
  z[:, MASK] = -np.inf
  if tilt is not None:
    z = tilt(z, x)
  p = np_softmax(z)
  return np_top_p(p, top_p) if top_p < 1 else p


def exact_law(x0, steps, *, t_min=1e-5, top_p=1.0, tilt_fn=None):
  """Exact law of the sampler's output started from x0 (MASK where filled): the §8.2 chain,
  with an optional per-step tilt tilt_fn(i) -> (z, x) -> z', then noise removal (untilted)."""
  dist = {tuple(int(v) for v in x0): 1.0}
  dt = (1 - t_min) / steps
  for i, t in enumerate(np.linspace(1.0, t_min, steps + 1)[:-1]):
    a_t, a_s = diffusion.alpha(t), diffusion.alpha(t - dt)
    new = collections.defaultdict(float)
    for x, px in dist.items():
      p = subs_probs(x, top_p, tilt_fn(i) if tilt_fn else None)
      per = []
      for l in range(L):
        if x[l] != MASK:
          per.append(np.eye(V)[x[l]])
        else:
          w = p[l] * (a_s - a_t)
          w[MASK] = 1 - a_s
          per.append(w / w.sum())
      for y in itertools.product(range(V), repeat=L):
        new[y] += px * np.prod([per[l][y[l]] for l in range(L)])
    dist = new
  final = collections.defaultdict(float)
  for x, px in dist.items():
    p = subs_probs(x, top_p)
    per = [np.eye(V)[x[l]] if x[l] != MASK else p[l] for l in range(L)]
    for y in itertools.product(range(V - 1), repeat=L):
      final[y] += px * np.prod([per[l][y[l]] for l in range(L)])
  return final


def chi2_pvalue(ids_NxL, law):
  codes = np.asarray(ids_NxL) @ (V ** np.arange(L))
  counts = np.bincount(codes, minlength=V ** L)
  expected = np.zeros(V ** L)
  for y, p in law.items():
    expected[np.dot(y, V ** np.arange(L))] = p
  zero = expected < 1e-12
  assert counts[zero].sum() == 0, 'impossible states drawn'
  assert np.sum(~zero) >= 3, 'a degenerate law has no power'
  return sps.chisquare(counts[~zero], expected[~zero] / expected[~zero].sum()
                       * counts.sum()).pvalue


def fake_generator():
  """On one device: these programs are tiny, and an 8-way SPMD compile costs more than it saves."""
  return generation.load(fake_denoiser, vocab_size=V, length=L, jit_kwargs=FAST,
                         devices=jax.devices()[:1])


FAV = 1


def fav_score(q, sigma):
  del sigma
  return q[..., FAV]


def fav_reward(weight):
  """Toward token FAV (weight > 0) or away from it; one program for every weight."""
  return generation.TokenReward(fav_score, weight=weight)


def closed_form_tilt(weight, steps, h_start, h_end):
  """The tilt of a TokenReward w·q[FAV] at masked rows (docs/method.md §8.3 steps 3-6)."""
  def at_step(i):
    h = h_start + (h_end - h_start) * i / max(1, steps - 1)

    def tilt(z, x):
      q = np_softmax(z)
      g = weight * q[:, FAV:FAV + 1] * (np.eye(V)[FAV][None] - q)
      g[:, MASK] = 0
      g[np.asarray(x) != MASK] = 0
      return z + h * np.clip(g, -1, 1)
    return tilt
  return at_step


PROMPTS = [np.array([1, -1, -1]), np.array([-1, 2, -1]), np.array([-1, -1, 0])]
N_PER_PROMPT = 8000
STEPS = 3


@pytest.mark.parametrize('case', ['ancestral', 'cached', 'top_p', 'float64', 'rgas_zero',
                                  'rgas_tilt'])
def test_conditional_law_matches_exact_chain(case):
  kw, law_kw = {'sampler': 'cached'}, {}
  if case == 'ancestral':
    kw['sampler'] = 'ancestral'
  elif case == 'top_p':
    kw['top_p'], law_kw['top_p'] = 0.8, 0.8
  elif case == 'float64':
    kw['precision'] = 'float64'
  elif case == 'rgas_zero':       # M = 4 candidates with equal rewards: the plain law
    kw.update(sampler='rgas', reward=fav_reward(0.0))
  elif case == 'rgas_tilt':       # tilt only, closed form
    kw.update(sampler='rgas', reward=fav_reward(0.5),
              rgas={'rerank_ratio': 0.0, 'h_start': 1.0, 'h_end': 3.0})
    law_kw['tilt_fn'] = closed_form_tilt(0.5, STEPS, 1.0, 3.0)
  gen = fake_generator()
  n = N_PER_PROMPT * len(PROMPTS)
  run = lambda: gen.generate(PROMPTS, nfe=STEPS, seed=1, num_samples=N_PER_PROMPT,  # noqa: E731
                             batch_size=n, **kw)
  if case == 'float64':
    with jax.enable_x64(True):
      res = run()
  else:
    res = run()
  ids = np.stack(res.ids).reshape(len(PROMPTS), N_PER_PROMPT, L)
  for prompt, draws in zip(PROMPTS, ids):
    fixed = prompt >= 0
    assert np.all(draws[:, fixed] == prompt[fixed])
    x0 = np.where(fixed, prompt, MASK)
    assert chi2_pvalue(draws, exact_law(x0, STEPS, **law_kw)) > P_MIN, (case, prompt)
  if case == 'cached':
    # Power: the law given another prompt token (or the untilted law for RGAS) is rejected.
    other = exact_law(np.array([2, MASK, MASK]), STEPS)
    other = {(1,) + y[1:]: p for y, p in other.items() if y[0] == 2}
    assert chi2_pvalue(ids[0], other) < 1e-8
  if case == 'rgas_tilt':
    assert chi2_pvalue(ids[0], exact_law(np.array([1, MASK, MASK]), STEPS)) < 1e-8


# ---------------------------------------------------------------------------------------------
# A tiny byte-level DiT (vocab 258 = 256 bytes + EOS + [MASK]) with random output layers.


def tiny_cfg(length=16):
  cfg = config_lib.model_config('tiny', vocab_size=258, length=length)
  cfg.update(hidden_size=32, n_blocks=1, n_heads=2, mlp_dim=64, cond_dim=16,
             compute_dtype='float32', dropout=0.0)
  return cfg


@functools.cache
def tiny_modules():
  """(DiT, Discriminator) built inside one jit each, the DiT with a random output layer."""
  cfg = tiny_cfg()

  def make(cls, seed):
    def build():
      m = cls(cfg, rngs=nnx.Rngs(seed))
      if cls is dit.DiT:
        lin = m.output_layer.linear
        lin.kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1),
                                                  lin.kernel[...].shape)
      return nnx.split(m)[1]
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))[0]
    return nnx.merge(graphdef, jax.jit(build, **FAST)())
  return make(dit.DiT, 0), make(disc_lib.Discriminator, 2)


@functools.cache
def tiny_generator(length=16, one_device=False):
  """The tiny DiT as a generator; sharded over the 8 test devices unless one_device."""
  model, disc = tiny_modules()
  return generation.load(model, tokenizer='byte', length=length, discriminator=disc,
                         jit_kwargs=FAST, devices=jax.devices()[:1] if one_device else None)


INFILL = 'ab [MASK]{3}cd'           # content: a b ' ' _ _ _ c d, then filled to the length
SUFFIX = '[MASK]{*}end'


@pytest.mark.parametrize('sampler,kw', [
    ('ancestral', {}), ('cached', {}), ('cached', {'top_p': 0.5}), ('sparse', {}),
    ('rgas', {}),                                              # the trained discriminator path
    ('rgas', {'reward': fav_reward(2.0)}),                     # a custom token reward
    ('rgas', {'reward': generation.SequenceReward(lambda x, region: jnp.sum(x == 97, -1))}),
])
def test_fixed_tokens_kept_and_only_masks_filled(sampler, kw):
  gen = tiny_generator()
  res = gen.generate(['hi', INFILL, SUFFIX, ''], length=12, nfe=4, sampler=sampler, seed=3,
                     num_samples=2, **kw)
  assert [s.prompt_index for s in res.samples] == [0, 0, 1, 1, 2, 2, 3, 3]
  for s in res.samples:
    ids = s.ids
    assert ids.shape == (12,) and np.all((ids >= 0) & (ids < 257))    # no [MASK] left
    layout = prompts_lib.layout(s.prompt, BYTE, 257).resolve(12)
    fixed = layout >= 0
    np.testing.assert_array_equal(s.fixed, fixed)
    np.testing.assert_array_equal(ids[fixed], layout[fixed])
    assert s.text == BYTE.decode(ids.tolist())
    if s.prompt_index == 0:
      assert bytes(ids[:2].tolist()) == b'hi' and fixed.sum() == 2
    if s.prompt_index == 1:
      assert bytes(ids[:3].tolist()) == b'ab ' and bytes(ids[6:8].tolist()) == b'cd'
      assert fixed.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 4
    if s.prompt_index == 2:
      assert bytes(ids[-3:].tolist()) == b'end' and fixed.sum() == 3
    if s.prompt_index == 3:
      assert not fixed.any()
  # The filled positions are drawn, not copied: the two samples of a prompt differ.
  assert any(not np.array_equal(res.samples[2 * i].ids, res.samples[2 * i + 1].ids)
             for i in range(4))


def test_tokenizer_round_trip_at_the_boundaries():
  gpt2 = tokenizers.get_tokenizer('gpt2')
  text = 'Hello<|endoftext|>world [MASK] and x[MASK]{2} y'
  lay = prompts_lib.layout(text, gpt2, 50257)
  want = gpt2.encode('Hello<|endoftext|>world [MASK] and x') + [-1, -1] + gpt2.encode(' y')
  assert lay.tokens.tolist() == want and 50256 not in want
  assert not lay.is_prefix and lay.fill_at is None
  plain = 'plain <|endoftext|> text [MASK] ok'
  assert prompts_lib.layout(plain, gpt2, 50257).tokens.tolist() == gpt2.encode(plain)
  # Placeholder rules: digits or *, not inside a word, \ escapes (the backslash is dropped).
  assert prompts_lib.parse('To be, or [MASK]{40} the question') == ['To be, or ', 40,
                                                                    ' the question']
  assert prompts_lib.parse('un[MASK]{2}able') == ['un[MASK]{2}able']
  assert prompts_lib.parse('x[MASK]{2} y') == ['x', 2, ' y']
  assert prompts_lib.parse(r'a \[MASK]{3} b \n') == [r'a [MASK]{3} b \n']
  assert prompts_lib.parse('[MASK]{x} [MASK] [MASK]{ 2}') == ['[MASK]{x} [MASK] [MASK]{ 2}']
  assert prompts_lib.parse('[MASK]{*}the end.') == [prompts_lib.FILL, 'the end.']
  lay = prompts_lib.layout('<|endoftext|>[MASK]{*}é', BYTE, 257)
  assert lay.resolve(18).tolist() == list(b'<|endoftext|>') + [-1] * 3 + list('é'.encode())
  with pytest.raises(generation.PromptError, match='more than one'):
    prompts_lib.layout('[MASK]{*} [MASK]{*}', BYTE, 257)
  with pytest.raises(generation.PromptError, match='length=3'):
    prompts_lib.layout('abcd', BYTE, 257).resolve(3)
  # The generator encodes prompts exactly so: the EOS spelling stays 13 bytes of text.
  res = tiny_generator().generate('<|endoftext|>', length=14, nfe=2)
  assert res.ids[0][:13].tolist() == list(b'<|endoftext|>')


def test_semi_autoregressive_length_and_earlier_windows():
  gen = tiny_generator()         # window 16: BOS + 14 content + EOS
  long_ = gen.generate('ab', length=40, nfe=3, stride=5, seed=4)
  s = long_.samples[0]
  assert s.ids.shape == (40,) and bytes(s.ids[:2].tolist()) == b'ab'
  windows = 1 + -(-(40 - 14) // 5)
  assert s.cost['windows'] == windows == 7 and s.cost['stride'] == 5
  assert s.cost['nfe'] == 3 and s.cost['nfe_total'] == 3 * windows
  assert s.cost['student_forwards'] == windows * 4 - s.cost['cache_hits']
  # Window 0 is the single-window output of the first 14 tokens; later windows never change
  # earlier text, so a shorter long output is a prefix of the longer one (same seed).
  first = gen.generate('ab', length=14, nfe=3, stride=5, seed=4).samples[0]
  np.testing.assert_array_equal(first.ids, s.ids[:14])
  shorter = gen.generate('ab', length=30, nfe=3, stride=5, seed=4).samples[0]
  np.testing.assert_array_equal(shorter.ids, s.ids[:30])
  # Window k starts at k·stride and fills exactly the positions after the previous window: its
  # first network call sees 5 new [MASK]s (12 in window 0 after the prompt 'ab'; 1 in the last,
  # cut at the length), conditioned on the 9 tokens before them.
  events = []
  again = gen.generate('ab', length=40, nfe=3, stride=5, seed=4, on_step=events.append)
  np.testing.assert_array_equal(again.ids[0], s.ids)       # one device, same draws
  firsts = [e for e in events if e['step'] == 0]
  assert [e['start'] for e in firsts] == [0, 5, 10, 15, 20, 25, 30]
  assert [int(np.sum(e['ids'][0] == 257)) for e in firsts] == [12, 5, 5, 5, 5, 5, 1]
  for e in firsts[1:]:
    np.testing.assert_array_equal(e['ids'][0][:9], s.ids[e['start']:e['start'] + 9])
  for e in (e for e in events if e['final']):
    np.testing.assert_array_equal(e['ids'][0], s.ids[e['start']:e['start'] + 14])
  # A suffix far beyond the first window is kept as well.
  tail = gen.generate('[MASK]{*}THE END', length=40, nfe=3, stride=5, seed=4).samples[0]
  assert bytes(tail.ids[-7:].tolist()) == b'THE END' and tail.ids.shape == (40,)


def test_long_prompts_continue_and_inputs_that_do_nothing_or_run_away_are_refused():
  """What users did: a prompt longer than the window without a length, [MASK]{0}, a template
  with nothing to fill, [MASK]{100000}; bytes and undecodable text as prompts."""
  gen = tiny_generator(one_device=True)      # window 16: 14 content positions
  prompt = '0123456789abcdefghij'            # 20 tokens, longer than a window
  with pytest.raises(generation.PromptError, match=r'window of 14 .*--length .*above 20'):
    gen.generate(prompt, nfe=2)              # would print the prompt back, having paid for it
  events, windows_done = [], []
  res = gen.generate(prompt, length=30, nfe=3, stride=5, seed=1, on_step=events.append,
                     on_window=lambda k, n, t: windows_done.append((k, n)))
  s = res.samples[0]
  assert bytes(s.ids[:20].tolist()) == prompt.encode() and s.ids.shape == (30,)
  assert not np.any(s.ids == gen.mask_id)
  # Windows [0, 14) and [5, 19) hold only the prompt: skipped (no network call, no cost); the
  # first one run starts at 10 and sees the 4 positions after the prompt masked.
  firsts = [e for e in events if e['step'] == 0]
  assert [e['start'] for e in firsts] == [10, 15, 20]
  assert [int(np.sum(e['ids'][0] == gen.mask_id)) for e in firsts] == [4, 5, 1]
  assert s.cost['windows'] == 3 and s.cost['nfe_total'] == 9
  assert windows_done == [(3, 5), (4, 5), (5, 5)]
  with pytest.raises(generation.PromptError, match=r'\[MASK\]\{0\}, which fills nothing'):
    gen.generate('to be [MASK]{0} or not', nfe=2)
  with pytest.raises(generation.PromptError, match='nothing to generate'):
    gen.generate('abc', length=3, nfe=2)
  with pytest.raises(generation.GenerationError, match=r'max_length=4096 .*--max_length=100000'):
    gen.generate('[MASK]{100000}', nfe=2)    # refused before any work
  assert gen.generate('[MASK]{12}', nfe=1, max_length=12).ids[0].shape == (12,)
  with pytest.raises(generation.GenerationError, match='max_length=11'):
    gen.generate('[MASK]{12}', nfe=1, max_length=11)
  with pytest.raises(generation.PromptError, match='prompts is bytes'):
    gen.generate(b'ROMEO:', nfe=2)
  with pytest.raises(generation.PromptError, match='prompt 1 is bytes'):
    gen.generate(['a', b'ROMEO:'], nfe=2)
  with pytest.raises(generation.PromptError, match='prompt 0 is not valid text: character 2'):
    gen.generate(b'ab\xffcd'.decode('utf-8', 'surrogateescape'), nfe=2)


def test_one_resolver_names_every_model_source(tmp_path):
  """'demo', the asset directory (with or without '/') and the file are one model, for the
  API, generation, configs and the loader alike."""
  from didi_jax.checkpoint import loader
  file = config_lib.SHIPPED_MODELS['demo']
  asset_dir = os.path.dirname(file)
  for name in ('demo', asset_dir, asset_dir + '/', file):
    assert loader.resolve(name) == file
  assert loader.resolve('hf:org/name') == 'hf:org/name'
  ids = np.arange(2 * 16, dtype=np.int32).reshape(2, 16) % 256
  sigma = np.zeros((2,), np.float32)
  want = np.asarray(didi_jax.load_denoiser(file)(ids, sigma))
  assert np.abs(want).max() > 1
  for name in ('demo', asset_dir + '/'):
    np.testing.assert_array_equal(np.asarray(didi_jax.load_denoiser(name)(ids, sigma)), want)
  assert generation.load('demo').source == file
  cfg = config_lib.base_config()
  cfg.teacher.checkpoint = 'demo'
  config_lib.validate(cfg)                       # accepted where a path is
  cfg.teacher.checkpoint = str(tmp_path / 'nope')
  with pytest.raises(errors.ConfigError, match="'demo'"):
    config_lib.validate(cfg)
  with pytest.raises(errors.CheckpointError, match=r"does not exist: name a model as 'demo'"):
    didi_jax.load_denoiser(str(tmp_path / 'nope'))


def test_custom_reward_steers_and_zero_reward_is_plain_sampling():
  gen = fake_generator()
  prompt, n = [np.array([-1, -1, -1])], 1000
  common = dict(nfe=4, seed=2, num_samples=n, batch_size=n)

  def freq(**kw):
    ids = np.stack(gen.generate(prompt, **common, **kw).ids)
    return np.mean(ids == FAV), ids
  f_plain, plain = freq(sampler='cached')
  sd = np.sqrt(f_plain * (1 - f_plain) / (n * L)) * 2
  for kw in (dict(), dict(rgas={'rerank_ratio': 1.0})):      # tilt + re-rank; re-rank only
    f_up, _ = freq(sampler='rgas', reward=fav_reward(1.0), **kw)
    f_down, _ = freq(sampler='rgas', reward=fav_reward(-1.0), **kw)
    assert f_up - f_plain > 6 * sd and f_plain - f_down > 6 * sd, (kw, f_down, f_plain, f_up)
  # A per-sequence reward in plain Python (host callback) re-ranks the same way.
  seq = generation.SequenceReward(lambda ids, region: (ids == FAV).sum(-1), host=True)
  f_seq, _ = freq(sampler='rgas', reward=seq)
  assert f_seq - f_plain > 6 * sd
  # Zero reward (a plain callable), one candidate: the tilt is exactly zero and the draws are
  # plain sampling's, draw for draw.
  _, ids = freq(sampler='rgas', reward=lambda q, sigma: 0.0 * q[..., 0],
                rgas={'num_candidates': 1})
  np.testing.assert_array_equal(ids, plain)


def test_word_reward_counts_words():
  seqs = rewards.word_sequences(BYTE, ['love', 'king'])
  assert seqs == [tuple(b'love'), tuple(b'Love'), tuple(b'king'), tuple(b'King')]
  ids = jnp.asarray([list(b'my love, my King; love')], jnp.int32)
  counts = np.asarray(rewards.ngram_counts(ids, seqs))
  assert counts.sum() == 3 and counts[0, 3] == 1 and counts[0, 12] == 1 and counts[0, 18] == 1
  soft = np.asarray(rewards.ngram_scores(jax.nn.one_hot(ids, 258), seqs))
  np.testing.assert_array_equal(soft, counts)
  # On the generator: steering toward lower-case letters raises their share, away lowers it.
  gen = tiny_generator(one_device=True)
  share = {}
  letters = [chr(c) for c in range(ord('a'), ord('z') + 1)]
  before = gen.compilations
  for w in (-4.0, 0.0, 4.0):
    res = gen.generate([''], length=14, nfe=3, seed=5, num_samples=32, sampler='rgas',
                       reward=rewards.words(BYTE, letters, w), rgas={'rerank_ratio': 1.0})
    share[w] = np.mean((np.stack(res.ids) >= 97) & (np.stack(res.ids) <= 122))
  assert share[-4.0] < share[0.0] - 0.03 and share[4.0] > share[0.0] + 0.03, share
  assert gen.compilations == before + 1            # the weight is an argument of one program


def test_compiled_once_per_bucket_and_deterministic():
  model, _ = tiny_modules()
  gen = generation.load(model, tokenizer='byte', length=128, jit_kwargs=FAST)
  assert core.default_buckets(128) == (64, 128)
  first = gen.generate(['a', 'abcdef'], length=20, nfe=2, seed=7)
  assert gen.compilations == 1 and first.compilations == 1
  gen.generate(['abc', 'x[MASK]{4}yz', 'a much longer prompt'], length=50, nfe=2, seed=7)
  gen.generate('[MASK]{*}q', length=9, nfe=2, seed=7)
  assert gen.compilations == 1                     # other prompt lengths: the same program
  gen.generate('abc', length=100, nfe=2, seed=7)   # the 128 bucket
  assert gen.compilations == 2
  assert all(p._cache_size() == 1 for p in gen.programs.values())   # pylint: disable=protected-access
  again = gen.generate(['a', 'abcdef'], length=20, nfe=2, seed=7)
  assert gen.compilations == 2 and again.compilations == 0
  for a, b in zip(first.samples, again.samples):
    np.testing.assert_array_equal(a.ids, b.ids)
  other = gen.generate(['a', 'abcdef'], length=20, nfe=2, seed=8)
  assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(first.samples, other.samples))
  # A row's draw depends on its own row only: adding prompts after it changes nothing; nor does
  # the number of devices the batch is sharded over (8 here, 1 below).
  alone = gen.generate(['a'], length=20, nfe=2, seed=7)
  np.testing.assert_array_equal(alone.ids[0], first.ids[0])
  assert len(jax.devices()) == 8 and first.settings['batch_size'] == 8
  one = generation.load(model, tokenizer='byte', length=128, jit_kwargs=FAST,
                        devices=jax.devices()[:1])
  single = one.generate(['a', 'abcdef'], length=20, nfe=2, seed=7)
  assert single.settings['batch_size'] == 2
  for a, b in zip(first.samples, single.samples):
    np.testing.assert_array_equal(a.ids, b.ids)


def test_api_entry_points_and_errors(tmp_path):
  assert didi_jax.generate is generation.generate
  with pytest.raises(generation.GenerationError, match='sampler'):
    didi_jax.generate(tiny_generator(), 'a', sampler='magic')
  with pytest.raises(generation.GenerationError, match='nfe'):
    didi_jax.generate(tiny_generator(), 'a', nfe=0)
  with pytest.raises(errors.UserError, match='does not exist'):
    didi_jax.generate(str(tmp_path / 'nope'), 'a')
  with pytest.raises(generation.GenerationError, match="sampler='rgas'"):
    didi_jax.generate(tiny_generator(), 'a', reward=fav_reward(1.0))
  with pytest.raises(generation.PromptError, match='length=4'):
    didi_jax.generate(tiny_generator(), 'abcdef', length=4)
  no_disc = generation.load(tiny_modules()[0], tokenizer='byte', jit_kwargs=FAST)
  with pytest.raises(generation.GenerationError, match='discriminator'):
    no_disc.generate('a', sampler='rgas', nfe=2)


def test_loads_official_layouts_with_the_same_draws(tmp_path):
  """A Lightning teacher .ckpt and the HF DiDi layout (student EMA + discriminator), written by
  the project's exporter, load through the one loader and draw exactly what the module draws."""
  from didi_jax.checkpoint import exporter
  model, disc = tiny_modules()
  cfg = tiny_cfg(length=32)
  ckpt = exporter.export_teacher_ckpt(str(tmp_path / 'teacher.ckpt'), model, model_cfg=cfg)
  hf_dir = exporter.export_hf_didi(str(tmp_path / 'didi'), student_ema=model, discriminator=disc,
                                   model_cfg=cfg)
  one = dict(jit_kwargs=FAST, devices=jax.devices()[:1])
  ref = generation.load(model, tokenizer='byte', length=1024, **one)
  run = dict(length=20, nfe=3, seed=1)
  gen = generation.load(ckpt, **one)               # sizes, window and tokenizer inferred
  assert gen.tokenizer.name == 'byte' and gen.window == 1024 and gen.network == 'auto'
  np.testing.assert_array_equal(gen.generate('ab', **run).ids[0],
                                ref.generate('ab', **run).ids[0])
  didi = generation.load(hf_dir, **one)            # RGAS with the checkpoint's discriminator
  res = didi.generate('ab', sampler='rgas', **run)
  assert bytes(res.ids[0][:2].tolist()) == b'ab'
  assert res.cost['disc_forwards'] == 1 + 4 * 2 and res.cost['disc_backwards'] == 1
  assert res.cost['network_evaluations'] == res.cost['student_forwards'] + 9


# ---------------------------------------------------------------------------------------------
# Command line.


def smoke_checkpoint(tmp_path) -> str:
  """A random tiny byte-level DiT saved through the project's exporter (our flat format)."""
  from didi_jax.checkpoint import exporter
  model, _ = tiny_modules()
  cfg = tiny_cfg(length=32)
  return exporter.save_ours(str(tmp_path / 'tiny.safetensors'), {'teacher': model}, cfg)


def run_cli(capsys, *argv):
  rc = cli.main(list(argv))
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_cli_smoke_checkpoint(tmp_path, capsys, monkeypatch):
  # The command line as is, with XLA's fast compile for these tiny programs.
  monkeypatch.setattr(core, 'load', functools.partial(core.load, jit_kwargs=FAST))
  ckpt = smoke_checkpoint(tmp_path)
  out_file = tmp_path / 'out' / 'samples.jsonl'
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('First\n\n[MASK]{*}fin.\n', encoding='utf-8')
  rc, out, err = run_cli(capsys, f'--checkpoint={ckpt}', f'--prompts_file={prompts_file}',
                         '--length=20', '--nfe=3', '--num_samples=2', '--seed=1',
                         f'--out={out_file}')
  assert rc == 0, err
  recs = [json.loads(line) for line in out_file.read_text(encoding='utf-8').splitlines()]
  assert [(r['prompt'], r['sample']) for r in recs] == [('First', 0), ('First', 1),
                                                        ('[MASK]{*}fin.', 0),
                                                        ('[MASK]{*}fin.', 1)]
  for r in recs:
    assert r['text'] == BYTE.decode(r['ids']) and len(r['ids']) == 20
    assert (r['nfe'], r['sampler'], r['seed']) == (3, 'cached', 1)
    assert r['cost']['windows'] == 1 and r['cost']['network_evaluations'] >= 1
    assert r['text'] in out
  assert recs[0]['text'].startswith('First') and recs[2]['text'].endswith('fin.')
  assert 'wrote' in err
  # RGAS from the command line: a word list (away from 'e'), and a classifier checkpoint with
  # --show-steps (the first sample as it is unmasked).
  from didi_jax.checkpoint import exporter
  clf = exporter.export_discriminator_safetensors(str(tmp_path / 'clf.safetensors'),
                                                  tiny_modules()[1], model_cfg=tiny_cfg(32))
  rc, out, err = run_cli(capsys, f'--checkpoint={ckpt}', '--prompt=ab', '--length=10',
                         '--nfe=2', '--sampler=rgas', f'--out={out_file}', '--reward_words=e',
                         '--reward_weight=-2')
  assert rc == 0, err
  rec = json.loads(out_file.read_text(encoding='utf-8'))
  assert rec['text'].startswith('ab') and rec['sampler'] == 'rgas'
  assert rec['cost']['reward_evaluations'] == 1 + 4 * 1      # K_tilt soft + M candidates
  assert rec['cost']['network_evaluations'] == rec['cost']['student_forwards']
  rc, out, err = run_cli(capsys, f'--checkpoint={ckpt}', '--prompt=ab', '--length=8', '--nfe=2',
                         '--sampler=rgas', f'--classifier={clf}', '--show-steps',
                         f'--out={out_file}')
  assert rc == 0, err
  rec = json.loads(out_file.read_text(encoding='utf-8'))
  assert rec['cost']['disc_forwards'] == 1 + 4 * 1
  assert out.startswith('[window 0 step   0,    6 masked] ab______\n')
  assert 'final,    0 masked] ' + cli._printable(rec['text']) + '\n' in out  # pylint: disable=protected-access
  assert out.endswith('\n' + rec['text'] + '\n')


@pytest.mark.parametrize('argv,fragment', [
    (['--checkpoint=/no/such/run', '--prompt=x'], 'does not exist'),
    (['--checkpoint=demo', '--sampler=magic'], 'is not known'),
    (['--checkpoint=demo', '--nfe=0'], '--nfe=0 must be >= 1'),
    (['--checkpoint=demo', '--nfe=two'], 'invalid int value'),
    (['--checkpoint=demo', '--prompt=a longer prompt', '--length=4'], 'length=4'),
    (['--prompt=x'], 'required: --checkpoint'),
    (['--checkpoint=demo', '--prompt=' + 'x' * 300], 'pass --length (length=) above 300'),
    (['--checkpoint=demo', '--prompt=[MASK]{100000}'], 'pass --max_length=100000'),
    (['--checkpoint=demo', '--prompt=to be [MASK]{0} or'], '[MASK]{0}, which fills nothing'),
    (['--checkpoint=demo', '--prompt=ab\udcffcd'], '--prompt number 1 is not UTF-8 text'),
    (['--checkpoint=demo', '--sampler=rgas', '--prompt=a', '--length=8'], 'no discriminator'),
])
def test_cli_bad_input_is_one_line(capsys, argv, fragment):
  try:
    rc = cli.main(argv)
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 2 and len(lines) == 1 and fragment in lines[0], err
  assert 'Traceback' not in err
  assert lines[0].count('teacher.safetensors') <= 1          # a path is named once


def test_cli_prompts_file_not_utf8_and_long_output_progress(tmp_path, capsys, monkeypatch):
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('Roméo\n'.encode('latin-1'))
  rc, _, err = run_cli(capsys, '--checkpoint=demo', f'--prompts_file={bad}')
  assert rc == 2 and err.count('\n') == 1
  assert f'--prompts_file={bad} is not UTF-8 text (byte 0xe9 at offset 3)' in err
  assert 'iconv' in err
  # A long output says on stderr how far it is; the cost line says why 4 NFE cost 5 calls.
  monkeypatch.setattr(core, 'load', functools.partial(core.load, jit_kwargs=FAST))
  monkeypatch.setattr(cli, 'WINDOW_PROGRESS_EVERY_S', 0.0)
  rc, out, err = run_cli(capsys, f'--checkpoint={smoke_checkpoint(tmp_path)}', '--prompt=ab',
                         '--length=60', '--stride=15', '--nfe=4', '--sampler=ancestral')
  assert rc == 0, err
  windows = 1 + -(-(60 - 30) // 15)                        # window 32: 30 content positions
  assert [ln.split(' done')[0] for ln in err.splitlines() if ln.startswith('window ')] == [
      f'window {k}/{windows}' for k in range(1, windows)]
  assert (f'{windows} window(s) x 4 NFE, {windows * 5} network evaluations per sample (per '
          'window 4 steps + 1 final noise-removal call') in err


def test_cli_help_and_demo_teacher(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['--help'])
  out = capsys.readouterr().out
  assert e.value.code == 0
  for word in ('--checkpoint', '--prompt', '--prompts_file', '--out', '--show-steps',
               '[MASK]{n}', '[MASK]{*}', '--stride', '--sampler', 'Exit status 2',
               '--max_length'):
    assert word in out, word
  no_help = [a.option_strings for a in cli.parser()._actions if not a.help]  # pylint: disable=protected-access
  assert not no_help, no_help
  # `python -m didi_jax.generate` on the shipped teacher (directory form), in a fresh process.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=1 '
                       '--xla_backend_optimization_level=0')
  out = subprocess.run([sys.executable, '-m', 'didi_jax.generate',
                        '--checkpoint=didi_jax/assets/demo_teacher/', '--prompt=ROMEO:',
                        '--length=24', '--nfe=2', '--seed=0'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  text = out.stdout.rstrip('\n')
  assert text.startswith('ROMEO:') and len(text.encode()) >= 20
  assert '1 window(s) x 2 NFE' in out.stderr
