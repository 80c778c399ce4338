"""Evaluates a trained run on one split: text→image and image→text Rank-1/5/10, mAP and mINP.

  python -m dgia_jax.tools.evaluate --workdir runs/cuhk_pedes [--best | --step N] [--split test]
  python -m dgia_jax.tools.evaluate --workdir runs/cuhk_pedes --best \\
      --dataset icfg_pedes --manual_dir /path/to/ICFG-PEDES        # cross-domain: CUHK-PEDES → ICFG-PEDES

The figures are the trainer's (`evaluators.evaluate_run`, the field's protocol: every caption of
the split is a query over every image of it). By default the run's latest checkpoint is
evaluated; `--best` takes the best-on-validation parameters the run kept. `--dataset` reads
another benchmark with the run's tokenizer, image size and context length, building it into
the run's data directory on first use. The figures are printed and written as JSON (`--out`,
default `<workdir>/evaluations/<dataset>-<split>-step<N>[-best].json`).
"""

import os

from absl import flags

from dgia_jax import cli
from dgia_jax.evaluation import evaluators
from dgia_jax.run import files, reporting, rundir

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best-on-validation parameters the run kept (workdir/best).")
_DATASET = flags.DEFINE_string("dataset", "", "Another benchmark to evaluate on (cross-domain): cuhk_pedes, "
                               "icfg_pedes, rstpreid. Default: the run's own data set.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "With --dataset: that benchmark's original folder "
                                  "(annotation JSON + imgs/).")
_OUT = flags.DEFINE_string("out", "", "JSON file the figures are written to (default: under workdir/evaluations/).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  cli.start(argv)
  result = evaluators.evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _BEST.value, _DATASET.value,
                                  _MANUAL_DIR.value)
  out = _OUT.value or rundir.RunDir(result["workdir"]).evaluation_file(result["dataset"], result["split"],
                                                                       result["step"], result["best"])
  files.make_dirs(os.path.dirname(os.path.abspath(out)), "the folder of --out")
  files.write_json(out, result)
  print(f"{result['dataset']} {result['split']}: {result['captions']} captions, {result['images']} images, "
        f"{result['identities']} identities; step {result['step']}{' (best on validation)' if result['best'] else ''}")
  print(f"  text→image  {reporting.format_metrics(result['t2i'])}")
  print(f"  image→text  {reporting.format_metrics(result['i2t'])}")
  print(f"written to {out}")


if __name__ == "__main__":
  cli.run(main)
