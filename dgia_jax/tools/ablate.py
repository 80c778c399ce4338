"""Runs the ablation study (`dgia_jax.ablation`): every row a set of switches of the same trainer.

  python -m dgia_jax.tools.ablate --config configs/synthetic_finetune.py --workdir runs/ablation \
      --rows itc,lrc,gsrc,lrc+gsrc,full,oracle --seeds 3
"""

import sys

from absl import flags
from ml_collections import config_flags

from dgia_jax import cli
from dgia_jax.training import ablation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every run of the ablation and its report.")
_ROWS = flags.DEFINE_list("rows", ["itc", "lrc", "gsrc", "lrc+gsrc", "full", "oracle"],
                          f"Rows to run, from {sorted(ablation.ROWS)}.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per row (0 .. seeds-1).", lower_bound=1, upper_bound=100)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  command = "python -m dgia_jax.tools.ablate " + " ".join(sys.argv[1:])
  print(ablation.run_study(_CONFIG.value, _WORKDIR.value, _ROWS.value, _SEEDS.value, command))


if __name__ == "__main__":
  cli.run(main)
