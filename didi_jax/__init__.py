"""didi_jax: DiDi-Instruct (Discrete Diffusion Divergence Instruct) in JAX/Flax.

Python API:
  load_denoiser(SOURCE, dtype=jnp.float32) -> (ids_BxL | logits_BxLxV, sigma_B) -> logits_BxLxV
  load_discriminator(SOURCE, dtype=jnp.float32) -> (ids_BxL | logits_BxLxV, sigma_B) -> logits_BxL
  generate(MODEL, prompts=..., length=..., nfe=..., sampler=..., seed=...) -> texts and ids
      (didi_jax.generation; command line: python -m didi_jax.generate --help)
"""
__version__ = '0.1.0'


# The public API loads lazily (PEP 562): importing a submodule such as `didi_jax.aot`, which sets
# environment variables before JAX starts, must not import JAX through this package first.
def __getattr__(name):
  if name in ('load_denoiser', 'load_discriminator'):
    from didi_jax import api  # pylint: disable=import-outside-toplevel
    return getattr(api, name)
  if name == 'generate':
    from didi_jax.generation import generate  # pylint: disable=import-outside-toplevel
    return generate
  raise AttributeError(f'module didi_jax has no attribute {name!r}')
