"""python -m didi_jax.allocator: the host allocator this machine's CPU runs get, as one JSON line.

An entry point like `didi_jax.main`, so it starts the way they do (`didi_jax.hostmem`): under
tcmalloc where it is installed and nothing opts out, else glibc with the package's settings.
Prints {"allocator": ..., "mapped": the allocator library mapped into the process or null,
"pid": ..., "argv": [...]}.
"""
from didi_jax import hostmem

if __name__ == '__main__':
  hostmem.main()
