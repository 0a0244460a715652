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

`advise_huge_pages()` then marks the first 1.75 GiB the heap grows into for transparent huge
pages: it takes that much from malloc (the heap, mmap being off), `madvise(MADV_HUGEPAGE)` its
2 MiB-aligned interior and frees it again (below the trim threshold, so the heap keeps it). Nothing
is touched, so nothing is used until malloc hands the memory out; the kernel then backs it with
2 MiB pages instead of 4 KiB ones, and the programs' large arrays (the attention weights of the
distillation iteration, 34 MB per block) stream through 512x fewer TLB entries. The demo
preset's distillation iteration, 22 alternating pairs of processes: median 2.4% faster, and the
slowest run 0.807 -> 0.732 s (BENCHMARKS.md); the training step about the same. Where the
kernel has THP off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) it does nothing;
`DIDI_JAX_MALLOC=nohuge` keeps the malloc settings without it.
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
OPT_OUT = 'DIDI_JAX_MALLOC'           # =system: leave malloc as it is; =nohuge: no huge pages
MADV_HUGEPAGE = 14                    # linux/mman.h
HUGE_PAGE = 2 ** 21                   # x86-64 and arm64 (4 KiB base pages) PMD size
HUGE_RESERVE = 7 * 2 ** 28            # 1.75 GiB: below TRIM_THRESHOLD, so free() keeps it
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
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


def huge_pages_wanted(environ=None) -> bool:
  """Whether `advise_huge_pages` should follow `keep_freed_memory` (not DIDI_JAX_MALLOC=nohuge)."""
  environ = os.environ if environ is None else environ
  return environ.get(OPT_OUT, '').strip().lower() != 'nohuge'


def thp_available(path: str = THP_ENABLED) -> bool:
  """The kernel offers transparent huge pages to a region that asks (mode 'always' or 'madvise')."""
  try:
    with open(path, encoding='ascii') as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def advise_huge_pages(nbytes: int = HUGE_RESERVE) -> bool:
  """Marks `nbytes` of the heap for transparent huge pages (module docstring); True when done.

  Call after `keep_freed_memory()` succeeded: with mmap-served chunks on, the block would be a
  separate mapping that free() unmaps; above the trim threshold, free() would hand it back.
  """
  libc = _glibc()
  if libc is None or not thp_available() or nbytes >= TRIM_THRESHOLD:
    return False
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
  libc.madvise.restype = ctypes.c_int
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  p = libc.malloc(nbytes)
  if not p:
    return False
  start = -(-p // HUGE_PAGE) * HUGE_PAGE
  end = (p + nbytes) // HUGE_PAGE * HUGE_PAGE
  ok = end > start and libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
  libc.free(p)
  return ok
