import os
import platform
import subprocess
import sys

import pytest

from dgia_jax.common import host_memory
from tests import helpers

pytestmark = pytest.mark.slow  # starts programs

# Starts as every program does (`cli.start`), then allocates, touches and frees 64 MB twice with
# malloc (as XLA does its temporary buffers); prints the page faults of the second time.
_SECOND_ALLOCATION_FAULTS = """
import ctypes, ctypes.util, resource
from dgia_jax import cli
cli.parse_flags(["program", "--compilation_cache_dir="])
cli.start(["program"])
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touch_and_free():
  buffer = libc.malloc(1 << 26)
  ctypes.memset(buffer, 1, 1 << 26)
  libc.free(buffer)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_allocation_faults(switch: str) -> int:
  out = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION_FAULTS], env=helpers.env(**{host_memory.ENV_SWITCH: switch}),
                       check=True, capture_output=True, text=True).stdout
  return int(out.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc malloc")
def test_freed_memory_is_reused_without_page_faults():
  pages = (1 << 26) // os.sysconf("SC_PAGE_SIZE")
  assert _second_allocation_faults("1") < pages // 20  # the freed 64 MB is still mapped
  assert _second_allocation_faults("0") > pages // 2  # glibc's default: munmap, then fault it in again


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc malloc")
def test_importing_the_package_or_a_config_leaves_the_allocator_alone():
  """The setting belongs to program start, not to an import (of a config file, by a library user)."""
  code = _SECOND_ALLOCATION_FAULTS.replace(
      'cli.start(["program"])', 'from dgia_jax.common import config_files; config_files.load_config("configs/default.py")')
  assert 'config_files.load_config("configs/default.py")' in code
  out = subprocess.run([sys.executable, "-c", code], env=helpers.env(**{host_memory.ENV_SWITCH: "1"}), cwd=helpers.ROOT,
                       check=True, capture_output=True, text=True).stdout
  assert int(out.split()[-1]) > (1 << 26) // os.sysconf("SC_PAGE_SIZE") // 2
