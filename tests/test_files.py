"""Files written whole or not at all, folders rewritten whole, and one writer per folder (an OS lock)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dgia_jax.common import errors
from dgia_jax.run import files, rundir
from tests import helpers

_FULL_DISK = """
import resource, sys
from dgia_jax.common import errors
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
{body}
except errors.WriteError as e:
  print("WriteError:", e)
"""


def _under_full_disk(body: str, limit: int = 1000) -> str:
  code = _FULL_DISK.format(limit=limit, body="\n".join("  " + line for line in body.strip().splitlines()))
  return helpers.run_python(code).stdout


def test_a_failed_config_write_keeps_the_config_there_before(tmp_path):
  run = rundir.RunDir(str(tmp_path))
  config = helpers.load_config("default")
  run.write_config(config)
  before = open(run.config_file, "rb").read()
  out = _under_full_disk(f"""
from dgia_jax.run import rundir
from tests import helpers
c = helpers.load_config("default")
c.name = "x" * 5000
rundir.RunDir({str(tmp_path)!r}).write_config(c)
""", limit=len(before) + 100)
  assert out.startswith(f"WriteError: could not write {run.config_file}: File too large; the previous one is intact")
  assert open(run.config_file, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["config.json"]


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def test_a_failed_folder_write_keeps_every_file_of_the_version_there_before(tmp_path):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  (out_dir / "mine.txt").write_text("not the product's")

  def write_v1(staging):
    _write(os.path.join(staging, "a.txt"), "v1 a")
    os.makedirs(os.path.join(staging, "sub"))
    _write(os.path.join(staging, "sub", "b.txt"), "v1 b")
    _write(os.path.join(staging, "index.txt"), "v1")

  files.replace_folder_files(str(out_dir), write_v1, set(), last="index.txt")
  read = lambda p: (out_dir / p).read_text()  # noqa: E731
  snapshot = {p: read(p) for p in ("a.txt", "sub/b.txt", "index.txt", "mine.txt")}

  def fails(staging):
    _write(os.path.join(staging, "a.txt"), "v2 a")
    raise OSError(28, "No space left on device")

  with pytest.raises(errors.WriteError, match=f"could not write {out_dir}: No space left on device; what was there"):
    files.replace_folder_files(str(out_dir), fails, {"a.txt", "sub", "index.txt"}, last="index.txt")
  assert {p: read(p) for p in snapshot} == snapshot
  assert sorted(os.listdir(out_dir)) == ["a.txt", "index.txt", "mine.txt", "sub"]  # no staging left

  files.replace_folder_files(str(out_dir), lambda s: _write(os.path.join(s, "index.txt"), "v3"),
                             {"a.txt", "sub", "index.txt"}, last="index.txt")
  assert sorted(os.listdir(out_dir)) == ["index.txt", "mine.txt"]  # the old version's files gone, not the user's


def test_read_json_names_a_damaged_file(tmp_path):
  for text, says in (("{", "not JSON"), ("[" * 100_000 + "]" * 100_000, "not JSON"), ("[1]", "a JSON list where dict")):
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(errors.BadInputError, match=f"{tmp_path}/x.json is damaged: .*{says}"):
      files.read_json(str(tmp_path / "x.json"), dict)
  (tmp_path / "x.json").write_bytes(b'{"a": "\xff"}')
  with pytest.raises(errors.BadInputError, match="is damaged"):
    files.read_json(str(tmp_path / "x.json"))
  with pytest.raises(ValueError):
    files.write_json(str(tmp_path / "y.json"), {"figure": float("nan")})  # no NaN is ever written
  assert not os.path.exists(tmp_path / "y.json")


def test_one_writer_a_second_is_refused_naming_the_first(tmp_path):
  with files.FolderLock(str(tmp_path), "--workdir"):
    with pytest.raises(errors.BusyError, match=rf"--workdir {tmp_path} is in use: pid {os.getpid()} on .* is writing"):
      files.FolderLock(str(tmp_path), "--workdir")
  files.FolderLock(str(tmp_path), "--workdir").release()  # released: taken again


_HOLD = """
import sys, time
from dgia_jax.run import files
lock = files.FolderLock(sys.argv[1], "--workdir")
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_of_a_killed_writer_is_free_at_once(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=helpers.env(), stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(errors.BusyError, match=f"pid {proc.pid}"):
      files.FolderLock(str(tmp_path), "--workdir")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  deadline = time.time() + 10
  while True:  # the OS releases a dead process's locks
    try:
      files.FolderLock(str(tmp_path), "--workdir").release()
      break
    except errors.BusyError:
      assert time.time() < deadline
      time.sleep(0.05)


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "run").write_text("")
  with pytest.raises(errors.ConfigError, match=f"--workdir {tmp_path}/run is a file, not a folder"):
    files.FolderLock(str(tmp_path / "run"), "--workdir")
