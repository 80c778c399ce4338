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
  final = results["final"]
  figures = (f"text→image {reporting.format_metrics(final['t2i'])}" if "t2i" in final
             else f"diverged, no figures: {final['diverged']}")
  print(f"final ({final['split']}, epoch {final['epoch']}): {figures}")


if __name__ == "__main__":
  cli.run(main)
