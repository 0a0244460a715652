"""The distillation family behind one interface: `distill.method` picks the method's loop and
runner (docs/method.md §6-§7 DiDi-Instruct, §14 SDTT). The `distill` job, the ablation and the
compare job, and `didi_jax.aot` go through here, never to a method directly."""
from __future__ import annotations

from didi_jax.distill import sdtt
from didi_jax.train import distill_loop, sdtt_loop

LOOPS = {'didi': distill_loop, 'sdtt': sdtt_loop}


def method(cfg) -> str:
  return str(cfg.distill.get('method', 'didi'))


def run(cfg, workdir: str, curve=None, reward_judge=None) -> dict:
  """The `distill` job of the configured method. `curve` (the learning-curve hook, built by the
  job layer: evaluation/distill_curve.py) is DiDi-Instruct's: its diagnostics read the
  discriminator, which SDTT does not have, so an SDTT run logs no curve and says so.
  `reward_judge`: the judge loader of DiDi's `distill.reward_source='judge'` (job layer)."""
  if method(cfg) == 'sdtt':
    if curve is not None and int(cfg.distill.get('eval_every', 0)) > 0:
      print('distill: the learning curve (distill.eval_every) is drawn for DiDi-Instruct runs '
            'only; this SDTT run logs its losses without it', flush=True)
    return sdtt_loop.run(cfg, workdir)
  return distill_loop.run(cfg, workdir, curve=curve, reward_judge=reward_judge)


def total_iterations(cfg) -> int:
  """Iterations a complete run of the configured method holds."""
  if method(cfg) == 'sdtt':
    return sdtt.total_iterations(cfg.distill.sdtt)
  return int(cfg.distill.num_iterations)


def total_key(cfg) -> str:
  """The config key that sets `total_iterations` (named in messages)."""
  return 'distill.sdtt.rounds' if method(cfg) == 'sdtt' else 'distill.num_iterations'


def runner(cfg, teacher, devices=None):
  """The method's runner (mesh, shardings, jitted step): `distill_loop.Distiller` or
  `sdtt_loop.SdttDistiller`."""
  cls = sdtt_loop.SdttDistiller if method(cfg) == 'sdtt' else distill_loop.Distiller
  return cls(cfg, teacher, devices)
