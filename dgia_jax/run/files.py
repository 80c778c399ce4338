"""Files written whole or not at all, and the one-writer lock of a directory.

Every file the project writes goes through `replace_whole` (a temporary file, then a rename), or,
for a folder of files (an export, a report), through `replace_folder_files`: a crash, a kill or a
full disk leaves what was there before, never a file cut short.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

from dgia_jax.common import errors


def replace_whole(path: str, write) -> None:
  """Writes `path` whole or not at all: `write(tmp_path)` then a rename. If it fails (disk full,
  file-size limit, read-only target), raises WriteError naming `path`; a file already there is intact."""
  tmp = path + ".tmp"
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    kept = "; the previous one is intact" if os.path.exists(path) else ""
    raise errors.WriteError(f"could not write {path}: {e.strerror or e}{kept}") from e


def write_json(path: str, obj) -> None:
  """`obj` as indented JSON at `path`, written whole or not at all (`replace_whole`). Non-finite
  floats are refused (ValueError): JSON has no NaN, and no figure is made of one."""

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, default=str, allow_nan=False)

  replace_whole(path, write)


def read_json(path: str, kind: type | None = None):
  """The JSON value in `path` (a `kind`, dict or list, if given); BadInputError names a damaged file."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
    raise errors.BadInputError(f"{path} is damaged: not JSON ({str(e) or type(e).__name__})") from e
  if kind is not None and not isinstance(value, kind):
    raise errors.BadInputError(f"{path} is damaged: a JSON {type(value).__name__} where {kind.__name__} was expected")
  return value


def write_text(path: str, text: str) -> None:
  """`text` at `path`, written whole or not at all."""

  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)

  replace_whole(path, write)


STAGING_DIR = ".staging"  # inside a folder being rewritten: the next version, until it is complete


def replace_folder_files(out_dir: str, write_into, owned: set[str], last: str | None = None) -> list[str]:
  """Rewrites the files a folder's product consists of, whole or not at all.

  `write_into(staging)` writes every new file into `out_dir/.staging`; only when it has returned
  are they moved in (`last`, e.g. a manifest, moved last), then the files of `owned` (the previous
  version's) that the new one does not reuse are removed. A failed write raises WriteError naming
  `out_dir` and leaves the previous version as it was; files in `out_dir` that are not `owned` are
  never touched. Returns the new files' names.
  """
  staging = os.path.join(out_dir, STAGING_DIR)
  try:
    shutil.rmtree(staging, ignore_errors=True)  # left by a write that failed
    os.makedirs(staging)
    write_into(staging)
  except OSError as e:
    shutil.rmtree(staging, ignore_errors=True)
    kept = "; what was there before is intact" if owned else ""
    raise errors.WriteError(f"could not write {out_dir}: {e.strerror or e}{kept}") from e
  new = sorted(os.listdir(staging))
  for name in [n for n in new if n != last] + [n for n in new if n == last]:
    target = os.path.join(out_dir, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)
    os.replace(os.path.join(staging, name), target)
  for name in owned - set(new):
    path = os.path.join(out_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
  os.rmdir(staging)
  return new


def make_dirs(path: str, what: str) -> None:
  """Creates folder `path` (`what`, e.g. "--workdir", names it in errors); a file there is an error."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f"{what} {path} is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.WriteError(f"could not create {what} {path}: {e.strerror or e}") from e


LOCK_FILE = ".lock"


class FolderLock:
  """An exclusive OS lock (flock) on `<path>/.lock`: one writer per folder. The OS releases it when
  the process ends, however it ends, so a crashed writer leaves no stale lock; the file keeps the
  holder's pid, host and start time for the message a second writer gets."""

  def __init__(self, path: str, what: str):
    self.path, self._file = os.path.join(path, LOCK_FILE), None
    make_dirs(path, what)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise errors.BusyError(f"{what} {path} is in use: {holder} is writing it; wait for it to end or choose "
                             "another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "FolderLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()
