"""Config files and the user's cache folder: what configs and the checkpoint loader need, with no
flag defined and nothing but the standard library imported (configs extend one another through it)."""

from __future__ import annotations

import importlib.util
import os


def user_cache_dir(name: str) -> str:
  """`$XDG_CACHE_HOME/dgia_jax/<name>`, else `~/.cache/dgia_jax/<name>`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dgia_jax", name)


def load_config_module(path: str):
  """A config file as a module (configs extend others through it)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str):
  """`get_config()` of a config file (an ml_collections.ConfigDict), as `--config` loads it."""
  return load_config_module(path).get_config()
