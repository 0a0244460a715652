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

`reexec_under_tcmalloc()`: glibc's one arena pays for that reuse in fragmentation. XLA's CPU
library allocates ~10,000 scratch buffers of 64 KB-1 MB per distillation iteration from the worker
threads; among the ~70,000 free chunks the one arena holds after compiling, every such malloc walks
glibc's size-sorted bins (`_int_malloc`: 8-9% of the process's CPU samples). More arenas make
those mallocs cheap but send the 1 GB temporary buffer, too large for a thread's arena, to a fresh
mmap and munmap every call (glibc maps it whatever M_MMAP_MAX says: 256,000 page faults per
iteration). gperftools' tcmalloc does both well, and it can only be chosen when the process
starts. So the command-line entry points (`python -m didi_jax.main` and the other `-m` modules in
`ENTRY_POINTS`, and the `didi-jax` script), on a CPU-only machine where tcmalloc is installed
(Debian/Ubuntu: `libtcmalloc-minimal4`), execute themselves again at once, before JAX is imported,
with it in LD_PRELOAD: the same interpreter, flags, arguments and process id. The demo preset's
distillation iteration 0.70 -> 0.62 s (BENCHMARKS.md). Nothing else changes (values, programs);
`DIDI_JAX_MALLOC=glibc` keeps glibc with the settings above, `=system` leaves everything as it is,
and a library the user preloads (tcmalloc, jemalloc, mimalloc) is kept as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from typing import Optional

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
# tcmalloc: where Debian, Ubuntu, Fedora and source builds put it; the minimal build (no heap
# profiler) first. Entry points: the modules users run with `python -m`, and the console script.
TCMALLOC_NAMES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
LIBRARY_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                '/usr/lib', '/usr/local/lib')
ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')    # a preloaded one of these is the user's choice
ENTRY_POINTS = ('didi_jax.main', 'didi_jax.bench', 'didi_jax.generate', 'didi_jax.ablation',
                'didi_jax.compare', 'didi_jax.samples', 'didi_jax.allocator')
CONSOLE_SCRIPTS = ('didi-jax',)
REEXECUTED = 'DIDI_JAX_REEXECUTED'   # set in the process started under tcmalloc: never twice
# tcmalloc reports every allocation above 1 GiB on stderr; the larger programs' buffers are.
_TCMALLOC_QUIET = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(2 ** 62)}


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


def _choice(environ) -> str:
  return environ.get(OPT_OUT, '').strip().lower()


def preloaded_allocator(environ=None) -> Optional[str]:
  """The allocator library LD_PRELOAD names (tcmalloc, jemalloc, mimalloc), else None."""
  environ = os.environ if environ is None else environ
  for entry in environ.get('LD_PRELOAD', '').replace(':', ' ').split():
    name = os.path.basename(entry)
    for allocator in ALLOCATORS:
      if allocator in name:
        return allocator
  return None


def wanted(environ=None) -> bool:
  """Whether `keep_freed_memory` should run here: glibc allocates (no allocator preloaded), not
  opted out, no malloc setting of the user."""
  environ = os.environ if environ is None else environ
  if _choice(environ) == 'system' or preloaded_allocator(environ):
    return False
  return not any(k in environ for k in _USER_SETTINGS)


def find_tcmalloc(dirs=LIBRARY_DIRS) -> Optional[str]:
  """The path of an installed tcmalloc (`TCMALLOC_NAMES` in `dirs`), else None."""
  for name in TCMALLOC_NAMES:
    for d in dirs:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def entry_point(argv, orig_argv) -> Optional[str]:
  """The entry point this interpreter is starting, else None: the module of `python [flags] -m
  MODULE` while Python imports its package (argv[0] is then '-m'), or the `didi-jax` script."""
  if argv and argv[0] == '-m':
    for i, arg in enumerate(orig_argv[1:], 1):
      if arg == '-m' and i + 1 < len(orig_argv):
        module = orig_argv[i + 1]
      elif arg.startswith('-m') and len(arg) > 2:
        module = arg[2:]
      else:
        continue
      return module if module in ENTRY_POINTS else None
    return None
  if argv and os.path.basename(argv[0]) in CONSOLE_SCRIPTS:
    return os.path.basename(argv[0])
  return None


def tcmalloc_command(argv, orig_argv, environ, executable: str, dirs=LIBRARY_DIRS):
  """(executable, argv, environment) that run this entry point again under tcmalloc, or None where
  it should run as it is: not an entry point, opted out (DIDI_JAX_MALLOC=glibc, nohuge or
  system), an allocator preloaded already, started that way before, or tcmalloc not installed."""
  if entry_point(argv, orig_argv) is None or _choice(environ) in ('glibc', 'nohuge', 'system'):
    return None
  if environ.get(REEXECUTED) or preloaded_allocator(environ):
    return None
  path = find_tcmalloc(dirs)
  if path is None:
    return None
  env = dict(environ)
  env['LD_PRELOAD'] = ':'.join(p for p in (path, environ.get('LD_PRELOAD', '')) if p)
  env[REEXECUTED] = path
  for k, v in _TCMALLOC_QUIET.items():
    env.setdefault(k, v)
  return executable, [executable, *orig_argv[1:]], env


def reexec_under_tcmalloc(execve=os.execve) -> None:
  """Runs this entry point again under tcmalloc (module docstring) where `tcmalloc_command` says
  so; does not return then. Where the exec fails, the process goes on with glibc. Linux only
  (LD_PRELOAD is the Linux loader's)."""
  if not sys.platform.startswith('linux'):
    return
  command = tcmalloc_command(sys.argv, getattr(sys, 'orig_argv', ()), os.environ,
                             sys.executable)
  if command is None:
    return
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    execve(*command)
  except OSError:
    return


def allocator(environ=None) -> str:
  """The allocator this process runs with, in words (for reports)."""
  environ = os.environ if environ is None else environ
  preloaded = preloaded_allocator(environ)
  if preloaded:
    return f'{preloaded} (LD_PRELOAD)'
  if _choice(environ) == 'system' or _glibc() is None:
    return 'system malloc'
  return 'glibc malloc' + (', freed memory kept' if wanted(environ) else '')


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


def mapped_allocator() -> Optional[str]:
  """The path of the allocator library (ALLOCATORS) mapped into this process, else None (Linux)."""
  try:
    with open('/proc/self/maps', encoding='ascii', errors='replace') as f:
      for line in f:
        path = line.split()[-1]
        if path.startswith('/') and any(a in os.path.basename(path) for a in ALLOCATORS):
          return path
  except OSError:
    pass
  return None


def main() -> None:
  """`python -m didi_jax.allocator`: the allocator this machine's CPU runs get, as one JSON line."""
  print(json.dumps({'allocator': allocator(), 'mapped': mapped_allocator(), 'pid': os.getpid(),
                    'argv': sys.argv[1:]}))
