"""The teacher's entropy frontier and MAUVE (docs/method.md §12.1, §12.2): values, not shapes.

* interpolation: log Gen PPL linear in entropy between the bracketing points, hand-computed;
  outside the points' range the end segment is extended and flagged;
* the gap's sign (below the frontier: negative), its bootstrap interval (exact when every sample
  is alike; the frontier points' samples are resampled too), the verdicts;
* MAUVE on a tiny judge's features: two draws of one text distribution score about 1, a very
  different set scores low; a missing mauve-text package is one line naming the pip command.
"""
import math
import sys

import numpy as np
import pytest
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import errors, jobs, models
from didi_jax.data.tokenizers import get_tokenizer
from didi_jax.evaluation import frontier, judges, metrics

H = [3.0, 2.0, 4.0]            # frontier entropies (unsorted on purpose) and Gen PPLs
G = [20.0, 10.0, 80.0]


@pytest.mark.parametrize('h,want,extrap', [
    (2.5, math.sqrt(10 * 20), False),     # halfway in log space between 10 and 20
    (3.5, math.sqrt(20 * 80), False),
    (3.0, 20.0, False), (2.0, 10.0, False), (4.0, 80.0, False),
    (3.25, math.exp(math.log(20) + 0.25 * math.log(4)), False),
    (1.5, 10 / math.sqrt(2), True),       # below: the first segment extended
    (5.0, 320.0, True),                   # above: the last segment extended
])
def test_interpolation_hand_computed(h, want, extrap):
  got, flagged = frontier.interpolate(h, H, G)
  assert got == pytest.approx(want, rel=1e-12) and flagged is extrap


def test_interpolation_needs_two_entropies():
  with pytest.raises(ValueError, match='two or more points'):
    frontier.interpolate(1.0, [2.0, 2.0], [10.0, 20.0])


def alike(n: int, entropy: float, gen_ppl: float, count: int = 10) -> frontier.Samples:
  """n samples with the same entropy and per-sample perplexity: Gen PPL exactly gen_ppl."""
  return frontier.Samples(np.full(n, count * math.log(gen_ppl)), np.full(n, count),
                          np.full(n, entropy))


def mixed(entropy: float, ppls, count: int = 10) -> frontier.Samples:
  """One sample per perplexity in `ppls` (equal counts): Gen PPL = their geometric mean."""
  ppls = np.asarray(ppls, np.float64)
  return frontier.Samples(count * np.log(ppls), np.full(ppls.shape, count),
                          np.full(ppls.shape, entropy))


FRONTIER = [alike(16, 2.0, 10.0), alike(16, 4.0, 40.0)]     # F(3) = sqrt(10 · 40) = 20


@pytest.mark.parametrize('row_ppl,gap,verdict', [(15.0, -5.0, 'below'), (25.0, 5.0, 'above')])
def test_gap_sign_and_exact_interval(row_ppl, gap, verdict):
  rec = frontier.gap(alike(16, 3.0, row_ppl), FRONTIER, n_bootstrap=200, seed=1)
  assert rec['teacher_gen_ppl'] == pytest.approx(20.0, rel=1e-12)
  assert rec['gap'] == pytest.approx(gap, rel=1e-12) and rec['entropy'] == 3.0
  # Every resample of identical samples gives the same sets: the interval is the point.
  assert rec['gap_ci'] == pytest.approx([gap, gap], rel=1e-12)
  assert rec['verdict'] == verdict and not rec['extrapolated']


def test_interval_resamples_row_and_frontier_points():
  # A heterogeneous row on the frontier (Gen PPL sqrt(5 · 80) = 20): gap 0, a tie.
  rec = frontier.gap(mixed(3.0, [5.0, 80.0] * 8), FRONTIER, n_bootstrap=400, seed=2)
  assert rec['gap'] == pytest.approx(0.0, abs=1e-9)
  lo, hi = rec['gap_ci']
  assert lo < -1.0 and hi > 1.0 and rec['verdict'] == 'tie'
  # An alike row against heterogeneous frontier points: the spread comes from the points alone.
  points = [mixed(2.0, [5.0, 20.0] * 8), mixed(4.0, [20.0, 80.0] * 8)]
  rec = frontier.gap(alike(16, 3.0, 15.0), points, n_bootstrap=400, seed=3)
  assert rec['teacher_gen_ppl'] == pytest.approx(20.0, rel=1e-12)
  lo, hi = rec['gap_ci']
  assert lo < -5.0 - 1.0 and hi > -5.0 + 1.0
  # No resamples: no interval, the sign decides.
  rec = frontier.gap(alike(16, 3.0, 15.0), FRONTIER)
  assert rec['gap_ci'] is None and rec['verdict'] == 'below'


