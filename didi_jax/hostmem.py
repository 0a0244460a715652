"""Host memory for CPU runs: keep freed memory for reuse instead of handing it back to the kernel.

XLA's CPU runtime allocates each program's temporary buffer (1.2 GB for the demo-size training
step) with `posix_memalign` from a worker thread, and frees it when the program ends. glibc's
malloc serves a request that large from a fresh `mmap` (a thread's arena cannot hold it, and
above the mmap threshold even the main arena maps it) and unmaps it on free, so every step
page-faults its whole working set again: 340,000 zero-filled 4 KiB pages per training step,
about a third of the step on the 2-core machine of BENCHMARKS.md.

`keep_freed_memory()` sets glibc's malloc to one arena, no mmap-served chunks and a 2 GiB trim
threshold (`mallopt(M_ARENA_MAX, 1)`, `mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD,
2**31 - 1)`): the buffer comes from the heap, returns to it when freed and is reused by the next
call without a page fault. Nothing else changes (values, programs); the process keeps up to
2 GiB of freed memory mapped. The package applies it on import when the process computes on its
CPU only (no accelerator visible, or JAX_PLATFORMS=cpu), before JAX starts its threads.
`DIDI_JAX_MALLOC=system` leaves the allocator as it is; so do non-glibc systems, and a
MALLOC_ARENA_MAX / GLIBC_TUNABLES the user set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2 ** 31 - 1          # mallopt takes an int: 2 GiB
OPT_OUT = 'DIDI_JAX_MALLOC'           # =system: leave malloc as it is
_USER_SETTINGS = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_',
                  'GLIBC_TUNABLES')


def _glibc():
  """The process's C library when it is glibc (it has `gnu_get_libc_version`), else None."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None
  return libc


def wanted(environ=None) -> bool:
  """Whether `keep_freed_memory` should run here: not opted out, no malloc setting of the user."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '').strip().lower() == 'system':
    return False
  return not any(k in environ for k in _USER_SETTINGS)


def keep_freed_memory() -> bool:
  """Applies the policy above; True when glibc accepted all three settings."""
  libc = _glibc()
  return libc is not None and all(
      libc.mallopt(param, value) == 1 for param, value in
      ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
