"""didi_jax: DiDi-Instruct (Discrete Diffusion Divergence Instruct) in JAX/Flax.

Python API:
  load_denoiser(SOURCE, dtype=jnp.float32) -> (ids_BxL | logits_BxLxV, sigma_B) -> logits_BxLxV
  load_discriminator(SOURCE, dtype=jnp.float32) -> (ids_BxL | logits_BxLxV, sigma_B) -> logits_BxL
  generate(MODEL, prompts=..., length=..., nfe=..., sampler=..., seed=...) -> texts and ids
      (didi_jax.generation; command line: python -m didi_jax.generate --help)
SOURCE / MODEL name a model the one way every entry point does (didi_jax.checkpoint.loader.resolve:
'demo', a run directory, a checkpoint file or directory, hf:ORG/NAME).
"""
import glob
import importlib.util
import os
import sys

from didi_jax import hostmem   # stdlib only (ctypes): safe before JAX starts

__version__ = '0.1.0'

_GOOGLE_PCI_VENDOR = '0x1ae0'          # TPU chips are Google PCI devices
_TPU_VARIABLES = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'TPU_NAME',
                  'TPU_WORKER_ID', 'TPU_PROCESS_BOUNDS')
_NVIDIA_DEVICES = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg')
_GPU_PLUGINS = {'cuda': ('jax_cuda12_plugin', 'jax_cuda13_plugin'),
                'rocm': ('jax_rocm6_plugin', 'jax_rocm7_plugin')}


def _has_tpu() -> bool:
  """A TPU may be here: a Google PCI device, a TPU device node, or the TPU runtime's variables."""
  if any(os.environ.get(k) for k in _TPU_VARIABLES) or glob.glob('/dev/accel*') or \
      any(n.isdigit() for n in (os.listdir('/dev/vfio') if os.path.isdir('/dev/vfio') else ())):
    return True
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor, encoding='ascii') as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _has_gpu() -> bool:
  """An NVIDIA or AMD GPU device node is visible."""
  return any(os.path.exists(d) for d in _NVIDIA_DEVICES) or os.path.exists('/dev/kfd')


def platforms_without_tpu():
  """The JAX platforms of a machine without a TPU on which the `libtpu` wheel is installed, else
  None (leave JAX's own choice alone).

  With libtpu installed (the lock file brings it for the TPU ahead-of-time check) JAX tries the
  TPU backend on every machine, and libtpu prints "Failed to find host bounds ... E0000 ...
  INVALID_ARGUMENT ..." before failing where there is no TPU. Naming the platforms skips that
  attempt, which can only fail there: 'cpu', or 'cuda,cpu' / 'rocm,cpu' where a GPU is visible
  and its JAX plugin installed. A TPU machine, a JAX_PLATFORMS the user set, or JAX_FORCE_TPU_INIT
  leave JAX as it is; `didi_jax.aot` still describes TPU topologies (it compiles on CPU).
  """
  if os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
    return None
  if importlib.util.find_spec('libtpu') is None or _has_tpu():
    return None
  gpu = [name for name, plugins in _GPU_PLUGINS.items()
         if any(importlib.util.find_spec(p) is not None for p in plugins)]
  if _has_gpu():
    if not gpu:
      return None                      # JAX's own "GPU present, no GPU jaxlib" warning stays
    return ','.join(gpu + ['cpu'])
  return 'cpu'


def _skip_absent_tpu() -> None:
  platforms = platforms_without_tpu()
  if platforms is None:
    return
  if 'jax' in sys.modules:             # imported already: its config read the environment
    import jax  # pylint: disable=import-outside-toplevel
    if jax.config.jax_platforms is None:
      jax.config.update('jax_platforms', platforms)
    return
  os.environ['JAX_PLATFORMS'] = platforms


_skip_absent_tpu()


def cpu_only(environ=None) -> bool:
  """This process computes on its CPU only: JAX_PLATFORMS=cpu, or no accelerator is visible."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms == 'cpu'
  return not (_has_tpu() or _has_gpu())


def _host_memory() -> None:
  """CPU runs: the command-line entry points start again under tcmalloc where it is installed
  (DIDI_JAX_MALLOC=glibc keeps glibc); with glibc, freed host memory is reused instead of
  page-faulted in again every step (`didi_jax.hostmem`; DIDI_JAX_MALLOC=system opts out of
  both), the heap it grows into marked for transparent huge pages (=nohuge leaves that out)."""
  if not cpu_only():
    return
  hostmem.reexec_under_tcmalloc()      # returns only where the process stays as it is
  if hostmem.wanted() and hostmem.keep_freed_memory():
    if hostmem.huge_pages_wanted():
      hostmem.advise_huge_pages()


_host_memory()


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
