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
from ml_collections import config_flags

from dgia_jax import cli
from dgia_jax.evaluation import evaluators, published
from dgia_jax.run import files, reporting, rundir

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Instead of --workdir: a field checkpoint (IRRA's or DGCMIA's "
                                  "best.pth), evaluated on --dataset (default: its config's).")
_CONFIG = config_flags.DEFINE_config_file("config", cli.FIELD_CHECKPOINT_CONFIG, "With --checkpoint: the config "
                                          "describing its model, input and tokenizer (data.tokenizer: CLIP's BPE).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best-on-validation parameters the run kept (workdir/best).")
_DATASET = flags.DEFINE_string("dataset", "", "Another benchmark to evaluate on (cross-domain): cuhk_pedes, "
                               "icfg_pedes, rstpreid. Default: the run's own data set.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "With --dataset: that benchmark's original folder "
                                  "(annotation JSON + imgs/).")
_OUT = flags.DEFINE_string("out", "", "JSON file the figures are written to (default: under workdir/evaluations/, "
                           "or beside --checkpoint).")


def main(argv):
  cli.start(argv)
  model = cli.model_of_flags(_WORKDIR.value, _CHECKPOINT.value, _CONFIG.value)
  result = evaluators.evaluate_run(model, _SPLIT.value, _STEP.value, _BEST.value, _DATASET.value, _MANUAL_DIR.value)
  if _OUT.value:
    out = _OUT.value
  elif result["workdir"]:
    out = rundir.RunDir(result["workdir"]).evaluation_file(result["dataset"], result["split"], result["step"],
                                                           result["best"])
  else:
    out = f"{os.path.splitext(result['checkpoint'])[0]}-{result['dataset']}-{result['split']}.json"
  files.make_dirs(os.path.dirname(os.path.abspath(out)), "the folder of --out")
  files.write_json(out, result)
  print(f"{result['dataset']} {result['split']}: {result['captions']} captions, {result['images']} images, "
        f"{result['identities']} identities; step {result['step']}{' (best on validation)' if result['best'] else ''}")
  print(f"  text→image  {reporting.format_metrics(result['t2i'])}")
  print(f"  image→text  {reporting.format_metrics(result['i2t'])}")
  if result["published"]:
    ours = "dgia-jax, this checkpoint" if result["workdir"] else "this checkpoint, here"
    print(published.table(result["dataset"], {ours: (f"step {result['step']}", result["t2i"])}))
  print(f"written to {out}")


if __name__ == "__main__":
  cli.run(main)
