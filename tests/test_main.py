"""The main job's command line: bad input gives a clear message, not a deep traceback."""

import subprocess
import sys

from tests import helpers


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "dgia_jax.main", "--config", "configs/default.py", *args],
                        cwd=helpers.ROOT, capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_is_named(tmp_path):
  proc = _main("--workdir", str(tmp_path), "--config.train.no_such_key=3")
  assert proc.returncode != 0
  assert proc.stderr.strip() == "error: unknown config key 'no_such_key' in --config.train.no_such_key=3"


def test_bad_config_value_is_named(tmp_path):
  proc = _main("--workdir", str(tmp_path), "--config.train.epochs=abc")
  assert proc.returncode != 0
  assert proc.stderr.strip().startswith("error: flag --config.train.epochs=abc: invalid literal")


def test_missing_data_without_prepare_is_named(tmp_path):
  proc = _main("--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'absent'}",
               "--config.data.prepare=False")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "FileNotFoundError" in last and "is not prepared under" in last and "absent" in last
