"""Networks, and the one factory that builds them from a model config and a role.

    model = models.build(cfg.model, 'denoiser', seed=0)          # fresh parameters
    graphdef, params, spectral = models.split_abstract(cfg.model, 'discriminator')  # no arrays

`model_cfg.kind` names the architecture ('dit': the masked-diffusion DiT; 'ar': the causal GPT-2
baseline; 'esm': the ESM-2 / DPLM protein masked LM, `models.esm`), the role what is built from
it ('denoiser': teacher / student / AR model;
'discriminator': the denoiser's trunk with a spectral-normalised per-token head). An architecture
that can serve as a distillation teacher implements the `Denoiser` interface
(`didi_jax.models.interface`); the samplers, the objective and the loaders only use that
interface, so a new one plugs in with `register` and nothing else.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from flax import nnx

from didi_jax.models import esm, gpt2
from didi_jax.models.discriminator import Discriminator, Spectral
from didi_jax.models.dit import DiT

ROLES = ('denoiser', 'discriminator')


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Constructors of one `model.kind`: (model_cfg, rngs) -> nnx.Module per role."""
  denoiser: Callable
  discriminator: Optional[Callable] = None


ARCHITECTURES: dict[str, Architecture] = {
    'dit': Architecture(denoiser=DiT, discriminator=Discriminator),
    'ar': Architecture(
        denoiser=lambda cfg, rngs: gpt2.GPT2(gpt2.GPT2Config.from_model_config(cfg), rngs=rngs)),
    'esm': Architecture(
        denoiser=lambda cfg, rngs: esm.EsmForMaskedLM(esm.from_model_config(cfg), rngs=rngs),
        discriminator=lambda cfg, rngs: esm.EsmDiscriminator(esm.from_model_config(cfg),
                                                             rngs=rngs)),
}


def register(kind: str, denoiser: Callable, discriminator: Optional[Callable] = None) -> None:
  """Makes `model.kind=kind` buildable (constructors take (model_cfg, *, rngs))."""
  ARCHITECTURES[kind] = Architecture(denoiser=denoiser, discriminator=discriminator)


def constructor(model_cfg, role: str = 'denoiser') -> Callable:
  kind = str(model_cfg.get('kind', 'dit'))
  if kind not in ARCHITECTURES:
    raise ValueError(f'model.kind={kind!r} is not a known architecture: use one of '
                     f'{sorted(ARCHITECTURES)}')
  if role not in ROLES:
    raise ValueError(f'role={role!r}: use one of {ROLES}')
  ctor = getattr(ARCHITECTURES[kind], role)
  if ctor is None:
    raise ValueError(f"model.kind={kind!r} has no {role}: the discriminator needs a denoiser "
                     "trunk (model.kind='dit')")
  return ctor


def build(model_cfg, role: str = 'denoiser', *, seed: int = 0,
          rngs: Optional[nnx.Rngs] = None) -> nnx.Module:
  """The network `role` of `model_cfg.kind` with fresh parameters (from `rngs`, else `seed`)."""
  ctor = constructor(model_cfg, role)
  return ctor(model_cfg, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def abstract(model_cfg, role: str = 'denoiser') -> nnx.Module:
  """The same network with ShapeDtypeStructs for parameters: nothing is allocated."""
  return nnx.eval_shape(lambda: build(model_cfg, role))


def split_abstract(model_cfg, role: str = 'denoiser'):
  """(graphdef, abstract Param state, abstract Spectral state or None) of `abstract(...)`."""
  module = abstract(model_cfg, role)
  if role == 'discriminator':
    return nnx.split(module, nnx.Param, Spectral)
  graphdef, params = nnx.split(module, nnx.Param)
  return graphdef, params, None
