"""Helpers shared by tests: tiny configs and running Python in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections

from dgia_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "default") -> ml_collections.ConfigDict:
  """`get_config()` of configs/<name>.py, as the main job loads it."""
  return cli.load_config(os.path.join(ROOT, "configs", f"{name}.py"))


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


def run_python(code: str, *, devices: int = 1, timeout: float = 600, env: dict | None = None,
               cwd: str | None = None) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices; raises with its output on failure."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=cwd or ROOT, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
  return proc
