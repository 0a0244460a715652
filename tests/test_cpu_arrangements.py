"""The CPU arrangements of the DiT's math (docs/method.md §3.2 "Order of operations") and the host
memory policy (didi_jax.hostmem): same values as the literal formulas, pinned by value."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import didi_jax
from didi_jax import hostmem
from didi_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(seed, shape=(2, 16, 3, 8)):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return [2.0 * jax.random.normal(k, shape, jnp.float32) for k in ks]


@pytest.mark.parametrize('halving', [False, True])
@pytest.mark.parametrize('head_dim', [8, 64])
def test_cpu_attention_values_and_gradients_are_the_librarys(head_dim, halving):
  """Scaled-q, normalise-after-the-product attention = softmax(q kᵀ/√Dh) v: values and its
  written-out gradient (custom VJP) against `jax.nn.dot_product_attention` (XLA math, autodiff),
  with the row max by `jnp.max` and by halving."""
  q, k, v, w = _qkv(head_dim, (2, 16, 3, head_dim))

  def loss(fn):
    return lambda q, k, v: jnp.sum(w * fn(q, k, v))

  def attention(q, k, v):
    with dit.row_max_by_halving(halving):
      return dit.cpu_attention(q, k, v)
  ours = jax.jit(attention)(q, k, v)
  ref = jax.nn.dot_product_attention(q, k, v, implementation='xla')
  np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
  # An independent NumPy float64 softmax attention, too.
  qn, kn, vn = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
  s = qn @ kn.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(ours, (p @ vn).transpose(0, 2, 1, 3), rtol=2e-5, atol=2e-6)
  g_ours = jax.jit(jax.grad(loss(attention), (0, 1, 2)))(q, k, v)
  g_ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation='xla')),
                   (0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_cpu_attention_row_max_modes_agree_bitwise_and_bf16_gradients():
  """The row max by halving and by `jnp.max` are the same number, so values and gradients are
  bit-identical; bfloat16 inputs get gradients in bfloat16 close to float32 autodiff's."""
  q, k, v, w = _qkv(3, (2, 64, 2, 16))      # L = 64: the halving takes one step

  def elementwise_max(halving):
    def attention(q, k, v):
      with dit.row_max_by_halving(halving):
        return dit.cpu_attention(q, k, v)
    return re.search(r'(?<![\w])max\b', str(jax.make_jaxpr(attention)(q, k, v))) is not None
  # The switch is honoured: elementwise maxima of halves only inside row_max_by_halving().
  assert elementwise_max(True) and not elementwise_max(False)

  def grads(halving, dtype):
    def loss(q, k, v):
      with dit.row_max_by_halving(halving):
        out = dit.cpu_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))
      return jnp.sum(w * out.astype(jnp.float32)), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, g
  out_a, g_a = grads(False, jnp.float32)
  out_b, g_b = grads(True, jnp.float32)
  np.testing.assert_array_equal(out_a, out_b)
  for a, b in zip(g_a, g_b):
    np.testing.assert_array_equal(a, b)
  out16, g16 = grads(False, jnp.bfloat16)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out_a,
                             atol=0.03 * float(np.max(np.abs(out_a))))
  g_ref = jax.grad(lambda q, k, v: jnp.sum(w * jax.nn.dot_product_attention(
      q, k, v, implementation='xla')), (0, 1, 2))(q, k, v)
  for a, b in zip(g16, g_ref):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.03 * scale)


