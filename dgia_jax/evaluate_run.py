"""Evaluates a trained run on one split: text→image and image→text Rank-1/5/10, mAP and mINP.

  python -m dgia_jax.evaluate_run --workdir runs/cuhk_pedes [--best | --step N] [--split test]
  python -m dgia_jax.evaluate_run --workdir runs/cuhk_pedes --best \\
      --dataset icfg_pedes --manual_dir /path/to/ICFG-PEDES        # cross-domain: CUHK-PEDES → ICFG-PEDES

The figures are the trainer's (`train.evaluate_split`, the field's protocol: every caption of
the split is a query over every image of it). By default the run's latest checkpoint is
evaluated; `--best` takes the best-on-validation parameters the run kept. `--dataset` reads
another benchmark with the run's tokenizer, image size and context length, building it into
the run's data directory on first use. The figures are printed and written as JSON (`--out`,
default `<workdir>/evaluations/<dataset>-<split>-step<N>[-best].json`).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

from dgia_jax import cli, parallel, reporting, train
from dgia_jax.data import datasets

EVALUATIONS_DIR = "evaluations"


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so the functions import anywhere."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).", required=True)
  flags.DEFINE_string("split", "test", "Split to evaluate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("best", False, "Evaluate the best-on-validation parameters the run kept (workdir/best).")
  flags.DEFINE_string("dataset", "", "Another benchmark to evaluate on (cross-domain): cuhk_pedes, icfg_pedes, "
                      "rstpreid. Default: the run's own data set.")
  flags.DEFINE_string("manual_dir", "", "With --dataset: that benchmark's original folder (annotation JSON + imgs/).")
  flags.DEFINE_string("out", "", "JSON file the figures are written to (default: under workdir/evaluations/).")


def evaluate_run(workdir: str, split: str = "test", step: int | None = None, best: bool = False,
                 dataset: str = "", manual_dir: str = "") -> dict:
  """Retrieval figures of a trained run's checkpoint on `split` of its data set, or of benchmark
  `dataset` (its original folder `manual_dir`).

  Returns {"workdir", "step", "best", "dataset", "split", "images", "captions", "identities",
  "t2i", "i2t", "seconds"}; t2i and i2t hold R1, R5, R10, mAP and mINP in %, seconds the time
  to encode the split and rank it (compilation included).
  """
  config, _, model, params, step = train.load_trained(workdir, step, best)
  data_cfg = config.data
  if dataset and dataset != data_cfg.name:
    data_cfg = datasets.cross_domain(data_cfg, dataset, manual_dir, datasets.tokenizer_path(data_cfg))
  elif manual_dir:
    raise ValueError(f"manual_dir is for another data set (--dataset); the run's own, '{data_cfg.name}', is read "
                     f"from {data_cfg.data_dir} as it trained")
  _, splits = datasets.load(data_cfg, (split,))
  data = splits[split]
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  metrics = train.evaluate_split(train.make_encoders(model, mesh), params, data, mesh, config.eval.batch_size)
  return {"workdir": os.path.abspath(workdir), "step": int(step), "best": best, "dataset": data_cfg.name,
          "split": split, "images": data.num_images, "captions": data.num_pairs,
          "identities": int(np.unique(data.person_ids).size), **metrics, "seconds": time.perf_counter() - start}


def default_out(result: dict) -> str:
  """`<workdir>/evaluations/<dataset>-<split>-step<N>[-best].json` for an `evaluate_run` result."""
  name = f"{result['dataset']}-{result['split']}-step{result['step']}{'-best' if result['best'] else ''}.json"
  return os.path.join(result["workdir"], EVALUATIONS_DIR, name)


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  try:
    result = evaluate_run(f.workdir, f.split, f.step, f.best, f.dataset, f.manual_dir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  out = f.out or default_out(result)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  reporting.write_json(out, result)
  print(f"{result['dataset']} {result['split']}: {result['captions']} captions, {result['images']} images, "
        f"{result['identities']} identities; step {result['step']}{' (best on validation)' if result['best'] else ''}")
  print(f"  text→image  {train.format_metrics(result['t2i'])}")
  print(f"  image→text  {train.format_metrics(result['i2t'])}")
  print(f"written to {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
