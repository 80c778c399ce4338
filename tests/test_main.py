"""The main job's command line: bad input gives a clear message, not a deep traceback."""

import os
import re
import subprocess
import sys

import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # trains or starts programs


def _main(*args, timeout=300):
  return helpers.run_module("dgia_jax.main", "--config", "configs/default.py", *args, timeout=timeout)


@pytest.mark.parametrize("args, says", [
    (["--config.train.no_such_key=3"], "unknown config key 'no_such_key' in --config.train.no_such_key=3"),
    (["--config.train.lr=1e-3", "--config.model.lr=1e-3"], "unknown config key 'lr' in --config.model.lr=1e-3"),
    (["--config.trainn.lr=3"], "unknown config key 'trainn' in --config.trainn.lr=3 (Did you mean \"train\" instead of "
                               "\"trainn\"?)"),
    (["--config.data.image_size[5]=3"], "cannot apply --config.data.image_size[5]=3 (IndexError: tuple index out of "
                                        "range)"),
    (["--flagfile=FLAGFILE"], "unknown config key 'lrr' in --config.train.lrr=1 (Did you mean \"lr\" instead of "
                              "\"lrr\"?)"),
    (["--config=configs/nope.py", "--config.train.lr=1e-3"], "--config configs/nope.py: no such file"),
    (["--config=RAISING"], "--config RAISING: 'nokey'"),  # its get_config raises a KeyError
])
def test_a_refused_override_or_config_is_named(tmp_path, args, says):
  """The first override the config cannot take (on the command line or in a flag file), or the
  config file itself, named in one line."""
  (tmp_path / "flags.txt").write_text("--config.train.lrr=1\n")
  (tmp_path / "raising.py").write_text("def get_config():\n  return {}['nokey']\n")
  files = {"FLAGFILE": str(tmp_path / "flags.txt"), "RAISING": str(tmp_path / "raising.py")}
  paths = lambda text: text.replace("FLAGFILE", files["FLAGFILE"]).replace("RAISING", files["RAISING"])  # noqa: E731
  proc = _main("--workdir", str(tmp_path / "run"), *map(paths, args))
  assert proc.returncode == 1 and proc.stderr.strip() == paths(f"error: {says}"), proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_bad_config_value_is_named(tmp_path):
  proc = _main("--workdir", str(tmp_path), "--config.train.epochs=abc")
  assert proc.returncode != 0
  assert proc.stderr.strip().startswith("error: flag --config.train.epochs=abc: invalid literal")


def test_missing_data_without_prepare_is_named(tmp_path):
  proc = _main("--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'absent'}",
               "--config.data.prepare=False")
  assert proc.returncode == 1
  assert re.fullmatch(rf"error: data set synthetic_persons/\S+/1\.0\.0 is not prepared under "
                      rf"{re.escape(str(tmp_path / 'absent'))}; run with --config\.data\.prepare=True", proc.stderr.strip()), \
      proc.stderr


_CACHE_PROBE = """
import sys
import jax, jax.numpy as jnp
from dgia_jax import cli

cli.parse_flags(sys.argv)
print("dir=" + cli.enable_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # keep even this tiny program
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))))
print("hits=%d" % sum(e.endswith("/cache_hits") for e in events))
print("misses=%d" % sum(e.endswith("/cache_misses") for e in events))
"""


def _cache_probe(*flags, **environ):
  proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE, *flags], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, **environ})
  assert proc.returncode == 0, proc.stderr
  return dict(line.split("=", 1) for line in proc.stdout.split())


def test_compilation_cache_is_reused_by_the_next_run(tmp_path):
  cache = tmp_path / "xla"
  first = _cache_probe(f"--compilation_cache_dir={cache}")
  assert first["dir"] == str(cache) and first["hits"] == "0" and int(first["misses"]) >= 1
  assert any(cache.iterdir())  # the compiled programs were written
  second = _cache_probe(f"--compilation_cache_dir={cache}")
  assert (second["hits"], second["misses"]) == (first["misses"], "0")  # every one read back, none recompiled


def test_compilation_cache_defaults_to_jaxs_own_variable(tmp_path):
  assert _cache_probe(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))["dir"] == str(tmp_path / "jax")


def test_compilation_cache_can_be_turned_off(tmp_path):
  assert _cache_probe("--compilation_cache_dir=") == {"dir": "", "hits": "0", "misses": "0"}


def test_a_log_file_gets_plain_progress_lines_not_redraws(tmp_path, data_dir):
  """`make train > log 2>&1`: no carriage returns, progress as periodic lines, every line short."""
  config = helpers.write_tiny_config(tmp_path / "tiny.py", data_dir, train__epochs=1)
  log = tmp_path / "log"
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "dgia_jax.main", "--config", config, "--workdir", str(tmp_path / "run")],
                          cwd=helpers.ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300, env=helpers.env())
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  assert "\r" not in text
  lines = text.splitlines()
  assert any(line.startswith("train: step 4/4 (100%) | loss ") and "ETA" in line for line in lines), lines
  assert any(line.startswith("epoch 1 test: t2i R1=") for line in lines)
  assert not any(line.startswith("encode ") for line in lines)  # short encodes leave no line
  assert max(map(len, lines)) < 600