@pytest.mark.parametrize('n', [7, 32, 256, 300, 1024])
def test_row_max_is_the_max(n):
  """Halving maxima + a short reduction = jnp.max over the last axis, exactly (NaN, ±inf too)."""
  x = np.array(jax.random.normal(jax.random.PRNGKey(n), (3, 4, n)) * 10)
  x[0, 1, n // 3] = np.nan
  x[1, 2, :] = -np.inf
  x[2, 0, n - 1] = 1e30                        # the maximum in the last lane
  x[2, 1, 0] = np.inf
  got = np.asarray(jax.jit(dit.row_max)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.max(x, axis=-1, keepdims=True))


def test_folded_layernorm_modulation_is_the_literal_order():
  """x̂·(w(1+scale)) + shift = (LN(x)·w)(1+scale) + shift, against NumPy float64."""
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  x = 3.0 * jax.random.normal(ks[0], (2, 5, 16)) + 1.0
  shift = jax.random.normal(ks[1], (2, 1, 16))
  scale = jax.random.normal(ks[2], (2, 1, 16))
  norm = dit.LayerNormNoBias(16)
  norm.weight[...] = 1.0 + jax.random.normal(ks[3], (16,))
  got = norm.modulated(x, shift, scale)
  xn = np.asarray(x, np.float64)
  xhat = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  want = (xhat * np.asarray(norm.weight[...], np.float64)) * (1 + np.asarray(scale)) + \
      np.asarray(shift)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm(x), xhat * np.asarray(norm.weight[...]), rtol=1e-5, atol=1e-5)


