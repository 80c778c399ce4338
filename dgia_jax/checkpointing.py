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
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from dgia_jax import errors, parallel

DAMAGED_DIR = "damaged"  # inside a checkpoint directory: checkpoints set aside because they did not restore


def _first_line(error: Exception, limit: int = 300) -> str:
  """What went wrong in one line: TensorStore's appended spec dropped; a long line keeps its start
  and its end, where the cause is ("... File too large")."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  line = line.split(" See full TensorStore details")[0]
  return line if len(line) <= limit else f"{line[:limit // 2]} … {line[-limit // 2:]}"


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
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save))
    self._closed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _newest_restorable(self, restore_step, steps: list[int] | None = None, set_aside: bool = False):
    """(step, restore_step(step)) of the newest of `steps` (default: all) that restores (with
    `set_aside`, the newer ones that did not moved to `damaged/`); None if there are no checkpoints."""
    failures = []
    for step in sorted(self._manager.all_steps() if steps is None else steps, reverse=True):
      try:
        restored = restore_step(step)
        ok = True
      except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise many types for damaged files)
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
    an earlier checkpoint writes it again) is replaced. A failed write (this one, or the previous
    asynchronous one, which orbax reports here) raises WriteError naming the directory; the
    checkpoints committed before it stay intact (orbax writes a temporary folder, then renames it)."""
    try:
      if step in self._manager.all_steps() and (force or self._manager.should_save(step)):
        self._manager.delete(step)
      return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except (OSError, ValueError) as e:  # TensorStore reports a failed write as ValueError
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, error: Exception) -> errors.WriteError:
    kept = f"; the newest intact checkpoint is step {self._manager.latest_step()}" if self._manager.all_steps() else ""
    return errors.WriteError(f"could not write a checkpoint to {self.directory} (at step {step}): "
                             f"{_first_line(error)}{kept}")

  def close(self, quiet: bool = False) -> None:
    """Waits for pending writes; a failed asynchronous write raises WriteError naming the directory
    (not if `quiet`: closing after another error). Closing again does nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError) as e:
      if not quiet:
        raise self._write_error(self._manager.latest_step() or 0, e) from e
    finally:
      self._manager.close()
