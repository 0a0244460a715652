"""`python -m didi_jax.generate`: text generation from the command line (`--help`).

The code lives in `didi_jax.generation` (`generate`, `load`, prompts, rewards, the command line in
`didi_jax.generation.cli`). `didi_jax.generate` is the function `didi_jax.generation.generate`;
should this module itself be imported as `didi_jax.generate`, it is callable the same way.
"""
import sys
import types

from didi_jax.generation import cli as _cli
from didi_jax.generation import generate as _generate


class _CallableModule(types.ModuleType):
  """Keeps `didi_jax.generate(...)` a call once this module is imported under that name."""

  def __call__(self, *args, **kwargs):
    return _generate(*args, **kwargs)


if __name__ == '__main__':
  sys.exit(_cli.main())
else:
  sys.modules[__name__].__class__ = _CallableModule
