"""Sharding declared once: a 1-D mesh over every device of every process, axis `data`."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dgia_jax.common import errors

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           auto: bool = False) -> None:
  """Joins JAX's distributed runtime (one call per process, before any computation).

  With `coordinator_address`, `num_processes` and `process_id` the cluster is explicit;
  with `auto`, JAX detects it (SLURM, Open MPI, Cloud TPU, ...). CPU processes talk over
  gloo. Does nothing when neither is given.
  """
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise errors.ConfigError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < num_processes; "
                       f"got num_processes={num_processes}, process_id={process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective: call it on all processes)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_array(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole."""
  return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data` (batches [B, ...], memory banks [N, D])."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise errors.ConfigError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                     f"use a multiple of {n}")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over `data`."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process's host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