def test_rotary_per_half_is_bit_identical_to_rotate_half():
  """Per-half rotary = x·cos + rotate_half(x)·sin: bit-identical to the literal jnp form under
  the same compiler, and equal to NumPy's up to XLA's fused multiply-adds."""
  def literal(x, cos, sin):
    rot = jnp.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    return x * cos[None, :, None] + rot * sin[None, :, None]
  x = _qkv(5, (2, 12, 3, 8))[0]
  cos, sin = dit.rotary_tables(12, 8)
  got = jax.jit(dit.apply_rotary)(x, cos, sin)
  np.testing.assert_array_equal(got, jax.jit(literal)(x, cos, sin))
  xn, cn, sn = (np.asarray(a, np.float64) for a in (x, cos, sin))
  np.testing.assert_allclose(got, literal(xn, cn, sn), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_cpu_dropout_mask_is_bernoulli_from_rng_bit_generator(rate):
  """On a CPU the keep mask is XLA's RngBitGenerator (threefry) bits below round((1−rate)·2³²),
  state = 4 words from the key: exactly that, deterministic in the key, Bernoulli(1 − rate)."""
  shape = (64, 128, 128)                          # 2^20 elements
  key = jax.random.PRNGKey(11)
  mask = np.asarray(jax.jit(lambda k: dit.dropout_keep_mask(k, shape, rate))(key))
  state = jax.random.bits(key, (4,), jnp.uint32)
  _, bits = jax.lax.rng_bit_generator(state, shape, dtype=jnp.uint32,
                                      algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
  threshold = int(round((1.0 - rate) * 2 ** 32))
  np.testing.assert_array_equal(mask, np.asarray(bits) < threshold)
  n = mask.size
  sd = np.sqrt(rate * (1 - rate) / n)
  assert abs(mask.mean() - (1.0 - rate)) < 5 * sd
  flat = mask.reshape(-1).astype(np.float64)
  corr = np.corrcoef(flat[:-1], flat[1:])[0, 1]  # neighbours independent
  assert abs(corr) < 5 / np.sqrt(n)
  again = np.asarray(jax.jit(lambda k: dit.dropout_keep_mask(k, shape, rate))(key))
  other = np.asarray(jax.jit(lambda k: dit.dropout_keep_mask(k, shape, rate))(
      jax.random.PRNGKey(12)))
  np.testing.assert_array_equal(mask, again)
  assert 0.5 * (1 - rate) * rate * n < np.sum(mask != other)   # ~2 r (1−r) n differ
  # dropout itself: kept values scaled by exactly 1/(1 − rate), dropped ones 0.
  x = jnp.full((4, 8, 32), 3.0)
  y = np.asarray(dit.dropout(x, rate, key))
  keep = np.asarray(dit.dropout_keep_mask(key, x.shape, rate))
  np.testing.assert_array_equal(y, np.where(keep, np.float32(3.0) / np.float32(1 - rate), 0))


def test_cpu_only_reads_jax_platforms():
  assert didi_jax.cpu_only({'JAX_PLATFORMS': 'cpu'})
  assert not didi_jax.cpu_only({'JAX_PLATFORMS': 'cuda,cpu'})
  assert not didi_jax.cpu_only({'JAX_PLATFORMS': 'tpu'})


def test_host_memory_policy_respects_the_user():
  assert hostmem.wanted({})
  assert not hostmem.wanted({'DIDI_JAX_MALLOC': 'system'})
  assert not hostmem.wanted({'MALLOC_ARENA_MAX': '4'})
  assert not hostmem.wanted({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})


def _cpu_only_env(extra: dict) -> dict:
  """A fresh CPU-only Python's environment with this checkout importable: the allocator settings
  of this one (malloc's, DIDI_JAX_MALLOC, a preloaded library and its mark) removed, `extra` added."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  for k in (*hostmem._USER_SETTINGS, hostmem.OPT_OUT, 'LD_PRELOAD', hostmem.REEXECUTED):
    env.pop(k, None)
  env.update(extra)
  return env


def _cpu_only_run(script: str, extra: dict) -> str:
  """stdout of `script` in a fresh CPU-only Python (`_cpu_only_env(extra)`)."""
  return subprocess.run([sys.executable, '-c', script], env=_cpu_only_env(extra),
                        capture_output=True, text=True, check=True, timeout=120).stdout


_FAULTS = textwrap.dedent('''
    import ctypes, resource, threading
    import didi_jax
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n, out = 100 * 2 ** 20, {}
    def work():                        # malloc + touch + free, as XLA's temporary buffer
      p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
      f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
      p = libc.malloc(n); ctypes.memset(p, 1, n)         # the same size again
      out['faults'] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0
      libc.free(p)
    t = threading.Thread(target=work); t.start(); t.join()   # a worker thread, as XLA's
    print(out['faults'])
    ''')


@pytest.mark.skipif(hostmem._glibc() is None, reason='glibc malloc only (Linux)')
def test_freed_host_memory_is_reused_without_page_faults():
  """In a worker thread, a 100 MiB buffer freed and allocated again: with the policy (the package
  applies it on a CPU-only import) the second allocation reuses the heap (no page faults);
  DIDI_JAX_MALLOC=system leaves glibc's default, which maps it afresh (25,600 pages)."""
  def faults(extra):
    return int(_cpu_only_run(_FAULTS, extra).strip().splitlines()[-1])
  assert faults({}) < 1000
  assert faults({'DIDI_JAX_MALLOC': 'system'}) > 20000


_HUGE = textwrap.dedent('''
    import ctypes
    import didi_jax
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    n = 64 * 2 ** 20
    p = libc.malloc(n); ctypes.memset(p, 1, n)            # as XLA's buffers, after the import
    advised, size = 0, 0
    for line in open('/proc/self/smaps'):
      head = line.split()
      if '-' in head[0] and len(head) >= 5:               # a mapping's first line: its range
        lo, hi = (int(x, 16) for x in head[0].split('-')); size = hi - lo
      elif head[0] == 'VmFlags:' and 'hg' in head[1:]:    # madvise(MADV_HUGEPAGE) on it
        advised += size
    huge = [int(l.split()[1]) * 1024 for l in open('/proc/self/smaps_rollup')
            if l.startswith('AnonHugePages:')][0]
    print(advised, huge)
    ''')


@pytest.mark.skipif(hostmem._glibc() is None or not hostmem.thp_available(),
                    reason='glibc malloc and a kernel with transparent huge pages only (Linux)')
def test_the_heap_is_advised_for_huge_pages_and_gets_them():
  """A CPU-only import marks 1.75 GiB of the heap MADV_HUGEPAGE (the VmFlags 'hg' of
  /proc/self/smaps), and 64 MiB malloc'ed and touched afterwards lie in 2 MiB pages;
  DIDI_JAX_MALLOC=nohuge keeps the malloc policy without it, =system leaves both out."""
  def measure(extra):
    return [int(x) for x in _cpu_only_run(_HUGE, extra).split()[-2:]]
  advised, huge = measure({})
  assert hostmem.HUGE_RESERVE - 2 * hostmem.HUGE_PAGE <= advised <= hostmem.HUGE_RESERVE
  assert huge >= 32 * 2 ** 20          # at least half of the 64 MiB (the kernel may lack pages)
  for opt in ('nohuge', 'system'):
    assert measure({'DIDI_JAX_MALLOC': opt})[0] == 0
  assert hostmem.huge_pages_wanted({}) and not hostmem.huge_pages_wanted(
      {'DIDI_JAX_MALLOC': 'nohuge'})


def test_entry_points_are_recognised_while_python_imports_their_package():
  """`python [flags] -m MODULE` while Python imports MODULE's package (sys.argv[0] is then '-m'),
  and the console script; nothing else (a library import, pytest, a script of the user's)."""
  ep = hostmem.entry_point
  assert ep(['-m'], ['python', '-m', 'didi_jax.main', '--config=c.py']) == 'didi_jax.main'
  assert ep(['-m'], ['python3', '-X', 'importtime', '-m', 'didi_jax.bench', 'x']) == \
      'didi_jax.bench'
  assert ep(['-m'], ['python', '-mdidi_jax.generate']) == 'didi_jax.generate'
  assert ep(['-m'], ['python', '-m', 'pytest', '-q']) is None
  assert ep(['-m'], ['python', '-m', 'didi_jax.models.dit']) is None
  assert ep(['/venv/bin/didi-jax', 'run'], ['python', '/venv/bin/didi-jax', 'run']) == 'didi-jax'
  assert ep(['/src/didi_jax/main.py'], ['python', '-m', 'didi_jax.main']) is None  # lookup done
  assert ep(['-c'], ['python', '-c', 'import didi_jax']) is None
  assert ep(['train.py'], ['python', 'train.py']) is None


def test_tcmalloc_command_runs_the_same_command_again_with_it_preloaded(tmp_path):
  """The same interpreter, flags and arguments; tcmalloc put before what LD_PRELOAD held; marked,
  so the new process never does it again; nothing where opted out, an allocator is preloaded
  already, the process is no entry point, or no tcmalloc is installed."""
  lib = tmp_path / 'libtcmalloc_minimal.so.4'
  lib.write_bytes(b'')
  dirs = (str(tmp_path / 'absent'), str(tmp_path))
  argv, orig = ['-m'], ['/usr/bin/python3', '-X', 'dev', '-m', 'didi_jax.main', '--workdir=w']
  environ = {'LD_PRELOAD': '/opt/libfoo.so', 'PATH': '/bin'}
  exe, args, env = hostmem.tcmalloc_command(argv, orig, environ, '/venv/bin/python', dirs)
  assert (exe, args) == ('/venv/bin/python',
                         ['/venv/bin/python', '-X', 'dev', '-m', 'didi_jax.main', '--workdir=w'])
  assert env['LD_PRELOAD'] == f'{lib}:/opt/libfoo.so' and env['PATH'] == '/bin'
  assert env[hostmem.REEXECUTED] == str(lib) and environ == {'LD_PRELOAD': '/opt/libfoo.so',
                                                              'PATH': '/bin'}
  assert hostmem.tcmalloc_command(argv, orig, {}, 'py', dirs)[2]['LD_PRELOAD'] == str(lib)
  assert hostmem.tcmalloc_command(argv, orig, env, exe, dirs) is None          # never twice
  for choice in ('glibc', 'nohuge', 'system', ' GLIBC '):
    assert hostmem.tcmalloc_command(argv, orig, {'DIDI_JAX_MALLOC': choice}, exe, dirs) is None
  for other in ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', '/opt/libmimalloc.so'):
    assert hostmem.tcmalloc_command(argv, orig, {'LD_PRELOAD': other}, exe, dirs) is None
    assert not hostmem.wanted({'LD_PRELOAD': other})    # nor glibc's settings under it
  assert hostmem.tcmalloc_command(['-c'], ['python', '-c', 'x'], {}, exe, dirs) is None
  assert hostmem.tcmalloc_command(argv, orig, {}, exe, (str(tmp_path / 'absent'),)) is None


def test_reexec_only_on_linux_and_goes_on_where_the_exec_fails(monkeypatch):
  """The exec is made with tcmalloc_command's triple on Linux; never elsewhere; an exec that fails
  (OSError) leaves the process running as it is."""
  lib = '/opt/libtcmalloc_minimal.so.4'
  monkeypatch.setattr(hostmem, 'find_tcmalloc', lambda dirs=None: lib)
  monkeypatch.setattr(sys, 'argv', ['-m'])
  monkeypatch.setattr(sys, 'orig_argv', ['python', '-m', 'didi_jax.main', '--x'], raising=False)
  for k in ('LD_PRELOAD', hostmem.REEXECUTED, hostmem.OPT_OUT):
    monkeypatch.delenv(k, raising=False)
  calls = []

  def execve(exe, args, env):
    calls.append((exe, args, env['LD_PRELOAD']))
    raise OSError('exec failed')
  monkeypatch.setattr(sys, 'platform', 'linux')
  hostmem.reexec_under_tcmalloc(execve)           # returns: the exec failed
  assert calls == [(sys.executable, [sys.executable, '-m', 'didi_jax.main', '--x'], lib)]
  monkeypatch.setattr(sys, 'platform', 'darwin')
  hostmem.reexec_under_tcmalloc(execve)
  assert len(calls) == 1


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD and /proc: Linux')
def test_an_entry_point_runs_itself_again_under_tcmalloc_where_it_is_installed():
  """`python -m didi_jax.allocator ARGS` (an entry point) in a fresh CPU-only process: where
  tcmalloc is installed (CI installs it) the same process (pid) runs again with it mapped and the
  same arguments; DIDI_JAX_MALLOC=glibc keeps glibc, as does a machine without tcmalloc."""
  def run(extra):
    proc = subprocess.Popen([sys.executable, '-m', 'didi_jax.allocator', 'a b', '-x'],
                            env=_cpu_only_env(extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report['pid'] == proc.pid and report['argv'] == ['a b', '-x']
    return report
  tcmalloc = hostmem.find_tcmalloc()
  if tcmalloc is None and os.environ.get('CI') and os.uname().machine == 'x86_64':
    pytest.fail('tcmalloc is not installed: .ci/run installs it (apt-get install '
                'libtcmalloc-minimal4)')
  report = run({})
  assert report['mapped'] == (tcmalloc and os.path.realpath(tcmalloc))
  assert report['allocator'] == ('tcmalloc (LD_PRELOAD)' if tcmalloc else
                                 'glibc malloc, freed memory kept')
  glibc = run({'DIDI_JAX_MALLOC': 'glibc'})
  assert glibc['mapped'] is None and glibc['allocator'] == 'glibc malloc, freed memory kept'


def test_split_qkv_values_and_written_out_gradient_are_autodiffs():
  """`split_qkv` (rotary q and k, plain v) and its written-out VJP (one stack, the transposed
  rotation; cos/sin cotangents) against autodiff of the literal slices: with random tables whose
  halves differ, so nothing relies on the rotary tables' repeated halves."""
  ks = jax.random.split(jax.random.PRNGKey(5), 5)
  qkv = jax.random.normal(ks[0], (2, 12, 3, 3, 8))
  cos, sin = (jax.random.normal(k, (12, 8)) for k in ks[1:3])
  w = jax.random.normal(ks[3], (3, 2, 12, 3, 8))

  def literal(qkv, cos, sin):
    return (dit.apply_rotary(qkv[:, :, 0], cos, sin), dit.apply_rotary(qkv[:, :, 1], cos, sin),
            qkv[:, :, 2])

  def loss(fn):
    return lambda *a: sum(jnp.sum(wi * o) for wi, o in zip(w, fn(*a)))
  for a, b in zip(jax.jit(dit.split_qkv)(qkv, cos, sin), jax.jit(literal)(qkv, cos, sin)):
    np.testing.assert_array_equal(a, b)       # the same forward, under the same compiler
  got = jax.jit(jax.grad(loss(dit.split_qkv), (0, 1, 2)))(qkv, cos, sin)
  want = jax.grad(loss(literal), (0, 1, 2))(qkv, cos, sin)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_library_threaded_is_the_identity_and_never_hides_a_nan():
  """max(row min, x) = x bit for bit in rows without a NaN (±0, ±inf included); a NaN stays."""
  x = np.array(jax.random.normal(jax.random.PRNGKey(0), (6, 48)) * 10, np.float32)
  x[0, 3] = np.nan
  x[1, :] = np.nan
  x[2, 1], x[2, 5] = np.inf, -np.inf
  x[3, :] = -0.0
  x[3, 7] = 0.0
  x[4, :] = np.inf
  got = np.asarray(jax.jit(dit.library_threaded)(jnp.asarray(x)))
  np.testing.assert_array_equal(got[2:], x[2:])
  np.testing.assert_array_equal(np.signbit(got[2:]), np.signbit(x[2:]))
  assert np.isnan(got[np.isnan(x)]).all()


def test_cpu_attention_gradient_with_library_threaded_is_bitwise_without_it(monkeypatch):
  """The arrangement changes the program, not a bit of the result: values and gradients at the
  preset's shapes (L = 256, 4 heads of 48) equal those with `library_threaded` the identity, NaN
  positions included (where XLA's library fuses it, its maximum must keep x's NaN). It sits on
  the four products of the differentiated attention and none of the primal's."""
  q, k, v, w = _qkv(5, (2, 256, 4, 48))
  v = v.at[1, 17, 2, 5].set(jnp.nan)           # one NaN: head 2 of row 1 turns NaN in column 5

  def run():
    def loss(q, k, v):
      out = dit.cpu_attention(q, k, v)
      return jnp.sum(jnp.where(jnp.isnan(out), 0.0, w * out)), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(a) for a in (out,) + g]
  got = run()
  mins = lambda f: str(jax.make_jaxpr(f)(q, k, v)).count('reduce_min')  # noqa: E731
  assert mins(lambda q, k, v: jax.vjp(dit.cpu_attention, q, k, v)[1](w)) == 4
  assert mins(dit.cpu_attention) == 0
  monkeypatch.setattr(dit, 'library_threaded', lambda x: x)
  want = run()
  assert mins(lambda q, k, v: jax.vjp(dit.cpu_attention, q, k, v)[1](w)) == 0
  assert [bool(np.isnan(b).any()) for b in want] == [True, True, True, False]   # out, ∂q, ∂k, ∂v
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_sampler_programs_pick_the_library_or_eigen_by_tokens_per_device():
  """The forward-only sampler programs compile with YNNPACK's individual products below
  `CPU_EIGEN_TOKENS` tokens per device and forward, with no library (every product in XLA's Eigen
  runtime) from there on (BENCHMARKS.md); the draws are the same either way."""
  # pylint: disable=import-outside-toplevel
  from didi_jax import bench
  from didi_jax import config as config_lib
  from didi_jax import models
  from didi_jax.checkpoint import loader
  from didi_jax.sampling import runner
  vocab, length = 258, 32
  cfg = config_lib.model_config('tiny', vocab_size=vocab, length=length)
  cfg.compute_dtype = 'float32'
  params = bench._random_teacher_params(cfg)  # pylint: disable=protected-access
  den = loader.Network('student_ema', cfg, models.split_abstract(cfg)[0], params)
  scfg = config_lib.base_config().sampler
  with scfg.unlocked():
    scfg.steps = 4
  n_dev = jax.device_count()
  assert runner.forward_compiler_options(runner.CPU_EIGEN_TOKENS) == runner.CPU_EIGEN_OPTIONS
  assert runner.forward_compiler_options(runner.CPU_EIGEN_TOKENS - 1) == runner.CPU_FORWARD_OPTIONS
  # the smallest batch at the threshold (per device, the batch spread over all devices), and half
  big = -(-runner.CPU_EIGEN_TOKENS * n_dev // length)
  lowered = {}
  for batch, library in ((big // 2, True), (big, False)):
    fn = runner.make_sample_fn(scfg, den, None, batch_size=batch, length=length,
                               mask_id=vocab - 1)
    args = (params, None, jax.random.PRNGKey(3), np.full((batch, length), vocab - 1, np.int32))
    lowered[library] = (fn.lower(*args), args)
    assert ('__ynn_fusion' in lowered[library][0].compile().as_text()) == library, (batch, library)
  # The same program (the small batch) under both option sets: the same draws.
  lowered, args = lowered[True]
  eigen = lowered.compile(compiler_options=runner.CPU_EIGEN_OPTIONS)
  assert '__ynn_fusion' not in eigen.as_text()
  ids_library, ids_eigen = np.asarray(lowered.compile()(*args)[0]), np.asarray(eigen(*args)[0])
  assert (ids_library != vocab - 1).all()
  assert (ids_library == ids_eigen).mean() > 0.999
