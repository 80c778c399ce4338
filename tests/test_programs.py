"""Every program answers a user's mistake with one `error:` line and exit status 1, never a traceback.

The flags of each program are fuzzed in-process (hypothesis, inside one fresh interpreter per
program, where an example costs microseconds); a few real runs prove the wiring: a value with no
meaning refused before anything is written, and each program's own checks of files and sizes.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from dgia_jax.common import errors
from dgia_jax.gallery import exports, report, searcher
from tests import helpers

pytestmark = pytest.mark.slow  # starts programs

PROGRAMS = ["dgia_jax.main", "dgia_jax.tools.ablate", "dgia_jax.tools.evaluate", "dgia_jax.tools.export",
            "dgia_jax.tools.prepare", "dgia_jax.tools.report", "dgia_jax.tools.search", "dgia_jax.tools.serve"]


_FUZZ_FLAGS = """
import importlib, sys
from absl import flags
from hypothesis import given, settings, strategies as st
from dgia_jax import cli
from dgia_jax.training import config_domains

module = importlib.import_module(sys.argv[1])
names = sorted({f.name for f in flags.FLAGS.get_key_flags_for_module(module)})
values = st.one_of(st.text(max_size=12), st.integers(-10**30, 10**30).map(str), st.sampled_from(
    ["", "0", "-1", "nan", "inf", "1e400", "true", "x,y", "configs", "configs/default.py", "/nonexistent", "٣"]))
keys = st.sampled_from(sorted(config_domains.KEYS) + ["train.nope", "nope"])
flag = st.one_of(st.tuples(st.sampled_from(names), values).map(lambda t: f"--{t[0]}={t[1]}"),
                 st.tuples(keys, values).map(lambda t: f"--config.{t[0]}={t[1]}"),
                 st.sampled_from(["--", "-k", "--no" + names[0], "positional"]))

@settings(max_examples=int(sys.argv[2]), deadline=None, database=None)
@given(st.lists(flag, max_size=4))
def fuzz(argv):
  try:
    cli.parse_flags([sys.argv[1]] + (["--config=configs/default.py"] if "config" in names else []) + argv)
  except SystemExit as e:
    assert isinstance(e.code, str) and e.code.startswith("error: ") and "\\n" not in e.code, (argv, e.code)
    if len(argv) == 1 and argv[0].startswith("-") and argv[0] != "--":  # one flag refused: it is named
      name = argv[0].split("=", 1)[0].lstrip("-")
      assert name in e.code or "must have a value other than None" in e.code, (argv, e.code)
  finally:
    flags.FLAGS.unparse_flags()

fuzz()
print("fuzzed", len(names), "flags")
"""


@pytest.mark.parametrize("module", PROGRAMS)
def test_fuzzed_flags_are_parsed_or_refused_in_one_line(module):
  proc = helpers.run_python(_FUZZ_FLAGS.replace("sys.argv[1]", repr(module)).replace("sys.argv[2]", "'150'"))
  assert "fuzzed" in proc.stdout


def _one_error_line(proc: subprocess.CompletedProcess, says: str) -> None:
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("args, says", [
    (["--config", "/nonexistent.py"], "error: --config /nonexistent.py: no such file"),
    (["--config", "configs"], "error: --config configs: a folder, not a config file"),
    (["--config", "configs/default.py", "--config.train.lr=inf"], "train.lr=inf must be a finite number > 0"),
    (["--config", "configs/default.py", "--config.loss.temperature=0"], "loss.temperature=0.0 must be a finite number"),
    (["--config", "configs/synthetic_scratch.py", "--config.model.init_from=/nonexistent/start"],
     "model.init_from=/nonexistent/start: no such CLIP checkpoint, field checkpoint or dgia-jax training workdir"),
    (["--config", "configs/default.py", "positional"], "unexpected arguments ['positional']"),
])
def test_main_refuses_before_anything_is_written(tmp_path, args, says):
  workdir = tmp_path / "run"
  proc = helpers.run_module("dgia_jax.main", "--workdir", str(workdir), *args)
  _one_error_line(proc, says)
  assert not workdir.exists() and not os.path.exists("/nonexistent/start")


def test_main_names_a_workdir_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("")
  proc = helpers.run_module("dgia_jax.main", "--workdir", str(tmp_path / "run"), "--config", "configs/synthetic_scratch.py",
                  f"--config.data.data_dir={tmp_path}/tfds", "--config.data.prepare=False")
  _one_error_line(proc, "is not prepared")  # checked first; then the workdir:
  proc = helpers.run_module("dgia_jax.main", "--workdir", str(tmp_path / "run"), "--config", "configs/synthetic_scratch.py",
                  f"--config.data.data_dir={tmp_path}/tfds", "--config.train.epochs=0")
  _one_error_line(proc, "train.epochs=0 must be a whole number ≥ 1")


@pytest.fixture(scope="module")
def export_dir(exported):
  return exported[1]


def test_query_files_faiss_factories_manifests_and_report_sizes_with_no_meaning_are_named(export_dir, tmp_path):
  with pytest.raises(errors.MissingPathError, match=f"--queries_file {tmp_path}: a folder, not a file"):
    searcher.read_queries(str(tmp_path))
  binary = tmp_path / "queries.bin"
  binary.write_bytes(b"a man\n\xff\xfe in red\n")
  with pytest.raises(errors.BadInputError, match=f"--queries_file {binary} is not UTF-8 text"):
    searcher.read_queries(str(binary))
  emb = exports.load(export_dir)
  with pytest.raises(errors.ConfigError, match=r"cannot index this gallery \(16 rows"):
    searcher.Searcher(emb.images, "faiss", "IVF4096,Flat")
  with pytest.raises(errors.ConfigError, match="--faiss_factory 'NoSuchIndex' is not a FAISS index factory"):
    searcher.Searcher(emb.images, "faiss", "NoSuchIndex")
  with pytest.raises(errors.ConfigError, match="k must be at least 1"):
    searcher.Searcher(emb.images).search(np.zeros((1, 32), np.float32), 0)
  for sizes in ((0, 5), (8, 0), (report.MAX_QUERIES + 1, 5), (8, report.MAX_K + 1)):
    with pytest.raises(errors.ConfigError):
      report.check_sizes(*sizes)
  damaged = tmp_path / "damaged"
  shutil.copytree(export_dir, damaged)
  (damaged / "manifest.json").write_text('{"format": ')
  with pytest.raises(errors.BadInputError, match=f"{damaged}/manifest.json is damaged: not JSON"):
    exports.load(str(damaged))
  (damaged / "manifest.json").write_text(json.dumps({"format": "npy"}))
  with pytest.raises(errors.BadInputError, match="manifest.json is damaged: source, dim, counts, shards, index, step, "
                                                 "workdir, config missing or malformed"):
    exports.load(str(damaged))


def test_search_report_and_ablate_refuse_in_one_line(export_dir, tmp_path):
  _one_error_line(helpers.run_module("dgia_jax.tools.search", "--emb", export_dir, "--queries_file", str(tmp_path)),
                  f"error: --queries_file {tmp_path}: a folder, not a file")
  _one_error_line(helpers.run_module("dgia_jax.tools.report", "--emb", export_dir, "--out", str(tmp_path / "r"), "-k", "100000"),
                  "error: flag --k=100000")
  _one_error_line(helpers.run_module("dgia_jax.tools.ablate", "--config", "configs/default.py", "--workdir", str(tmp_path / "a"),
                           "--rows="), "give at least one ablation row")
