"""Every program answers a user's error with one `error: ...` line and exit status 1, no traceback;
an internal error keeps its traceback."""

import json
import os
import subprocess
import sys

import pytest

from tests import benchmark_fixtures, helpers

pytestmark = pytest.mark.slow  # trains or starts programs


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  """Exit status 1, no traceback, and the message last: one `error: ...` line (a listing may follow it)."""
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
  assert len(starts) == 1, lines[-5:]
  assert all(not line.startswith(("W1", "E1", "I1")) for line in lines[starts[0]:]), "a log line after the error"
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr[-2000:])


@pytest.mark.parametrize("args, fragments", [
    (["--config", "configs/synthetic_scratch.py", "--config.train.batch_size=0"],
     ["error: train.batch_size=0 must be a whole number ≥ 1"]),
    (["--config", "configs/synthetic_scratch.py", "--config.gsrc.rows=everything"],
     ["error: gsrc.rows='everything' must be one of 'batch', 'batch+bank'"]),
    (["--config", "configs/synthetic_scratch.py", "--config.train.micro_batch=48"],
     ["error: train.micro_batch=48 must divide train.batch_size=64"]),
    (["--config", "configs/cuhk_pedes.py"], ["error: data set 'cuhk_pedes' needs data.tokenizer"]),
    (["--config", "configs/cuhk_pedes.py", "--config.data.tokenizer=/nonexistent/clip"],
     ["error: cuhk_pedes needs the folder of its original files: set data.manual_dir"]),
    (["--config", "configs/cuhk_pedes.py", "--config.data.tokenizer=/nonexistent/clip",
      "--config.data.manual_dir=/nonexistent/CUHK-PEDES"], ["error: manual_dir /nonexistent/CUHK-PEDES is not a folder"]),
])
def test_main_user_error(tmp_path, args, fragments):
  proc = helpers.run_module("dgia_jax.main", "--workdir", str(tmp_path / "run"), *args, f"--config.data.data_dir={tmp_path}")
  _assert_user_error(proc, *fragments)


def test_main_user_error_batch_larger_than_the_split(tmp_path, data_dir):
  config = helpers.write_tiny_config(tmp_path / "tiny.py", data_dir)
  proc = helpers.run_module("dgia_jax.main", "--config", str(config), "--workdir", str(tmp_path / "run"),
                  "--config.train.batch_size=128")
  _assert_user_error(proc, "error: train.batch_size=128 exceeds the 64 training pairs")


def test_ablate_user_error(tmp_path):
  proc = helpers.run_module("dgia_jax.tools.ablate", "--config", "configs/default.py", "--workdir", str(tmp_path),
                  "--rows", "full,nope")
  _assert_user_error(proc, "error: unknown ablation rows ['nope']")


def test_prepare_user_error_lists_every_bad_record(tmp_path):
  root = str(tmp_path / "CUHK-PEDES")
  annos = benchmark_fixtures.write_fixture(root, "cuhk_pedes")
  annos[0]["captions"] = [""]
  annos[1]["file_path"] = "CUHK03/absent.png"
  del annos[2]["id"]
  annos[4]["split"] = "tset"
  annos[5]["id"] = "seven"
  with open(os.path.join(root, "imgs", annos[6]["file_path"]), "wb") as f:
    f.write(b"\xff\xd8\xff truncated")
  annos[7]["file_path"] = annos[8]["file_path"]
  benchmark_fixtures.write_annotations(root, "cuhk_pedes", annos)
  proc = helpers.run_module("dgia_jax.tools.prepare", "--dataset=cuhk_pedes", f"--manual_dir={root}",
                  f"--data_dir={tmp_path / 'tfds'}")
  _assert_user_error(proc, "error: cuhk_pedes: 7 problems in 7 of", "record 0 (", "caption 0 is empty",
                     "image file not found", "missing key 'id'", "unknown split 'tset'", "id 'seven' is not an integer",
                     "cannot read image", "duplicate path")
  unreadable = tmp_path / "CUHK-PEDES" / "reid_raw.json"
  unreadable.write_text("[{")
  _assert_user_error(helpers.run_module("dgia_jax.tools.prepare", "--dataset=cuhk_pedes", f"--manual_dir={root}",
                              f"--data_dir={tmp_path / 'tfds'}"), f"error: {unreadable} is not valid JSON")


def test_export_evaluate_user_error_on_a_workdir_that_is_not_a_run(tmp_path):
  for module, extra in (("dgia_jax.tools.export", ["--out", str(tmp_path / "emb")]), ("dgia_jax.tools.evaluate", [])):
    proc = helpers.run_module(module, "--workdir", str(tmp_path), *extra)
    _assert_user_error(proc, f"error: {tmp_path} is not a training workdir: config.json is missing")


def test_search_report_user_error_on_a_folder_that_is_not_an_export(tmp_path):
  message = f"error: {tmp_path}/manifest.json is missing: {tmp_path} is not an export"
  _assert_user_error(helpers.run_module("dgia_jax.tools.search", "--emb", str(tmp_path), "--query", "a man"), message)
  _assert_user_error(helpers.run_module("dgia_jax.tools.report", "--emb", str(tmp_path), "--out", str(tmp_path / "r")), message)


def test_evaluate_user_error_on_a_run_without_checkpoints(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(helpers.load_config("synthetic_scratch").to_dict()))
  proc = helpers.run_module("dgia_jax.tools.evaluate", "--workdir", str(run), "--dataset", "market1501")
  _assert_user_error(proc, "error: no checkpoint in")  # the run's checkpoints are read first
  proc = helpers.run_module("dgia_jax.tools.evaluate", "--workdir", str(tmp_path / "none"))
  _assert_user_error(proc, "is not a training workdir")


_INTERNAL = """
from dgia_jax import cli


def main(argv):
  raise RuntimeError("a bug, not the user's doing")

cli.run(main)
"""


def test_internal_errors_keep_their_traceback_not_a_user_error():
  proc = subprocess.run([sys.executable, "-c", _INTERNAL], cwd=helpers.ROOT, capture_output=True, text=True,
                        env=helpers.env(), timeout=120)
  assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
  assert not proc.stderr.strip().splitlines()[-1].startswith("error:")
