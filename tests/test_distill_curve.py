"""The distillation learning curve and its diagnostics (evaluation/distill_curve.py,
evaluation/distill_diagnostics.py; docs/method.md §10.1).

Each diagnostic on constructed cases (a perfect / constant discriminator, a reward equal to ±NLL,
the gradient split against the step's own gradient, the KL to the teacher against NumPy), then
one tiny distillation with the curve on: its points at exactly the expected iterations, the right
network judged (an independent evaluation of the checkpoint's networks with the same seed), the
teacher's levels cached, the figure drawn with the recorded values, and resumes after SIGTERM
and after a kill without a duplicate or missing point. Runtime: about a minute on 2 CPU cores.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import config as config_lib
from didi_jax import diffusion, models, parallel, samples
from didi_jax.distill import didi as distill
from didi_jax import main as cli
from didi_jax.checkpoint import exporter
from didi_jax.evaluation import distill_curve, distill_diagnostics as diag, evaluate, judges
from didi_jax.models.dit import DiT
from didi_jax.sampling import categorical
from didi_jax.sampling import runner as sampling_runner
from didi_jax.train import common
from didi_jax.train import distill_state as ds
from tests.test_cli import smoke_cfg
from tests.test_distill import (JIT_OPTS, LENGTH, MASK, np_group_advantages, np_log_softmax,
                                teacher_params, tiny_cfg)
from tests.test_main import stop_in_flag


# ------------------------------------------------------------------------------ statistics


def test_discriminator_accuracy_and_auc_on_constructed_cases():
  real, fake = np.array([0.5, 2.0, 0.1]), np.array([-1.0, -0.2, -3.0, -0.01])
  assert float(diag.auc(real, fake)) == 1.0 and float(diag.balanced_accuracy(real, fake)) == 1.0
  # Reversed: every pair wrong.
  assert float(diag.auc(fake, real)) == 0.0 and float(diag.balanced_accuracy(fake, real)) == 0.0
  for c in (0.0, 0.7, -2.0):              # a constant discriminator separates nothing
    assert float(diag.auc(np.full(3, c), np.full(4, c))) == 0.5
    assert float(diag.balanced_accuracy(np.full(3, c), np.full(4, c))) == 0.5
  # Against a NumPy pair count with ties (Mann–Whitney).
  rng = np.random.default_rng(0)
  r, f = rng.integers(-3, 4, 40).astype(float), rng.integers(-4, 3, 30).astype(float)
  pairs = [(a > b) + 0.5 * (a == b) for a in r for b in f]
  assert float(diag.auc(r, f)) == pytest.approx(np.mean(pairs), abs=1e-6)
  want_acc = 0.5 * (np.mean((r > 0) + 0.5 * (r == 0)) + np.mean((f < 0) + 0.5 * (f == 0)))
  assert float(diag.balanced_accuracy(r, f)) == pytest.approx(want_acc, abs=1e-6)


def test_reward_judge_rank_correlation_sign_and_per_token_nll():
  count = np.array([10, 40, 20, 5, 30])
  nll_per_token = np.array([2.0, 1.0, 3.0, 0.5, 1.5])
  nll_sum = nll_per_token * count
  assert diag.reward_judge_spearman(-nll_per_token, nll_sum, count) == pytest.approx(1.0)
  assert diag.reward_judge_spearman(nll_per_token, nll_sum, count) == pytest.approx(-1.0)
  # The judge's NLL is per counted token (the sums rank differently here); an uncounted sample
  # is left out.
  assert diag.spearman(-nll_per_token, -nll_sum) < 0.9
  with_empty = diag.reward_judge_spearman(np.append(-nll_per_token, 9.0), np.append(nll_sum, 0.0),
                                          np.append(count, 0))
  assert with_empty == pytest.approx(1.0)
  x = np.random.default_rng(1).normal(size=12)
  y = x + np.random.default_rng(2).normal(size=12)
  rank = lambda v: np.argsort(np.argsort(v))           # noqa: E731  (no ties here)
  assert diag.spearman(x, y) == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1])
  assert np.isnan(diag.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def step_keys(key, k):
  """The step's rollout keys (distill.make_distill_step's schedule)."""
  (_, _, roll1, roll2, _, _, _, drop) = jax.random.split(jax.random.fold_in(key, k), 8)
  d1, d2, dd1, dd2, _ = jax.random.split(drop, 5)
  return {'roll1': roll1, 'roll2': roll2, 'drop1': d1, 'drop2': d2, 'drop_draw1': dd1,
          'drop_draw2': dd2}


def test_gradient_split_sums_to_the_steps_own_gradient():
  cfg = tiny_cfg(entropy_coef=0.05)
  d = cfg.distill
  tp = teacher_params(cfg)
  sgd, dgd = ds.make_graphdefs(cfg)
  state = ds.init_distill_state(cfg, tp, jax.random.key(1))
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd, with_aux=True),
                 compiler_options=JIT_OPTS)
  x = jax.random.randint(jax.random.key(2), (d.batch_size, LENGTH), 0, MASK)
  key = jax.random.key(5)
  state, _, _ = step(state, tp, x, key)           # the student now differs from its teacher
  state_before = jax.tree.map(jnp.copy, state)
  _, _, aux = step(state, tp, x, key)
  N = d.batch_size * d.group_size
  net = distill.denoiser_net(sgd)
  keys = step_keys(key, 1)

  def rollout(p):
    return distill.student_rollout(p, tp, aux['tau_N'], keys, net=net, n_rows=N, length=LENGTH,
                                   mask_id=MASK, dcfg=d,
                                   regime=categorical.Regime.from_config(cfg.sampler),
                                   chunk_len=d.loss_chunk_len)
  wa = aux['omega_N'] * aux['adv_N']

  def parts(params):
    diff, vjp_fn, _ = jax.vjp(rollout, params, has_aux=True)
    direct = jax.grad(lambda p: -jnp.mean(wa * rollout(p)[0]['logp_N']))(params)
    return diag.gradient_parts(vjp_fn, diff, wa, d) + (direct,)
  g_pg, g_reg, g_total, g_direct = jax.jit(parts, compiler_options=JIT_OPTS)(
      state_before.student)
  leaves = lambda t: [np.asarray(v, np.float64) for v in jax.tree.leaves(t)]  # noqa: E731

  def close(x, y):          # float32 sums: within 1e-4 of the leaf's scale
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * max(np.abs(y).max(), 1e-3))
  for a, b, c in zip(leaves(g_pg), leaves(g_reg), leaves(g_total)):
    close(a + b, c)
  # The total is the step's own student gradient (same keys, τ and advantages) ...
  for a, b in zip(leaves(g_total), leaves(aux['grad_student'])):
    close(a, b)
  # ... and the policy-gradient part is the gradient of −mean(ω·A·log p_traj) alone.
  for a, b in zip(leaves(g_pg), leaves(g_direct)):
    close(a, b)
  norm = lambda t: float(common.global_norm(t))    # noqa: E731
  assert norm(g_pg) > 0 and norm(g_reg) > 0


@pytest.fixture(scope='module')
def diagnosed():
  """The diagnostic function on a tiny state whose EMA is the teacher and whose raw student is
  another network."""
  cfg = tiny_cfg(t0=0.3, entropy_coef=0.05)   # t0: the rollout leaves ~30% masked
  # A mildly perturbed fresh DiT as the teacher (and so the discriminator's trunk): the rewards
  # then differ between rows (a fresh trunk gives every [MASK] the same logit, a strongly
  # perturbed one saturates them all at the clip).
  fresh = nnx.state(DiT(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
  leaves, tdef = jax.tree.flatten(fresh)
  noise = jax.random.split(jax.random.key(100), len(leaves))
  tp = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                 for x, k in zip(leaves, noise)])
  sgd, dgd = ds.make_graphdefs(cfg)
  state = ds.init_distill_state(cfg, tp, jax.random.key(1))
  state = state.replace(student=teacher_params(cfg, seed=7))
  x_real = jax.random.randint(jax.random.key(3), (8, LENGTH), 0, MASK)
  keys = diag.diag_keys(0)
  fn = jax.jit(diag.make_diagnose(cfg, sgd, dgd), compiler_options=JIT_OPTS)
  out, rollout = fn(state, tp, x_real, keys)
  return dict(cfg=cfg, tp=tp, sgd=sgd, dgd=dgd, state=state, x_real=x_real, keys=keys,
              out={k: float(v) for k, v in out.items()}, rollout=rollout)


def test_kl_to_teacher_is_zero_at_the_teacher_and_matches_numpy(diagnosed):
  cfg, tp, sgd, state, x_real, keys, out, rollout = (diagnosed[k] for k in (
      'cfg', 'tp', 'sgd', 'state', 'x_real', 'keys', 'out', 'rollout'))
  d, student, N = cfg.distill, state.student, x_real.shape[0]
  assert abs(float(out['diag/kl_teacher/student_ema'])) < 1e-6       # EMA = teacher
  # NumPy: KL(S‖T) at the masked positions of the same corruptions, per row, then bands.
  per_band = []
  forward = jax.jit(lambda p, z, sig: nnx.merge(sgd, p)(z, sig), compiler_options=JIT_OPTS)
  for b, (lo, hi) in enumerate(diag.T_BANDS):
    kb_t, kb_real, _ = jax.random.split(jax.random.fold_in(keys['bands'], b), 3)
    t = jnp.clip(jax.random.uniform(kb_t, (N,), jnp.float32, lo, hi), d.tau.min, d.tau.max)
    z = np.asarray(diffusion.forward_mask(kb_real, x_real, t, MASK))
    zero = jnp.zeros((N,), jnp.float32)
    ls = np.asarray(forward(student, jnp.asarray(z), zero), np.float64)[..., :MASK]
    lt = np.asarray(forward(tp, jnp.asarray(z), zero), np.float64)[..., :MASK]
    ps, lps, lpt = np.exp(np_log_softmax(ls)), np_log_softmax(ls), np_log_softmax(lt)
    kl = np.sum(ps * (lps - lpt), -1)
    mk = z == MASK
    rows = [kl[i][mk[i]].mean() for i in range(N) if mk[i].any()]
    per_band.append(np.mean(rows) if rows else 0.0)
  assert float(out['diag/kl_teacher/student']) == pytest.approx(np.mean(per_band), rel=1e-4)
  assert float(out['diag/kl_teacher/student']) > 1e-3
  # The rollout's rewards are the objective's: the masked mean of the clipped log-odds.
  x_judged = np.asarray(rollout['x_fake_NxL'])      # the judge must see no [MASK]
  assert x_judged.shape == (N, LENGTH) and x_judged.max() < MASK
  r = np.asarray(rollout['reward_N'])
  assert r.shape == (N,) and np.all(np.abs(r) <= d.reward_clip)
  for b in range(len(diag.T_BANDS)):
    assert 0.0 <= float(out[f'diag/band{b}/d_auc']) <= 1.0


# ------------------------------------------------------------------------------ the curve


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('curve')
  teacher = str(root / 'teacher')
  cli.run_job(smoke_cfg(root, **{'job': 'pretrain', 'pretrain.num_steps': 4}), teacher)
  mcfg = config_lib.model_config('tiny', vocab_size=257, length=32)
  mcfg.kind, mcfg.compute_dtype = 'ar', 'float32'
  judge = str(root / 'bytes.safetensors')
  exporter.save_ours(judge, {'teacher': nnx.to_pure_dict(nnx.state(
      models.build(mcfg, seed=1), nnx.Param))}, model_cfg=mcfg)
  return root, teacher, judge


def curve_cfg(setup, **over):
  root, teacher, judge = setup
  fields = {'job': 'distill', 'teacher.checkpoint': teacher, 'distill.batch_size': 2,
            'distill.num_iterations': 5, 'distill.log_every': 1, 'distill.sample_every': 0,
            'distill.optim.student.lr': 3e-2, 'distill.optim.disc.lr': 1e-2,
            'distill.ema_decay': 0.5, 'checkpoint.every': 2, 'checkpoint.keep': 10,
            'distill.eval_every': 2, 'distill.eval_nfes': '4',
            'distill.eval_networks': 'student_ema,student', 'distill.eval_samples': 8,
            'distill.eval_judges': judge, 'distill.eval_diag_rows': 8,
            'eval.bootstrap': 20, 'eval.judge_batch_size': 4, 'sample.batch_size': 4}
  fields.update(over)
  return smoke_cfg(root, **fields)


def curve_rows(workdir):
  """(steps in file order, {step: row}) of the metrics rows with curve keys."""
  steps, rows = [], {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if any(k.startswith('curve/') for k in r):
        steps.append(r['step'])
        rows[r['step']] = r
  return steps, rows


def ema_curve(row):
  """A row's student-EMA curve values (the resumed runs judge only those, no diagnostics)."""
  return {k: v for k, v in row.items() if k.startswith('curve/student_ema/')}


