"""Helpers shared by tests: tiny configs, a config file of one, programs and Python in a fresh process, a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import ml_collections

from dgia_jax.common import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "default") -> ml_collections.ConfigDict:
  """`get_config()` of configs/<name>.py, as the main job loads it."""
  return config_files.load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
  """The default experiment shrunk to seconds: tiny data set and a one-layer model."""
  c = load_config("synthetic_scratch")
  c.data.data_dir = data_dir
  c.data.synthetic.num_ids = (16, 4, 8)
  c.data.synthetic.views_per_id = 2
  c.data.image_size = (32, 16)
  c.data.context_length = 32
  c.data.num_threads = 2
  c.model.embed_dim = 32
  c.model.vision.update(dict(patch_size=8, width=32, layers=1, heads=2))
  c.model.text.update(dict(width=32, layers=1, heads=2))
  c.relations.start_epoch = 1
  c.gsrc.start_epoch = 2  # so a two-epoch run exercises every loss
  c.iasc.pad = 2
  c.train.batch_size = 16
  c.train.epochs = 2
  c.train.log_every = 1
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 2
  return c


def records(workdir: str, kind: str, split: str | None = None) -> list[dict]:
  """The `kind` records of a run's metrics.jsonl (of evaluator `split` only, if given)."""
  from dgia_jax.run import rundir

  return [r for r in rundir.RunDir(workdir).records(kind) if split in (None, r.get("split"))]


# XLA's CPU backend without LLVM's optimisation passes: the tests' tiny programs compile in about half
# the time (a tiny two-epoch training 36 s -> 20 s, the same figures) and run no slower that matters.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a fresh process: this checkout importable, `devices` fake CPU devices."""
  return {**os.environ, "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1", **extra}


def run_module(module: str, *args: str, devices: int = 1, timeout: float = 300, background: bool = False, **kwargs):
  """`python -m module args` in a fresh process from the repository root (a program as a user runs it).
  Returns its CompletedProcess (text output captured), or with `background` the running Popen
  (output merged into its stdout). `kwargs` go to subprocess (e.g. `preexec_fn`, `env`)."""
  cmd = [sys.executable, "-m", module, *args]
  kwargs.setdefault("env", env(devices))
  if background:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def run_python(code: str, *, devices: int = 1, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices; raises with its output on failure."""
  proc = subprocess.run([sys.executable, "-c", code], env=env(devices), cwd=cwd or ROOT, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
  return proc


def free_port() -> int:
  """A TCP port of 127.0.0.1 free when asked."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_TINY_CONFIG_FILE = """
from tests import helpers

def get_config():
  c = helpers.tiny_config({data_dir!r})
  for key, value in {overrides!r}.items():
    *parents, name = key.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    node[name] = value
  return c
"""


def write_tiny_config(path, data_dir: str, **overrides) -> str:
  """A config file at `path` (for a program in a fresh process) of `tiny_config(data_dir)` with
  `overrides` ({"train__epochs": 3} sets train.epochs); returns its path."""
  overrides = {key.replace("__", "."): value for key, value in overrides.items()}
  with open(path, "w") as f:
    f.write(_TINY_CONFIG_FILE.format(data_dir=data_dir, overrides=overrides))
  return str(path)


TRAINING_PACKAGES = ("dgia_jax.training", "dgia_jax.method")  # what the inference path may never load

_RUN_AND_LIST_TRAINING_MODULES = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code or 0
else:
  code = 0
print("EXIT", code)
print("LOADED", sorted(m for m in sys.modules if m.startswith({packages!r})))
"""


def run_listing_training_modules(module: str, *args: str) -> tuple[str, list[str]]:
  """Runs `python -m module args` in a fresh process; (its output, the training modules it loaded)."""
  code = _RUN_AND_LIST_TRAINING_MODULES.format(packages=TRAINING_PACKAGES)
  proc = subprocess.run([sys.executable, "-c", code, module, *args], cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=300)
  loaded = proc.stdout.rsplit("LOADED", 1)[1].strip()
  return proc.stdout + proc.stderr, eval(loaded)  # a list literal of module names