def test_extrapolation_is_flagged_never_a_verdict():
  # RGAS-like: far lower entropy than any temperature reached; F extends the first segment.
  rec = frontier.gap(alike(16, 1.0, 4.0), FRONTIER, n_bootstrap=50)
  assert rec['extrapolated'] and rec['verdict'] == 'extrapolated'
  assert rec['teacher_gen_ppl'] == pytest.approx(10.0 / 2.0, rel=1e-12)    # 10 · (10/40)^(1/2)
  assert rec['gap'] == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize('h,ppl,verdict,end_ppl', [
    (4.5, 30.0, 'dominates', 40.0),       # hotter than every point and below the hottest (40)
    (4.5, 50.0, 'extrapolated', 40.0),    # hotter and above: the frontier may rise that far
    (1.5, 12.0, 'dominated', 10.0),       # colder than every point and above the coldest (10)
    (1.5, 8.0, 'extrapolated', 10.0),     # colder and below: a colder teacher may do as well
])
def test_outside_the_range_dominance_decides_against_the_end_point(h, ppl, verdict, end_ppl):
  """The frontier rises with entropy, so beyond its range only dominance gives a verdict: the
  row's Gen PPL against the nearest END point's (not the extended segment), with its interval."""
  rec = frontier.gap(alike(16, h, ppl), FRONTIER, n_bootstrap=100, seed=4)
  assert rec['extrapolated'] and rec['verdict'] == verdict
  assert rec['end_gen_ppl'] == pytest.approx(end_ppl, rel=1e-12)
  assert rec['end_gap'] == pytest.approx(ppl - end_ppl, rel=1e-12)
  assert rec['end_gap_ci'] == pytest.approx([ppl - end_ppl] * 2, rel=1e-12)
  # Without resamples the sign decides; inside the range there is no end point.
  assert frontier.gap(alike(16, h, ppl), FRONTIER)['verdict'] == verdict
  assert 'end_gap' not in frontier.gap(alike(16, 3.0, 15.0), FRONTIER)
  # An interval that straddles the end point's Gen PPL gives no verdict.
  spread = frontier.gap(mixed(4.5, [20.0, 80.0] * 8), FRONTIER, n_bootstrap=400, seed=5)
  assert spread['end_gap'] == pytest.approx(0.0, abs=1e-9)
  assert spread['end_gap_ci'][0] < 0 < spread['end_gap_ci'][1]
  assert spread['verdict'] == 'extrapolated'
  # The extended segment would call the hotter row 'below' by far more (F(4.5) = 80): dominance
  # reads the end point only.
  assert rec['teacher_gen_ppl'] != pytest.approx(rec['end_gen_ppl'])


def test_row_records_from_sweep_rows():
  """frontier_points picks the teacher's plain rows per temperature; a row at an NFE without a
  frontier gets a note, not a number."""
  store = {'t08': alike(8, 2.0, 10.0), 't10': alike(8, 4.0, 40.0), 's': alike(8, 3.0, 15.0)}

  def read(row, judge):
    assert judge == 'j'
    return store.get(row.get('per_sample'))
  rows = [{'model': 'teacher', 'sampler': 'ancestral', 'nfe': 8, 'temperature': 1.0,
           'per_sample': 't10'},
          {'model': 'teacher', 'sampler': 'ancestral', 'nfe': 8, 'per_sample': 't08',
           'settings': {'sampler': {'temperature': 0.8}}},            # an older row's field
          {'model': 'teacher', 'sampler': 'cached', 'nfe': 8, 'temperature': 1.0,
           'per_sample': 's'},                                        # a repeat of T = 1: unused
          {'model': 'student', 'sampler': 'rgas', 'nfe': 8, 'temperature': 1.0, 'per_sample': 's'}]
  points = frontier.frontier_points(rows, read, 'j')
  assert list(points) == [(8, 'float32')]
  assert [(t, p.point()) for t, p in points[(8, 'float32')]] == [
      (0.8, (2.0, pytest.approx(10.0))), (1.0, (4.0, pytest.approx(40.0)))]
  rec = frontier.row_record(rows[3], points[(8, 'float32')], read, 'j', n_bootstrap=0, seed=0)
  assert rec['gap'] == pytest.approx(-5.0) and rec['temperatures'] == [0.8, 1.0]
  other = dict(rows[3], nfe=16)
  assert 'teacher_nfes' in frontier.row_record(other, points.get((16, 'float32')), read, 'j',
                                               n_bootstrap=0, seed=0)['note']
  assert 'per-sample' in frontier.row_record(dict(rows[3], per_sample=None),
                                             points[(8, 'float32')], read, 'j', n_bootstrap=0,
                                             seed=0)['note']