def test_curve_points_network_teacher_cache_figure_and_resume(setup, tmp_path, monkeypatch,
                                                                capsys):
  _, _, judge = setup
  label = distill_curve.judge_label(judge)
  drawn = []
  real_draw = distill_curve.draw_figure
  monkeypatch.setattr(distill_curve, 'draw_figure',
                      lambda *a, **k: drawn.append(real_draw(*a, **k)) or drawn[-1])

  # A: uninterrupted, in a workdir holding rows of an attempt killed before its first checkpoint.
  work_a = str(tmp_path / 'a')
  os.makedirs(work_a)
  with open(os.path.join(work_a, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.write(json.dumps({'step': 0, f'curve/student_ema/nfe4/{label}/gen_ppl': -1.0}) + '\n')
    f.write(json.dumps({'step': 2, f'curve/student_ema/nfe4/{label}/gen_ppl': -1.0}) + '\n')
  cfg = curve_cfg(setup)
  cli.run_job(cfg, work_a)
  steps, rows = curve_rows(work_a)
  assert steps == [0, 2, 4, 5]                     # every eval_every, iteration 0 and the last
  assert all(r[f'curve/student_ema/nfe4/{label}/gen_ppl'] > 0 for r in rows.values())
  out = capsys.readouterr().out
  assert out.count('curve: teacher at 4 NFE') == 1
  assert os.path.exists(os.path.join(work_a, 'distill_curve.png'))

  # The right network judged: the checkpoint's networks, sampled and judged independently with
  # the same seed, give the recorded numbers; the EMA and the raw student differ.
  judge_obj = judges.load_judge(judge, distill_curve.judge_context(cfg, judge))
  for net in ('student_ema', 'student'):
    (network, _) = samples.load_sampling_networks(cfg, work_a, net, 'ancestral')[:2]
    res = sampling_runner.generate(distill_curve.sampler_config(cfg, 4), network, None,
                                   num_samples=8, batch_size=4, seed=int(cfg.eval.seed),
                                   mesh=parallel.make_mesh(cfg.mesh))
    q = evaluate.sample_quality(judge_obj, res.ids, samples.decode_all(cfg, res.ids),
                                group_size=4, judge_batch_size=4, n_bootstrap=20,
                                seed=int(cfg.eval.seed))
    assert rows[5][f'curve/{net}/nfe4/{label}/gen_ppl'] == pytest.approx(q['gen_ppl'], rel=1e-9)
    assert rows[5][f'curve/{net}/nfe4/{label}/gen_ppl_lo'] == pytest.approx(q['gen_ppl_ci'][0])
    assert rows[5][f'curve/{net}/nfe4/entropy'] == pytest.approx(q['entropy'], rel=1e-9)
  assert rows[5][f'curve/student_ema/nfe4/{label}/gen_ppl'] != \
      rows[5][f'curve/student/nfe4/{label}/gen_ppl']
  # At iteration 0 the student is its teacher: both networks, and the cached teacher, agree.
  cache = json.load(open(os.path.join(work_a, 'distill_curve', 'teacher.json'),
                         encoding='utf-8'))
  (entry,) = cache
  assert entry['nfe'] == 4 and entry['settings']['seed'] == int(cfg.eval.seed)
  t_ppl = entry['gen_ppl'][judge][0]
  assert rows[0][f'curve/student_ema/nfe4/{label}/gen_ppl'] == pytest.approx(t_ppl, rel=1e-6)
  assert rows[0][f'curve/student/nfe4/{label}/gen_ppl'] == pytest.approx(t_ppl, rel=1e-6)
  assert abs(rows[0]['diag/kl_teacher/student']) < 1e-6
  assert rows[5]['diag/kl_teacher/student'] > rows[5]['diag/kl_teacher/student_ema'] > 0
  for key in ('diag/band0/d_auc', 'diag/grad_norm_pg', 'diag/adv_std',
              f'diag/reward_judge_spearman/{label}'):
    assert np.isfinite(rows[5][key]), key

  # The figure shows the recorded values: the last drawing's lines read back.
  fig = drawn[-1].figure
  ax_ppl, ax_ent = fig.axes[0], fig.axes[1]
  lines = {ln.get_label(): ln for ln in ax_ppl.get_lines()}
  for net in ('student_ema', 'student'):
    ln = lines[f'{net} NFE 4']
    assert list(ln.get_xdata()) == [0, 2, 4, 5]
    np.testing.assert_allclose(ln.get_ydata(),
                               [rows[s][f'curve/{net}/nfe4/{label}/gen_ppl'] for s in steps])
  assert list(lines['teacher NFE 4'].get_ydata()) == [t_ppl, t_ppl]
  ent = {ln.get_label(): ln for ln in ax_ent.get_lines()}
  np.testing.assert_allclose(ent['student NFE 4'].get_ydata(),
                             [rows[s]['curve/student/nfe4/entropy'] for s in steps])
  assert ent['teacher NFE 4'].get_ydata()[0] == pytest.approx(entry['entropy'])
  diag_ax = fig.axes[4]
  auc0 = [ln for ln in diag_ax.get_lines() if ln.get_label().startswith('AUC t∈[0, ')][0]
  np.testing.assert_allclose(auc0.get_ydata(), [rows[s]['diag/band0/d_auc'] for s in steps])

  # B: SIGTERM during iteration 3 (a checkpoint at 3), then resumed: no point repeated or lost,
  # the teacher not evaluated again, every point equal to A's. (B and C judge the EMA alone and
  # skip the diagnostics: cheaper, same resume logic.)
  lean = {'distill.eval_networks': 'student_ema', 'distill.eval_diag_rows': 0}
  work_b = str(tmp_path / 'b')
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(1, 3))
  stopped = cli.run_job(curve_cfg(setup, **lean), work_b)
  assert stopped['step'] == 3 and not stopped['complete']
  assert curve_rows(work_b)[0] == [0, 2]
  monkeypatch.setattr(common, 'StopFlag', stop_in_flag(0, 1))
  capsys.readouterr()
  cli.run_job(curve_cfg(setup, **lean), work_b)
  assert 'curve: teacher at' not in capsys.readouterr().out
  steps_b, rows_b = curve_rows(work_b)
  assert steps_b == [0, 2, 4, 5]
  for s in steps_b:
    assert ema_curve(rows_b[s]) == ema_curve(rows[s]), s

  # C: killed after the point at 4 was logged but before checkpoints 4 and 5 were written:
  # the resume drops the rows newer than checkpoint 2 and logs 4 and 5 once.
  work_c = str(tmp_path / 'c')
  shutil.copytree(work_a, work_c)
  for s in ('4', '5'):
    shutil.rmtree(os.path.join(work_c, 'checkpoints', s))
  cli.run_job(curve_cfg(setup, **lean), work_c)
  steps_c, rows_c = curve_rows(work_c)
  assert steps_c == [0, 2, 4, 5]
  for s in steps_c:
    assert ema_curve(rows_c[s]) == ema_curve(rows[s]), s


def test_curve_settings_are_checked_up_front(setup):
  cfg = curve_cfg(setup, **{'distill.eval_networks': 'teacher'})
  with pytest.raises(config_lib.ConfigError, match='eval_networks'):
    config_lib.validate(cfg)
  cfg = curve_cfg(setup, **{'distill.eval_diag_rows': 6})
  with pytest.raises(config_lib.ConfigError, match='multiple of distill.group_size'):
    config_lib.validate(cfg)
  cfg = curve_cfg(setup, **{'distill.eval_judges': '/no/such/judge.safetensors'})
  from didi_jax import jobs
  with pytest.raises(config_lib.ConfigError, match='distill.eval_judges'):
    jobs.check(cfg)
  cfg = curve_cfg(setup, **{'distill.eval_nfes': '4,x'})
  with pytest.raises(config_lib.ConfigError, match='eval_nfes'):
    config_lib.validate(cfg)


def test_rewards_advantages_and_gradient_norms_match_an_independent_computation(diagnosed):
  """The objective's pieces recomputed: the rollout under the diagnostic keys, rewards from the
  discriminator's logits in NumPy (clipped log-odds), grouped advantages and ω(t) = clip(1/t) in
  NumPy, and the gradient of the whole student loss by jax.grad."""
  cfg, tp, sgd, dgd, state, x_real, keys, out = (diagnosed[k] for k in (
      'cfg', 'tp', 'sgd', 'dgd', 'state', 'x_real', 'keys', 'out'))
  d, N, G = cfg.distill, x_real.shape[0], cfg.distill.group_size
  tau = distill.sample_tau(keys['tau'], N, d.tau, G)
  rkeys = {'roll1': keys['roll1'], 'roll2': keys['roll2'], 'drop1': None, 'drop2': None,
           'drop_draw1': None, 'drop_draw2': None}
  regime = categorical.Regime.from_config(cfg.sampler)

  def rollout(p):
    return distill.student_rollout(p, tp, tau, rkeys, net=distill.denoiser_net(sgd), n_rows=N,
                                   length=LENGTH, mask_id=MASK, dcfg=d, regime=regime)

  def corrupted_logits(p):
    z = diffusion.forward_mask(keys['mask_fake'], rollout(p)[1]['x_fake_NxL'], tau, MASK)
    disc = nnx.merge(dgd, state.disc_train, state.disc_frozen, state.spectral)
    return z, disc(z, diffusion.sigma(tau), update_spectral=False)
  z, logit = jax.jit(corrupted_logits, compiler_options=JIT_OPTS)(state.student)
  logit = np.asarray(logit, np.float64)
  sig = 1.0 / (1.0 + np.exp(-logit))
  lo = np.clip(np.log(sig + 1e-6) - np.log(1.0 - sig + 1e-6), -d.reward_clip, d.reward_clip)
  mk = np.asarray(z) == MASK
  r = np.array([lo[i][mk[i]].mean() if mk[i].any() else 0.0 for i in range(N)])
  adv = np_group_advantages(r, G, d.adv_clip)[0]
  w = np.clip(1.0 / np.asarray(tau, np.float64), d.omega.min, d.omega.max)
  assert out['diag/reward_mean'] == pytest.approx(r.mean(), abs=1e-5)
  assert out['diag/reward_group_std'] == pytest.approx(
      r.reshape(-1, G).std(1, ddof=1).mean(), rel=1e-4)
  assert out['diag/adv_std'] == pytest.approx(adv.std(), rel=1e-4)
  wa = jnp.asarray(w * adv, jnp.float32)
  grads = jax.jit(lambda p: (
      jax.grad(lambda q: distill.student_loss_from_terms(rollout(q)[0], wa, d))(p),
      jax.grad(lambda q: -jnp.mean(wa * rollout(q)[0]['logp_N']))(p)),
      compiler_options=JIT_OPTS)(state.student)
  norm = lambda t: float(common.global_norm(t))    # noqa: E731
  assert out['diag/grad_norm_total'] == pytest.approx(norm(grads[0]), rel=1e-4)
  assert out['diag/grad_norm_pg'] == pytest.approx(norm(grads[1]), rel=1e-4)
  assert out['diag/grad_norm_reg'] > 0 and out['diag/grad_norm_pg'] > 0 and np.ptp(r) > 0.1


# ------------------------------------------------------------------------------ oracle reward


def np_bigram_reward(W, x, mask, eos):
  """−(mean NLL per scored byte) under the bigram judge logits[l] = W[ids[l]], in float64."""
  out = []
  for row in np.asarray(x):
    ids = np.where(row == mask, eos, row)
    nll = [np.log(np.sum(np.exp(W[ids[l]]))) - W[ids[l], ids[l + 1]]
           for l in range(len(row) - 1) if row[l + 1] != mask]
    out.append(-np.mean(nll) if nll else 0.0)
  return np.asarray(out)


def test_oracle_reward_is_minus_the_judges_nll_per_byte_in_the_step():
  """distill.reward_source='judge' (docs/method.md §10.2): the step's rewards are −(mean NLL per
  scored byte) of each sample under the judge (a bigram table here, against NumPy), [MASK]s read
  as EOS and left unscored; the advantages are their grouped z-scores."""
  eos = MASK - 1
  W = np.random.default_rng(3).normal(size=(MASK, MASK)).astype(np.float32) * 2.0
  judge = (lambda ids: jnp.asarray(W)[ids], eos)
  x = np.array([[1, 2, MASK, 4, 5, MASK, 0, 6], [MASK] * 8, [3] * 8])
  got = np.asarray(distill.judge_reward(judge[0], jnp.asarray(x), MASK, eos))
  np.testing.assert_allclose(got, np_bigram_reward(W, x, MASK, eos), rtol=1e-5, atol=1e-6)
  assert got[1] == 0.0
  cfg = tiny_cfg(reward_source='judge')
  d = cfg.distill
  tp = teacher_params(cfg)
  sgd, dgd = ds.make_graphdefs(cfg)
  with pytest.raises(ValueError, match='needs the judge'):
    distill.make_distill_step(cfg, sgd, dgd)
  state = ds.init_distill_state(cfg, tp, jax.random.key(1))
  step = jax.jit(distill.make_distill_step(cfg, sgd, dgd, with_aux=True, judge=judge),
                 compiler_options=JIT_OPTS)
  xd = jax.random.randint(jax.random.key(2), (d.batch_size, LENGTH), 0, MASK)
  _, metrics, aux = step(state, tp, xd, jax.random.key(5))
  want = np_bigram_reward(W, aux['x_fake_NxL'], MASK, eos)
  np.testing.assert_allclose(np.asarray(aux['reward_N']), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux['adv_N']),
                             np_group_advantages(want, d.group_size, d.adv_clip)[0],
                             rtol=1e-4, atol=1e-5)
  assert float(metrics['reward_mean']) == pytest.approx(want.mean(), rel=1e-5)
  # Byte data only: the judge reads the student's ids as bytes.
  bad = config_lib.base_config()
  bad.distill.reward_source = 'judge'
  bad.data.tokenizer = 'gpt2'
  with pytest.raises(config_lib.ConfigError, match='byte data'):
    config_lib.validate(bad)
