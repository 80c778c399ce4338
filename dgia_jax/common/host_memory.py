"""Keep freed host memory in the process heap (glibc), so XLA CPU steps stop page-faulting.

XLA's CPU runtime allocates one temporary buffer per execution of a jitted function (398 MB
for the small model's train step, several GB at ViT-B/16 sizes) and frees it when the step
ends. glibc serves an allocation that large with a fresh `mmap` and returns it with
`munmap`, so every step faults all of it in again, page by page: ~97,000 minor faults per
small step, 30 % of the process's CPU time in the kernel (docs/BENCHMARKS.md §1).

`retain_freed_memory` tells glibc to serve every allocation from one heap (one arena, no
`mmap`) and never to trim it, so the next step reuses the pages the last one touched. The
price is that the process keeps its peak heap size until it exits, which a training or
evaluation process does anyway. It must run before JAX starts its CPU threads (that is,
before the first computation): every program calls it first (`cli.start`), as do the
benchmarks and the test suite (`tests/conftest.py`); importing the package changes nothing. Set
`DGIA_JAX_RETAIN_FREED_MEMORY=0` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_SWITCH = "DGIA_JAX_RETAIN_FREED_MEMORY"

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
  """Configures glibc malloc as above; returns whether it did (False off glibc or when switched off)."""
  if os.environ.get(ENV_SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  # One arena: a thread arena cannot grow past 64 MB and falls back to mmap for anything
  # larger, whatever M_MMAP_MAX says. -1 is SIZE_MAX as glibc reads it: never trim the heap.
  return all(libc.mallopt(param, value) == 1
             for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
