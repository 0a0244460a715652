"""Test set-up: CPU only, 8 fake devices (sharding tests build their own meshes)."""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import tempfile  # noqa: E402

import jax  # noqa: E402

# Runs inside one test compile the same programs again (fresh closures): reuse them by HLO.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('DIDI_TEST_JAX_CACHE',
                                 os.path.join(tempfile.gettempdir(), 'didi_jax_test_xla_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
