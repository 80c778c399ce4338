"""The main job: prepare the data if missing, train, evaluate every epoch, write results and curves.

  python -m dgia_jax.main --config configs/default.py --workdir runs/default --config.train.epochs=3

Every other program is `python -m dgia_jax.tools.<name>` (ablate, prepare, export, search,
report, evaluate).
"""

import sys

from absl import flags
from ml_collections import config_flags

from dgia_jax import cli
from dgia_jax.common import parallel
from dgia_jax.evaluation import published
from dgia_jax.run import reporting
from dgia_jax.training import hooks, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")
_DISTRIBUTED_AUTO = flags.DEFINE_bool("distributed_auto", False,
                                      "Let JAX detect the cluster (SLURM, Open MPI, Cloud TPU, ...).")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run saved a checkpoint and can be resumed


def main(argv):
  cli.start(argv)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  _DISTRIBUTED_AUTO.value)
  try:
    train.train_initial_run(_CONFIG.value)  # stage 1, when the config starts from a run still to train
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except hooks.Preempted:
    sys.exit(PREEMPTED_EXIT_CODE)
  print(summary(results, _CONFIG.value.data.name))


def summary(results: dict, dataset: str) -> str:
  """The run's text→image figures: last epoch, best on validation, best on test (the field's
  selection, labelled), beside the field's published figures on `dataset` when it has any."""
  final = results["final"]
  if "t2i" not in final:
    return f"final ({final['split']}, epoch {final['epoch']}): diverged, no figures: {final['diverged']}"
  ours = {f"last epoch ({final['epoch']})": (final["selection"], final["t2i"])}
  for key in ("best_val", "best_on_test"):
    if key in results and "t2i" in results[key]["test"]:
      ours[f"{key} ({results[key]['epoch']})"] = (results[key]["selection"].split(":")[0], results[key]["test"]["t2i"])
  lines = [f"final ({final['split']}, epoch {final['epoch']}): text→image {reporting.format_metrics(final['t2i'])}"]
  if published.figures(dataset):
    lines.append(published.table(dataset, ours))
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
