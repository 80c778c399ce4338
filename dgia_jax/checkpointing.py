"""Orbax checkpoints: atomic writes (a killed write never replaces the last good step),
`keep` newest kept, restored with the shardings of a template state."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every_steps` steps (and when forced), keeps the newest `keep`."""

  def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, template):
    """The latest checkpoint restored into `template`'s structure and shardings, or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_raw(self, step: int | None = None):
    """Checkpoint `step` (default: latest) as nested dicts of arrays on this process's first device.

    Needs no template and works whatever the topology that saved it (inference, export).
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            self._manager.item_metadata(step))
    return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def save(self, step: int, state, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    """Waits for pending writes."""
    self._manager.wait_until_finished()
    self._manager.close()
