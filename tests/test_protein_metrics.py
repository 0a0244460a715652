"""Protein metrics against hand-computed closed forms, the structure hook, and the MC NELBO."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didi_jax import diffusion
from didi_jax.data import protein as P
from didi_jax.evaluation import protein as M
from didi_jax.models import esm as esm_lib

UNIFORM = M.AMINO_ACIDS                              # every standard residue once


def test_composition_closed_forms():
  # generated uniform; reference: every residue once plus 20 extra A -> q_A = 21/40, others 1/40
  ref = [UNIFORM, 'A' * 20]
  d = M.composition_divergence([UNIFORM], ref)
  kl = (1 / 20) * math.log((1 / 20) / (21 / 40)) + 19 * (1 / 20) * math.log((1 / 20) / (1 / 40))
  kl_rev = ((21 / 40) * math.log((21 / 40) / (1 / 20))
            + 19 * (1 / 40) * math.log((1 / 40) / (1 / 20)))
  m_a, m_o = 0.5 * (1 / 20 + 21 / 40), 0.5 * (1 / 20 + 1 / 40)
  js = 0.5 * ((1 / 20) * math.log((1 / 20) / m_a) + 19 * (1 / 20) * math.log((1 / 20) / m_o)) + \
      0.5 * ((21 / 40) * math.log((21 / 40) / m_a) + 19 * (1 / 40) * math.log((1 / 40) / m_o))
  assert d['kl'] == pytest.approx(kl, abs=1e-12)
  assert d['kl_reverse'] == pytest.approx(kl_rev, abs=1e-12)
  assert d['js'] == pytest.approx(js, abs=1e-12) and 0 < d['js'] < math.log(2)
  assert d['per_residue']['A'] == pytest.approx(
      {'generated': 1 / 20, 'reference': 21 / 40, 'log_ratio': math.log(2 / 21)})
  # identical compositions: 0; lower case and rare letters: counted apart
  same = M.composition_divergence([UNIFORM.lower() + 'XXU'], [UNIFORM * 3])
  assert same['kl'] == 0.0 and same['js'] == 0.0
  assert same['other_fraction_generated'] == pytest.approx(3 / 23)
  # a residue missing from the reference: KL(gen‖ref) = inf, never clipped; JS stays finite
  d = M.composition_divergence([UNIFORM], ['A' * 10])
  assert d['kl'] == math.inf and d['kl_reverse'] == pytest.approx(math.log(20))
  assert d['js'] < math.log(2)
  # pseudocount 1: reference counts 11 for A, 1 for the rest
  d = M.composition_divergence([UNIFORM], ['A' * 10], pseudocount=1.0)
  q = np.array([11] + [1] * 19) / 30
  p = np.full(20, 2 / 40)
  assert d['kl'] == pytest.approx(float(np.sum(p * np.log(p / q))), abs=1e-12)


def test_length_distances_closed_forms_and_scipy():
  assert M.ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
  assert M.ks_statistic([1, 2], [3, 4]) == 1.0
  assert M.ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
  assert M.wasserstein_1d([0, 0], [1, 1]) == pytest.approx(1.0)
  assert M.wasserstein_1d([1, 2, 3], [2, 3, 4]) == pytest.approx(1.0)
  assert M.wasserstein_1d([100], [160, 140]) == pytest.approx(50.0)
  stats = pytest.importorskip('scipy.stats')
  rng = np.random.default_rng(0)
  a, b = rng.integers(50, 300, 97), rng.integers(80, 400, 61)
  assert M.ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
  assert M.wasserstein_1d(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)
  c = M.length_comparison([10, 20, 30], [10, 20, 30, 40])
  assert c['generated']['mean'] == 20.0 and c['reference']['max'] == 40.0
  assert c['ks'] == 0.25 and c['wasserstein'] == pytest.approx(5.0)


def test_identity_and_diversity_closed_forms():
  assert M.position_identity('AAAA', 'AABB') == 0.5
  assert M.position_identity('ACDE', 'ACD') == 1.0          # over the shorter length
  assert M.position_identity('ACDEF', 'CDEFA') == 0.0
  assert M.lcs_identity('ACDEF', 'CDEFA') == pytest.approx(4 / 5)   # shift-aware
  assert M.lcs_length('AGGTAB', 'GXTXAYB') == 4                      # the textbook example
  rng = np.random.default_rng(1)
  for _ in range(20):                                                # against a plain DP
    a = ''.join(rng.choice(list('ACDG'), rng.integers(0, 12)))
    b = ''.join(rng.choice(list('ACDG'), rng.integers(0, 12)))
    C = np.zeros((len(a) + 1, len(b) + 1), int)
    for i in range(1, len(a) + 1):
      for j in range(1, len(b) + 1):
        C[i, j] = C[i - 1, j - 1] + 1 if a[i - 1] == b[j - 1] else max(C[i - 1, j], C[i, j - 1])
    assert M.lcs_length(a, b) == C[-1, -1]
  d = M.diversity(['AAAA', 'AABB', 'AAAA'])
  assert d['unique_fraction'] == pytest.approx(2 / 3)
  assert d['mean_identity'] == pytest.approx((0.5 + 1.0 + 0.5) / 3) and d['pairs'] == 3
  # seeded subsample: reproducible, max_sequences=3 of 10 -> 3 pairs
  seqs = [''.join(rng.choice(list(UNIFORM), 30)) for _ in range(10)]
  a = M.diversity(seqs, max_sequences=3, seed=5)
  assert a == M.diversity(seqs, max_sequences=3, seed=5) and a['pairs'] == 3
  with pytest.raises(ValueError, match='identity'):
    M.diversity(seqs, identity='blast')


def test_repetition_closed_forms():
  assert M.longest_homopolymer('ACCCCDDA') == 4
  assert M.longest_homopolymer('A') == 1 and M.longest_homopolymer('') == 0
  assert M.longest_homopolymer('ACDE') == 1 and M.longest_homopolymer('ADDDDD') == 5
  assert M.kmer_repeat_fraction('AAAAA', 3) == pytest.approx(2 / 3)
  assert M.kmer_repeat_fraction('ACDEFG', 3) == 0.0
  assert math.isnan(M.kmer_repeat_fraction('AC', 3))
  r = M.repetition(['AAAAA', 'ACDEFG', 'AC'], k=3)
  assert r['kmer_repeat'] == pytest.approx(1 / 3)        # mean of 2/3 and 0 (AC is too short)
  assert r['homopolymer_mean'] == pytest.approx((5 + 1 + 1) / 3) and r['homopolymer_max'] == 5


def test_structure_hook_present_only_with_a_scorer():
  gen, ref = ['MKTAYIAK', 'GGGGGGGG'], [UNIFORM]
  out = M.protein_metrics(gen, ref)
  assert 'structure' not in out and not any('plddt' in k for k in out)
  assert out['num_generated'] == 2 and out['repetition']['homopolymer_max'] == 8
  out = M.protein_metrics(gen, ref, structure_scorer=lambda s: [90.0 if 'K' in x else 40.0
                                                                for x in s])
  assert out['structure']['plddt'] == [90.0, 40.0]
  assert out['structure']['plddt_mean'] == 65.0 and out['structure']['plddt_over_70'] == 0.5
  with pytest.raises(ValueError, match='one finite pLDDT per sequence'):
    M.protein_metrics(gen, ref, structure_scorer=lambda s: [50.0])
  with pytest.raises(ValueError, match='0-100'):
    M.protein_metrics(gen, ref, structure_scorer=lambda s: [0.9, 0.8])  # a 0-1 scale
  with pytest.raises(ValueError, match='0-100'):
    M.protein_metrics(gen, ref, structure_scorer=lambda s: [90.0, 101.0])


def test_nelbo_closed_forms_and_seed():
  V = 21                                 # 20 ids + [MASK] = 20
  mask_id = V - 1
  rng = np.random.default_rng(0)
  rows = rng.integers(0, V - 1, (64, 16))
  uniform = lambda z, s: jnp.zeros(z.shape + (V,))             # noqa: E731
  out = M.denoiser_nelbo(uniform, rows, mask_id, num_t=8, seed=0, batch_size=64)
  # E[(1/t) 1{masked}] = 1 − ε per position; SUBS gives log(V − 1) per masked position.
  want = (1 - diffusion.EPS) * math.log(V - 1)
  assert abs(out['per_token'] - want) < 4 * out['stderr_per_token'] + 1e-9
  assert out['stderr_per_token'] < 0.1 * want and out['positions'] == 64 * 16
  assert M.denoiser_nelbo(uniform, rows, mask_id, num_t=8, seed=0, batch_size=64) == out
  assert M.denoiser_nelbo(uniform, rows, mask_id, num_t=8, seed=1, batch_size=64) != out
  # a perfect denoiser (+100 on the true token) has bound ~0
  perfect = lambda z, s: 100.0 * jax.nn.one_hot(jnp.asarray(rows), V)  # noqa: E731
  assert M.denoiser_nelbo(perfect, rows, mask_id, num_t=2, batch_size=64)['per_token'] < 1e-6
  # only maskable positions count: the first 4 of each row
  maskable = np.zeros_like(rows, bool)
  maskable[:, :4] = True
  part = M.denoiser_nelbo(uniform, rows, mask_id, num_t=8, batch_size=64, maskable_NxL=maskable)
  assert part['positions'] == 64 * 4
  assert abs(part['per_token'] - want) < 4 * part['stderr_per_token'] + 1e-9
  with pytest.raises(ValueError, match='at least one'):
    M.denoiser_nelbo(uniform, rows, mask_id, maskable_NxL=np.zeros_like(rows, bool))


def test_nelbo_of_an_esm_denoiser_on_protein_rows():
  tok = P.EsmTokenizer()
  rows = P.encode_rows(['MKTAYIAKQR', 'GGSG', 'ACDEFGHIKL'], 14, tok, layout='pad')
  cfg = esm_lib.EsmConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
  model = esm_lib.init_model(cfg, seed=0)
  maskable = P.maskable_positions(rows, tok)
  a = M.denoiser_nelbo(model, rows, tok.mask_id, num_t=2, batch_size=2, maskable_NxL=maskable)
  b = M.denoiser_nelbo(model, rows, tok.mask_id, num_t=2, batch_size=2, maskable_NxL=maskable)
  assert a == b and a['positions'] == 24 and len(a['per_sequence']) == 3
  # a random-init head is near uniform over the 32 non-mask ids: bound near (1−ε) log 32
  assert 0.5 * math.log(32) < a['per_token'] < 2.0 * math.log(32)