def test_frontier_temperatures_are_validated():
  assert config_lib.parse_temperatures('0.8, 0.9,1', 'k') == [0.8, 0.9, 1.0]
  assert config_lib.parse_temperatures('', 'k') == []
  for bad in ('0.8,x', '0,1', '-1,1', '0.9', 'inf,1'):
    with pytest.raises(errors.ConfigError, match='sweep.frontier_temperatures'):
      cfg = config_lib.base_config()
      cfg.sweep.frontier_temperatures = bad
      config_lib.validate(cfg)


# ---------------------------------------------------------------------------------------------
# MAUVE on a tiny byte judge's features


def tiny_byte_judge():
  mcfg = config_lib.model_config('tiny', vocab_size=257, length=32)
  mcfg.kind, mcfg.compute_dtype = 'ar', 'float32'
  tok = get_tokenizer('byte')
  return judges.Judge('tiny-bytes', models.build(mcfg, seed=1), tok, 32, tok.eos_id)


def words(rng, n: int, alphabet: str) -> list[str]:
  return [''.join(rng.choice(list(alphabet), 32)) for _ in range(n)]


def test_mauve_same_distribution_high_different_low():
  pytest.importorskip('mauve', reason='MAUVE needs the mauve-text package (.[eval])')
  judge = tiny_byte_judge()
  rng = np.random.default_rng(0)
  text = 'the quick brown fox jumps over a lazy dog '
  a, b, c = (judge.features(t, 40) for t in
             (words(rng, 120, text), words(rng, 120, text), words(rng, 120, 'XYZ')))
  same = metrics.mauve(a, b, seed=0)
  other = metrics.mauve(a, c, seed=0)
  assert same['mauve'] > 0.95 and other['mauve'] < 0.05, (same, other)
  assert same['protocol'] == {'buckets': 12, 'package': same['protocol']['package'],
                              'pca_explained_variance': 0.9, 'kmeans_redo': 5}
  assert metrics.mauve(a, c, buckets=4, scaling=1.0, seed=0)['protocol']['buckets'] == 4


def test_missing_mauve_is_one_line_with_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, 'mauve', None)          # import mauve -> ImportError
  with pytest.raises(errors.ConfigError) as err:
    metrics.mauve(np.zeros((4, 2)), np.zeros((4, 2)))
  assert 'pip install mauve-text' in str(err.value) and '\n' not in str(err.value)
  cfg = config_lib.base_config()
  cfg.eval.judge, cfg.eval.mauve = 'smollm2', True
  for job in ('sweep', 'pipeline', 'ablate', 'compare'):    # every job whose cells MAUVE scores
    cfg.job = job
    with pytest.raises(errors.ConfigError, match='pip install mauve-text'):
      jobs.check(cfg)
  cfg.job, cfg.eval.mauve = 'sweep', False
  jobs.check(cfg)


def test_table_columns_say_gap_teacher_verdict_and_why_not():
  """results.md: a gap column per judge with 'gap [CI] (teacher F) verdict', '–' plus a note
  line for a row without a frontier, the temperature in the sampler column."""
  from didi_jax.evaluation import sweep
  cfg = config_lib.base_config()
  cfg.eval.judge, cfg.eval.extra_judges = 'j', 'k'
  base = {'precision': 'float32', 'gen_ppl': 15.0, 'gen_ppl_ci': [14.0, 16.0], 'entropy': 3.0,
          'entropy_ci': [2.9, 3.1]}
  below = frontier.gap(alike(16, 3.0, 15.0), FRONTIER, n_bootstrap=20)
  rows = [dict(base, model='teacher', sampler='ancestral', nfe=8, temperature=0.8),
          dict(base, model='student', sampler='rgas', nfe=8, temperature=1.0,
               frontier={'j': below, 'k': frontier.gap(alike(16, 1.0, 4.0), FRONTIER)}),
          dict(base, model='student', sampler='rgas', nfe=4, temperature=1.0,
               frontier={'j': {'note': 'no teacher frontier at NFE 4'}, 'k': {'note': 'x'}})]
  table = sweep.markdown(rows, cfg, {}, [])
  head = [ln for ln in table.splitlines() if ln.startswith('| model')][0]
  assert 'gap to teacher frontier j [95% CI] | gap to teacher frontier k [95% CI]' in head
  line8, line4 = [ln for ln in table.splitlines() if ln.startswith('| student')]
  assert '| -5.00 [-5.00, -5.00] (teacher 20.00) below | -1.00 (teacher 5.00) extrapolated |' \
      in line8
  assert '| – | – |' in line4 and 'No frontier (–): no teacher frontier at NFE 4' in table
  assert '| teacher | ancestral T=0.8 |' in table and 'Teacher frontier:' in table
