import os
import tempfile

import jax
import pytest

from dgia_jax import host_memory
from tests import helpers

# As every program does at its start (`cli.start`), before JAX starts its CPU threads: the
# tests' in-process training steps then reuse their temporary buffers' pages.
host_memory.retain_freed_memory()

# JAX's persistent compilation cache, as every program keeps one (`cli.enable_compilation_cache`):
# the tests train the same tiny model many times, and a program compiled once is read back after
# (a tiny training's 32 s fall to 9 s). Shared by both test workers and their subprocesses.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "dgia_jax_tests_xla_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A data dir holding the tiny synthetic set, prepared once per session."""
  from dgia_jax.data import datasets

  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.get_builder(helpers.tiny_config(path).data, prepare=True)
  return path


@pytest.fixture
def tiny_config(data_dir):
  return helpers.tiny_config(data_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> str:
  """The workdir of the tiny config trained for one epoch: what exports, evaluation and the service read."""
  from dgia_jax import train

  cfg = helpers.tiny_config(data_dir)
  cfg.train.epochs = 1
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train.train_and_evaluate(cfg, workdir)
  return workdir
