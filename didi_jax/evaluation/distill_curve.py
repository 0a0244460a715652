"""The distillation learning curve (docs/method.md §10.1): a periodic evaluation of the student
during training, its diagnostics, and WORKDIR/distill_curve.png.

Every `distill.eval_every` iterations (and at iteration 0 and the last one) the distill loop calls
`Curve(step, state)`: each network of `distill.eval_networks` (the EMA the samplers use, and
optionally the raw student) draws `distill.eval_samples` ancestral samples at every NFE of
`distill.eval_nfes` with the SAME seed (`eval.seed`) at every point, so two points differ only
by the network; each judge of `distill.eval_judges` scores them (Gen PPL with its 95% bootstrap
interval, `evaluate.sample_quality`, the sweep's code) beside their unigram entropy. The
diagnostics (`distill_diagnostics`) run on `distill.eval_diag_rows` held-out validation rows and
one fixed rollout, and the judges rank that rollout's samples against their rewards. Everything
goes to metrics.jsonl as one row per point (keys `curve/...` and `diag/...`, see `point_keys`).

The teacher is evaluated once at the same NFEs, seed and sample count and cached in
WORKDIR/distill_curve/teacher.json (keyed by every setting that moves its numbers), so a resumed
run does not redo it. The figure is redrawn from metrics.jsonl at every point, so it always
shows exactly the recorded rows (a resumed run's loop has already dropped rows newer than its
checkpoint: no duplicate and no missing point).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from didi_jax import artifacts, errors, parallel, samples
from didi_jax import config as config_lib
from didi_jax.checkpoint import loader
from didi_jax.data import pipeline
from didi_jax.evaluation import distill_diagnostics as diag
from didi_jax.evaluation import evaluate, judges, plots
from didi_jax.sampling import runner as sampling_runner

CURVE_DIR = 'distill_curve'
TEACHER_CACHE = 'teacher.json'
FIGURE = 'distill_curve.png'


# ------------------------------------------------------------------------------ settings


def judge_names(cfg) -> list[str]:
  """`distill.eval_judges`, or (empty) the run's eval.judge and eval.extra_judges."""
  names = config_lib.parse_list(cfg.distill.eval_judges, 'distill.eval_judges')
  return names or list(dict.fromkeys([cfg.eval.judge] + judges.extra_judge_names(cfg.eval)))


def check(cfg) -> None:
  """Before any work (jobs.check): the curve's judges resolve and the data is text."""
  if not cfg.distill.eval_every:
    return
  if config_lib.is_protein(cfg):
    raise errors.ConfigError('distill.eval_every: the learning curve judges text; for proteins '
                             'set --config.distill.eval_every=0 and run the sweep')
  for name in judge_names(cfg):
    judges.check_judge_name(name, 'distill.eval_judges')


def judge_context(cfg, name: str) -> int:
  """The context a judge scores with, as in the sweep: eval.judge_context for eval.judge, else
  eval.extra_judge_context (0: the judge's longest, e.g. a byte judge's model length)."""
  e = cfg.eval
  if name == e.judge:
    return int(e.judge_context)
  return int(e.get('extra_judge_context', 0)) or judges.max_context(name) or int(e.judge_context)


def judge_label(name: str) -> str:
  """A judge's name in metric keys: the name, or a path's file stem."""
  if os.sep in name or name.endswith(('.safetensors', '.npz', '.gguf')):
    return os.path.splitext(os.path.basename(name.rstrip(os.sep)))[0]
  return name


def ppl_key(net: str, nfe: int, judge: str, part: str = 'gen_ppl') -> str:
  """'curve/<network>/nfe<N>/<judge label>/gen_ppl' (part: gen_ppl | gen_ppl_lo | gen_ppl_hi)."""
  return f'curve/{net}/nfe{nfe}/{judge_label(judge)}/{part}'


def entropy_key(net: str, nfe: int) -> str:
  return f'curve/{net}/nfe{nfe}/entropy'


def spearman_key(judge: str) -> str:
  return f'diag/reward_judge_spearman/{judge_label(judge)}'


def sampler_config(cfg, nfe: int):
  """cfg.sampler as a plain ancestral sampler of `nfe` steps."""
  sc = copy.deepcopy(cfg.sampler)
  with sc.unlocked():
    sc.kind, sc.steps = 'ancestral', int(nfe)
  return sc


# ------------------------------------------------------------------------------ the hook


