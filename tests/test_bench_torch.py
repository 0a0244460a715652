"""The PyTorch baseline of the benchmark (didi_jax/bench_torch.py): same logits as ours on the same
weights (ids, soft input, σ), the same work per timed iteration (network calls and their shapes),
the same draw and the same loss. Never a speed (benchmarks only). Tiny model, L = 32.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

torch = pytest.importorskip('torch')

from didi_jax import bench  # noqa: E402
from didi_jax import bench_torch as bt  # noqa: E402
from didi_jax import config as config_lib  # noqa: E402
from didi_jax import diffusion  # noqa: E402
from didi_jax import models  # noqa: E402

V, L = 258, 32


def tiny_cfg():
  cfg = config_lib.model_config('tiny', vocab_size=V, length=L)
  cfg.compute_dtype = 'float32'
  return cfg


@pytest.fixture(scope='module')
def nets():
  cfg = tiny_cfg()
  params = bench._random_teacher_params(cfg)
  gd = models.split_abstract(cfg)[0]
  ours = jax.jit(lambda p, x, s: nnx.merge(gd, p)(x, s))
  return cfg, params, (lambda x, s: ours(params, x, s)), bt.from_jax(cfg, params)


def test_logits_match_ours_on_ids_and_soft_input(nets):
  cfg, params, ours, model = nets
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, (3, L)).astype(np.int32)
  sigma = np.array([0.0, 0.7, 3.0], np.float32)
  # The bench's weights are not degenerate (zero-initialised layers filled), so this compares.
  assert np.std(np.asarray(ours(ids, sigma))) > 1e-2
  assert bt.check_parity(model, ours, ids, sigma) < 1e-5
  soft = rng.normal(0, 2, (2, L, V)).astype(np.float32)     # logits: softmax inside
  with torch.no_grad():
    got = model(torch.from_numpy(soft), torch.zeros(2)).numpy()
  gd = models.split_abstract(cfg)[0]
  want = np.asarray(nnx.merge(gd, params)(soft, np.zeros(2, np.float32)))
  assert bt.max_rel_error(got, want) < 1e-5
  with pytest.raises(AssertionError, match='differ from ours'):
    bt.check_parity(model, lambda x, s: ours(x, s) * 1.01, ids, sigma)


def test_sampler_does_our_work_network_calls_and_shapes(nets):
  cfg, params, _, model = nets
  scfg = config_lib.base_config().sampler
  with scfg.unlocked():
    scfg.steps = 8
  den = bench.loader.Network('student_ema', cfg, models.split_abstract(cfg)[0], params)
  fn = bench.runner.make_sample_fn(scfg, den, None, batch_size=4, length=L, mask_id=V - 1)
  _, stats = fn(params, None, jax.random.PRNGKey(0), np.full((4, L), V - 1, np.int32))
  counted = bt.Counted(model.eval())
  x, calls = bt.ancestral_sample(counted, 4, L, V - 1, 8)
  assert calls == len(counted.shapes) == int(stats['student_forwards']) == 9
  assert set(counted.shapes) == {(4, L)}
  assert not bool((x == V - 1).any())            # noise removal filled every position


def test_sampler_cache_skips_the_network_when_nothing_changed():
  """A step that reveals nothing reuses the previous output (as ours): calls = 1 + changes."""
  probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
  seen = []

  def net(x, sigma):
    seen.append(x.clone())
    return torch.log(probs.clamp_min(1e-30)).expand(x.shape + (4,)).clone()
  torch.manual_seed(0)
  x, calls = bt.ancestral_sample(net, 1, 2, 3, 64)
  changes = sum(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
  assert calls == len(seen) == 1 + changes < 64    # every later call follows a change


def test_race_draws_the_normalised_weights():
  w = torch.tensor([0.1, 0.6, 0.0, 0.3])
  torch.manual_seed(1)
  draws = bt._race(w.expand(20000, 4)).numpy()   # pylint: disable=protected-access
  counts = np.bincount(draws, minlength=4)
  assert counts[2] == 0
  keep = [0, 1, 3]
  expect = w.numpy()[keep] / w.numpy().sum() * len(draws)
  assert sps.chisquare(counts[keep], expect).pvalue > 1e-4


def test_train_loss_is_our_nelbo_and_one_forward_per_step(nets):
  cfg, _, _, model = nets
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (2, L, V)).astype(np.float32)
  x = rng.integers(0, V - 1, (2, L))
  z = np.where(rng.random((2, L)) < 0.5, V - 1, x)
  t = np.array([0.3, 0.8], np.float32)
  want = np.mean(np.asarray(diffusion.nelbo_per_token(logits, z, x, t, V - 1)))
  got = bt.mdlm_loss(torch.from_numpy(logits), torch.from_numpy(z), torch.from_numpy(x),
                     torch.from_numpy(t), V - 1).item()
  assert got == pytest.approx(want, rel=1e-5)
  counted = bt.Counted(model)
  step = bt.make_train_step(model, config_lib.base_config().pretrain, V - 1, forward=counted)
  before = [p.detach().clone() for p in model.parameters()]
  xs = bt.tokens(2, L, V, 'cpu')
  assert np.isfinite(step(xs).item()) and np.isfinite(step(xs).item())
  assert counted.shapes == [(2, L), (2, L)]
  assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bench_prints_the_torch_row_and_ratio(capsys):
  rc = bench.main(['sample', '--size', 'tiny', '--length', str(L), '--batch', '8', '--steps', '4',
                   '--iters', '1', '--warmup', '1', '--baseline', 'torch-eager'])
  out = capsys.readouterr().out
  assert rc == 0
  assert '| sample (torch eager) | B=8 L=32 N=4 |' in out
  assert 'network calls per iteration ours 5 / torch 5 on (8, 32)' in out
  assert re.search(r'torch eager [\d.]+ s/iter = \*\*[\d.]+x\*\* our time \(> 1: ours is faster',
                   out)


def test_bench_train_row_uses_the_start_weights(capsys):
  """The JAX train step donates its state: the torch row must still load the weights."""
  rc = bench.main(['train', '--size', 'tiny', '--length', str(L), '--batch', '8', '--iters', '1',
                   '--warmup', '1', '--baseline', 'torch-eager'])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert '| train (torch eager) | B=8 L=32 |' in out
  assert 'network calls per iteration ours 1 / torch 1 on (8, 32)' in out
