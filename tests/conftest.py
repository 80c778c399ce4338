import os
import tempfile

import jax
import pytest

from dgia_jax.common import host_memory
from tests import helpers

# As every program does at its start (`cli.start`), before JAX starts its CPU threads: the
# tests' in-process training steps then reuse their temporary buffers' pages.
host_memory.retain_freed_memory()

# Before JAX starts its backend: the XLA flags of a one-device subprocess (`helpers.env`), so that a
# program compiled in-process and the same program compiled by a subprocess share one cache entry
# (the flags are part of the compilation cache's key).
os.environ["XLA_FLAGS"] = helpers.env(devices=1)["XLA_FLAGS"]

# JAX's persistent compilation cache, as every program keeps one (`cli.enable_compilation_cache`):
# the tests train the same tiny model many times, and a program compiled once is read back after
# (a tiny training's 32 s fall to 9 s). Shared by both test workers and their subprocesses (programs
# take $JAX_COMPILATION_CACHE_DIR as their default `--compilation_cache_dir`).
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "dgia_jax_tests_xla_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
# Every program kept, not only those compiled in over a second (JAX's default): a test process's many
# small programs (evaluation, banks, metrics) are read back too (a tiny training process 15.0 -> 13.7 s).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# Fixtures that train a run: every test using one is slow (`make test-fast` leaves it out).
SLOW_FIXTURES = {"trained", "tiny_run", "exported"}


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


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
def trained(tmp_path_factory, data_dir):
  """(config, workdir, results) of the tiny config trained for two epochs (every loss on in the second)."""
  from dgia_jax.training import train

  cfg = helpers.tiny_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("run"))
  return cfg, workdir, train.train_and_evaluate(cfg, workdir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> str:
  """The workdir of the tiny config trained for one epoch: what exports, evaluation and the service read."""
  from dgia_jax.training import train

  cfg = helpers.tiny_config(data_dir)
  cfg.train.epochs = 1
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train.train_and_evaluate(cfg, workdir)
  return workdir


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
  """The tiny run's test split exported twice, by the command line and by the function, in shards of 10 rows."""
  from dgia_jax.gallery import exports

  first, second = (str(tmp_path_factory.mktemp(name)) for name in ("emb_cli", "emb_api"))
  proc = helpers.run_module("dgia_jax.tools.export", "--workdir", tiny_run, "--split", "test", "--out", first,
                            "--shard_rows", "10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported 16 images and 32 captions of split 'test'" in proc.stdout
  exports.export_split(tiny_run, "test", second, shard_rows=10)
  return first, second