class Curve:
  """The periodic evaluation: `curve(step, state) -> metrics` (also redraws the figure)."""

  def __init__(self, cfg, workdir: str, runner, teacher):
    """`runner`: the distill loop's `Distiller`; `teacher`: the teacher `loader.Network`."""
    d = cfg.distill
    self.cfg, self.workdir, self.runner, self.teacher = cfg, workdir, runner, teacher
    self.nfes = config_lib.parse_nfes(d.eval_nfes, 'distill.eval_nfes')
    self.networks = config_lib.parse_list(d.eval_networks, 'distill.eval_networks',
                                          config_lib.EVAL_NETWORKS)
    self.names = judge_names(cfg)
    labels = [judge_label(n) for n in self.names]
    if len(set(labels)) != len(labels):
      raise errors.ConfigError(f'distill.eval_judges {self.names} share a file name: rename one')
    self.seed, self.count = int(cfg.eval.seed), int(d.eval_samples)
    div = parallel.batch_divisor(runner.mesh)
    self.batch = max(div, -(-min(self.count, int(cfg.sample.batch_size)) // div) * div)
    self.rows = int(d.eval_diag_rows)
    if self.rows % div:
      raise errors.ConfigError(f'distill.eval_diag_rows={self.rows} is not divisible by the {div} '
                               'devices of the batch axes: use a multiple of them')
    self._judges = None
    self._samplers = {}
    self._diagnose = None
    self._x_real = None
    self.cache_path = os.path.join(workdir, CURVE_DIR, TEACHER_CACHE)
    self.figure_path = os.path.join(workdir, FIGURE)
    self.show = ([ppl_key(n, nfe, self.names[0]) for n in self.networks for nfe in self.nfes]
                 + ([f'diag/kl_teacher/{self.networks[0]}', spearman_key(self.names[0])]
                    if self.rows else []) + ['curve/seconds'])

  # -- pieces

  def judges(self) -> list:
    if self._judges is None:
      self._judges = [judges.load_judge(n, judge_context(self.cfg, n)) for n in self.names]
    return self._judges

  def quality(self, judge, ids) -> dict:
    e = self.cfg.eval
    return evaluate.sample_quality(judge, ids, samples.decode_all(self.cfg, ids),
                                   group_size=self.batch, judge_batch_size=int(e.judge_batch_size),
                                   n_bootstrap=int(e.bootstrap), seed=self.seed)

  def draw(self, params, nfe: int) -> np.ndarray:
    """`sampling.runner.generate`'s draws (batch b from fold_in(PRNGKey(seed), b), all-[MASK]
    start) with one compiled sampler per NFE, reused by every point and network: the student,
    its EMA and the teacher share the student's graphdef."""
    m = self.cfg.model
    mask_id, length = int(m.vocab_size) - 1, int(m.length)
    if nfe not in self._samplers:
      net = loader.Network('student', m, self.runner.student_gd, params)
      self._samplers[nfe] = sampling_runner.make_sample_fn(
          sampler_config(self.cfg, nfe), net, None, batch_size=self.batch, length=length,
          mask_id=mask_id)
    base = jax.random.PRNGKey(self.seed)
    x_init = parallel.global_batch(self.runner.mesh,
                                   np.full((self.batch, length), mask_id, np.int32))
    ids = [sampling_runner.host_value(self._samplers[nfe](
        params, None, jax.random.fold_in(base, b), x_init)[0])
           for b in range(-(-self.count // self.batch))]
    return np.concatenate(ids)[:self.count].astype(np.int32)

  def judged(self, params, nfe: int) -> dict:
    """{judge name: quality} of the samples of the network with `params` at `nfe`."""
    ids = self.draw(params, nfe)
    return {j.name: self.quality(j, ids) for j in self.judges()}

  def params(self, state, role: str):
    return state.ema if role == 'student_ema' else state.student

  def teacher_settings(self, nfe: int) -> dict:
    e = self.cfg.eval
    out = {'teacher': self.cfg.teacher.checkpoint, 'weights': self.cfg.teacher.weights,
           'samples': self.count, 'batch_size': self.batch, 'seed': self.seed,
           'bootstrap': int(e.bootstrap), 'judge_batch_size': int(e.judge_batch_size),
           'judges': {n: judge_context(self.cfg, n) for n in self.names},
           'sampler': sampling_runner.sampler_settings(sampler_config(self.cfg, nfe), 'teacher',
                                                       nfe),
           't_min': float(self.cfg.sampler.t_min),
           'sparse_capacity': float(self.cfg.sampler.get('sparse_capacity', 0.0))}
    return json.loads(json.dumps(out, default=artifacts.json_default))

  def teacher_levels(self) -> dict:
    """{nfe: {'gen_ppl': {judge: [value, lo, hi]}, 'entropy': value}}, computed once per
    setting and cached in WORKDIR/distill_curve/teacher.json."""
    cached = read_cache(self.cache_path)
    out, changed = {}, False
    for nfe in self.nfes:
      settings = self.teacher_settings(nfe)
      hit = next((c for c in cached if c['settings'] == settings), None)
      if hit is None:
        t0 = time.time()
        q = self.judged(self.teacher.params, nfe)
        hit = {'settings': settings, 'nfe': nfe,
               'gen_ppl': {n: [q[n]['gen_ppl']] + list(q[n]['gen_ppl_ci']) for n in q},
               'entropy': q[self.names[0]]['entropy']}
        cached.append(hit)
        changed = True
        print(f'curve: teacher at {nfe} NFE '
              + ' '.join(f'{n} {v[0]:.2f}' for n, v in hit['gen_ppl'].items())
              + f' entropy {hit["entropy"]:.3f} ({time.time() - t0:.1f}s, cached in '
              f'{self.cache_path})', flush=True)
      out[nfe] = hit
    if changed and jax.process_index() == 0:
      artifacts.write_json(self.cache_path, cached)
    return out

  def held_out(self):
    """`eval_diag_rows` validation rows (the discriminator never trained on them), global."""
    if self._x_real is None:
      x = pipeline.eval_batches(self.cfg.data, int(self.cfg.model.length), self.rows, 1,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())[0]
      self._x_real = parallel.global_batch(self.runner.mesh, np.asarray(x, np.int32))
    return self._x_real

  def diagnostics(self, state) -> dict:
    if self._diagnose is None:
      self._diagnose = diag.jit_diagnose(self.cfg, self.runner.student_gd, self.runner.disc_gd,
                                         self.networks,
                                         out_shardings=parallel.replicated(self.runner.mesh))
    metrics, rollout = self._diagnose(state, self.runner.teacher_params, self.held_out(),
                                      diag.diag_keys(self.seed))
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    ids = np.asarray(jax.device_get(rollout['x_fake_NxL']), np.int32)
    reward = np.asarray(jax.device_get(rollout['reward_N']), np.float64)
    texts = samples.decode_all(self.cfg, ids)
    for j in self.judges():
      nll, count = evaluate.judge_scores(j, texts, self.batch, int(self.cfg.eval.judge_batch_size))
      out[spearman_key(j.name)] = diag.reward_judge_spearman(reward, nll, count)
    return out

  # -- one point

  def point(self, state) -> dict:
    out = {}
    for net in self.networks:
      for nfe in self.nfes:
        q = self.judged(self.params(state, net), nfe)
        for name, rec in q.items():
          lo, hi = rec['gen_ppl_ci']
          out[ppl_key(net, nfe, name)] = rec['gen_ppl']
          out[ppl_key(net, nfe, name, 'gen_ppl_lo')] = lo
          out[ppl_key(net, nfe, name, 'gen_ppl_hi')] = hi
        out[entropy_key(net, nfe)] = q[self.names[0]]['entropy']
    if self.rows:
      out.update(self.diagnostics(state))
    return out

  def __call__(self, step: int, state) -> dict:
    t0, c0 = time.time(), time.process_time()
    teacher = self.teacher_levels()
    out = self.point(state)
    out['curve/seconds'] = time.time() - t0
    out['curve/cpu_seconds'] = time.process_time() - c0     # all threads: cost on idle cores
    if jax.process_index() == 0:
      rows = [r for r in read_rows(self.workdir) if r['step'] < step] + [dict(out, step=step)]
      draw_figure(rows, teacher, self.names, self.networks, self.nfes, self.figure_path,
                  title=f'{self.count} samples per point, seed {self.seed}')
    return out


# ------------------------------------------------------------------------------ files


def read_cache(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def read_rows(workdir: str) -> list[dict]:
  """The curve rows of WORKDIR/metrics.jsonl (those with `curve/` keys), by step; a step logged
  twice keeps its last row."""
  path = os.path.join(workdir, 'metrics.jsonl')
  by_step = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue                         # a line cut short by a kill
        if any(k.startswith('curve/') for k in r):
          by_step[int(r['step'])] = r
  return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------------------ figure


def draw_figure(rows: Sequence[dict], teacher: dict, names: Sequence[str],
                networks: Sequence[str], nfes: Sequence[int], path: str,
                title: str = '') -> plots.CurvePlot:
  """WORKDIR/distill_curve.png. Top: Gen PPL per judge (log y, the 95% interval as a band) and
  unigram entropy against iteration, one line per (network, NFE), the teacher at each NFE dashed
  in the same colour. Bottom (when the rows hold diagnostics): the discriminator's AUC per band
  of t (accuracy dotted), the reward–judge rank correlation per judge, the gradient norms (policy
  gradient, KL/entropy, total), and the advantage / reward spread with the KL to the teacher."""
  rows = sorted(rows, key=lambda r: r['step'])
  has_diag = any(k.startswith('diag/') for r in rows for k in r)
  ncols = max(len(names) + 1, 4 if has_diag else 0)
  fig = Figure(figsize=(4.8 * ncols, 3.9 * (2 if has_diag else 1)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(2 if has_diag else 1, ncols, squeeze=False)
  top = list(axes[0])
  series = []
  colours = {}
  for net in networks:
    for nfe in nfes:
      label = f'{net} NFE {nfe}'
      style = '-' if net == 'student_ema' else '--'
      xs = [r['step'] for r in rows if ppl_key(net, nfe, names[0]) in r]
      if not xs:
        continue
      series.append(label)
      for ax, name in zip(top, names):
        rs = [r for r in rows if ppl_key(net, nfe, name) in r]
        line, = ax.plot([r['step'] for r in rs], [r[ppl_key(net, nfe, name)] for r in rs],
                        linestyle=style, marker='o', markersize=3, label=label,
                        color=colours.get(nfe))
        colours.setdefault(nfe, line.get_color())
        ax.fill_between([r['step'] for r in rs],
                        [r[ppl_key(net, nfe, name, 'gen_ppl_lo')] for r in rs],
                        [r[ppl_key(net, nfe, name, 'gen_ppl_hi')] for r in rs],
                        color=colours[nfe], alpha=0.15)
      rs = [r for r in rows if entropy_key(net, nfe) in r]
      top[len(names)].plot([r['step'] for r in rs], [r[entropy_key(net, nfe)] for r in rs],
                           linestyle=style, marker='o', markersize=3, label=label,
                           color=colours.get(nfe))
  for nfe in nfes:
    t = teacher.get(nfe) or teacher.get(str(nfe))
    if t is None:
      continue
    colour = colours.get(nfe, 'k')
    for ax, name in zip(top, names):
      if name in t['gen_ppl']:
        ax.axhline(t['gen_ppl'][name][0], color=colour, linestyle=':', linewidth=1.2,
                   label=f'teacher NFE {nfe}')
    top[len(names)].axhline(t['entropy'], color=colour, linestyle=':', linewidth=1.2,
                            label=f'teacher NFE {nfe}')
  for ax, name in zip(top, names):
    ax.set_ylabel(f'Gen PPL ({name})')
    if series:
      ax.set_yscale('log')
  top[len(names)].set_ylabel('unigram entropy (nats)')
  for ax in top[len(names) + 1:]:
    ax.axis('off')
  if has_diag:
    _draw_diagnostics(list(axes[1]), rows, names, networks)
  for ax in fig.axes:
    if ax.axison:
      ax.set_xlabel('iteration')
      ax.grid(True, alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
  plots.save(fig, path, title)
  return plots.CurvePlot(fig, series, path)


def _plot_key(ax, rows, key, **style):
  rs = [r for r in rows if r.get(key) is not None and np.isfinite(r[key])]
  if rs:
    ax.plot([r['step'] for r in rs], [r[key] for r in rs], marker='o', markersize=3, **style)


def _draw_diagnostics(axes, rows, names, networks):
  ax_d, ax_rho, ax_g, ax_s = axes[:4]
  for b in range(len(diag.T_BANDS)):
    _plot_key(ax_d, rows, f'diag/band{b}/d_auc', label=f'AUC {diag.band_label(b)}',
              color=f'C{b}')
    _plot_key(ax_d, rows, f'diag/band{b}/d_acc', linestyle=':', color=f'C{b}')
  ax_d.axhline(0.5, color='gray', linewidth=1)
  ax_d.set_ylabel('discriminator AUC (acc. dotted), held out')
  for name in names:
    _plot_key(ax_rho, rows, spearman_key(name), label=name)
  ax_rho.axhline(0.0, color='gray', linewidth=1)
  ax_rho.set_ylabel('Spearman(reward, −judge NLL)')
  for key, label in (('diag/grad_norm_pg', 'policy gradient'),
                     ('diag/grad_norm_reg', 'KL + entropy'), ('diag/grad_norm_total', 'total')):
    _plot_key(ax_g, rows, key, label=label)
  ax_g.set_ylabel('student gradient norm')
  if any(r.get('diag/grad_norm_total') for r in rows):
    ax_g.set_yscale('log')
  _plot_key(ax_s, rows, 'diag/adv_std', label='advantage std')
  _plot_key(ax_s, rows, 'diag/reward_group_std', label='reward std within groups')
  for net in networks:
    _plot_key(ax_s, rows, f'diag/kl_teacher/{net}', label=f'KL({net}‖teacher)', linestyle='--')
  ax_s.set_ylabel('spread / KL (nats per position)')
  for ax in axes[4:]:
    ax.axis('off')
