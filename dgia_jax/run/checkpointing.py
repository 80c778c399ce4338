"""Orbax checkpoints: atomic writes (a killed or failed write never replaces the last good step),
the newest `keep` kept, restored with the shardings of a template state or raw.

Restoring the latest checkpoint falls back: a newest checkpoint that cannot be read (files
truncated or deleted after it was committed) is named in a warning and the newest one that reads
is restored; if none does, an error names each. A training run (`restore`) also moves the ones
that failed aside, under `damaged/`, so it can write those steps again; inference (`restore_raw`)
changes nothing on disk.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from dgia_jax.common import errors, parallel

DAMAGED_DIR = "damaged"  # inside a checkpoint directory: checkpoints set aside because they did not restore


def _first_line(error: Exception) -> str:
  """What went wrong in one line, whole: TensorStore's appended spec and source locations dropped."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  line = line.split(" See full TensorStore details")[0]
  return re.sub(r"\s*\[source locations='[^']*'\]", "", line).strip()


class _Vanished(Exception):
  """A checkpoint step removed while it was being read."""


def _listing(list_steps, tries: int = 10):
  """`list_steps()` (opening a manager, reloading its steps), again if a step vanished while it was
  listed: the writer of a live run removes its oldest steps as it saves new ones."""
  for _ in range(tries - 1):
    try:
      return list_steps()
    except (FileNotFoundError, NotADirectoryError):  # a step's folder, gone between listing and reading
      time.sleep(0.01)
  return list_steps()


TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step orbax had not finished writing


class Checkpointer:
  """Saves every `every_steps` steps (and when forced), keeps the newest `keep`. `read_only`
  (inference) opens the checkpoints as they are, changing nothing on disk."""

  def __init__(self, directory: str, every_steps: int = 1, keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if not read_only:
      if jax.process_index() == 0 and os.path.isdir(self.directory):
        for name in os.listdir(self.directory):  # steps a killed or failed write left unfinished
          if TMP_MARK in name:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      parallel.barrier("unfinished checkpoints removed")
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=async_save)
    self._manager = _listing(lambda: ocp.CheckpointManager(self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                                                           options=options))
    self._closed = False
    self._pending: int | None = None  # the step of an asynchronous write not known to have finished

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _newest_restorable(self, restore_step, steps: list[int] | None = None, set_aside: bool = False):
    """(step, restore_step(step)) of the newest of `steps` (default: all) that restores (with
    `set_aside`, the newer ones that did not moved to `damaged/`); None if there are no checkpoints.

    A step that vanished while it was read (the writer of a live run removed it, keeping its newest
    `keep`), or a listing that missed the steps on disk (one caught while the writer committed it),
    is no failure: the steps are listed again and the newest of them is read."""
    for _ in range(10):
      try:
        found = self._first_restorable(restore_step, steps, set_aside)
        if found is not None or steps is not None or not self._steps_on_disk():
          return found
      except _Vanished:
        pass
      time.sleep(0.01)
      _listing(self._manager.reload)
    return self._first_restorable(restore_step, steps, set_aside)

  def _steps_on_disk(self) -> bool:
    """Whether the directory holds a committed step's folder (named by its number)."""
    return os.path.isdir(self.directory) and any(n.isdigit() for n in os.listdir(self.directory))

  def _first_restorable(self, restore_step, steps: list[int] | None, set_aside: bool):
    failures = []
    for step in sorted(self._manager.all_steps() if steps is None else steps, reverse=True):
      try:
        restored = restore_step(step)
        ok = True
      except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise many types for damaged files)
        if steps is None and not os.path.isdir(os.path.join(self.directory, str(step))):
          raise _Vanished() from e
        failures.append((step, e))
        ok = False
      if parallel.any_process(not ok):  # every process restores the same step
        if ok:
          failures.append((step, RuntimeError("another process could not restore it")))
        logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous one", step,
                        self.directory, _first_line(failures[-1][1]))
        continue
      if failures and set_aside:
        self._set_aside([s for s, _ in failures])
      return step, restored
    if failures:
      raise errors.BadInputError(f"no checkpoint in {self.directory} can be restored: "
                                 + "; ".join(f"step {s}: {_first_line(e)}" for s, e in failures))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves checkpoints that did not restore to `damaged/`, so the run can write those steps again."""
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.directory, DAMAGED_DIR), exist_ok=True)
      for step in steps:
        target = os.path.join(self.directory, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning("checkpoint step %d set aside as %s", step, target)
    parallel.barrier("damaged checkpoints set aside")
    self._manager.reload()

  def restore(self, template):
    """The newest restorable checkpoint in `template`'s structure and shardings, or None if there is none."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    found = self._newest_restorable(lambda step: self._manager.restore(step, args=ocp.args.StandardRestore(abstract)),
                                    set_aside=True)
    return None if found is None else found[1]

  def restore_raw(self, step: int | None = None):
    """(step, checkpoint) as nested dicts of arrays on this process's first device: checkpoint
    `step`, or the newest restorable one. Needs no template and works whatever the topology
    that saved it (inference, export)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore_step(s):
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              self._manager.item_metadata(s))
      return self._manager.restore(s, args=ocp.args.StandardRestore(abstract))

    if step is not None and step not in self._manager.all_steps():
      raise errors.MissingPathError(f"no checkpoint of step {step} in {self.directory}; it has "
                                    f"{sorted(self._manager.all_steps()) or 'none'}")
    found = self._newest_restorable(restore_step, None if step is None else [step])
    if found is None:
      raise errors.MissingPathError(f"no checkpoint in {self.directory}")
    return found

  def save(self, step: int, state, force: bool = False) -> bool:
    """Saves `state` as step `step` when due (or `force`); a step saved before (a run resumed from
    an earlier checkpoint writes it again) is replaced. A failed write raises WriteError naming the
    directory and the step whose write failed (an asynchronous one is known to have failed only when
    the next save or `close` waits for it); the checkpoints committed before it stay intact (orbax
    writes a temporary folder, then renames it)."""
    if not (force or self._manager.should_save(step)):
      return False
    self._finish_pending()
    try:
      if step in self._manager.all_steps():
        self._manager.delete(step)
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except (OSError, ValueError) as e:  # TensorStore reports a failed write as ValueError
      raise self._write_error(step, e) from e
    self._pending = step
    return saved

  def _finish_pending(self) -> None:
    """Waits for the asynchronous write in flight; WriteError names its step if it failed."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError) as e:
      raise self._write_error(self._pending, e) from e
    finally:
      self._pending = None

  def _write_error(self, step: int | None, error: Exception) -> errors.WriteError:
    steps = [s for s in self._manager.all_steps() if s != step]
    kept = f"; the newest intact checkpoint is step {max(steps)}" if steps else ""
    return errors.WriteError(f"could not write a checkpoint to {self.directory} (step {step}): "
                             f"{_first_line(error)}{kept}")

  def close(self, quiet: bool = False) -> None:
    """Waits for pending writes; a failed asynchronous write raises WriteError naming the directory
    and step (not if `quiet`: closing after another error). Closing again does nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self._finish_pending()
    except errors.WriteError:
      if not quiet:
        raise
    finally:
      self._manager.close()
