"""The distillation family behind one interface: `distill.method` picks the method's loop and
runner (docs/method.md §6-§7 DiDi-Instruct, §14 SDTT). The `distill` job, the ablation and the
compare job, and `didi_jax.aot` go through here, never to a method directly."""
from __future__ import annotations

from didi_jax.distill import sdtt
from didi_jax.train import distill_loop, sdtt_loop

LOOPS = {'didi': distill_loop, 'sdtt': sdtt_loop}


def method(cfg) -> str:
  return str(cfg.distill.get('method', 'didi'))


def run(cfg, workdir: str) -> dict:
  """The `distill` job of the configured method."""
  return LOOPS[method(cfg)].run(cfg, workdir)


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
