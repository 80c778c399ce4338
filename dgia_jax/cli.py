"""Command-line plumbing shared by the entry points."""

import importlib.util
import os
import sys

import ml_collections
from absl import flags


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config` loads it."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad `--config.*` override in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' way of saying "no such key"
    key = str(e).strip("\"'")
    culprit = next((a for a in argv[1:] if a.startswith("--config.") and key.split("'")[0] in a), "a --config flag")
    sys.exit(f"error: unknown config key {key!r} in {culprit}")
  except flags.Error as e:
    sys.exit(f"error: {e}")
