"""Input pipeline throughput, and how long the trainer waits for data.

1. Decode + resize rate: a TFDS array_record data set of JPEG pedestrians at CUHK-PEDES-like
   sizes (height 200–420, width 80–160) is written to a temp dir and read back through the
   training pipeline (`train_batches`: grain, TF-free TFDS source, PIL decode, bicubic
   resize to 384×128) with 1 and 2 grain threads, alternating over `--rounds` passes
   (median reported, every pass listed). Reported as images/s and images/s per core.
2. Waiting: a short run of the default config on the synthetic set; the trainer logs the
   fraction of each interval spent blocked on the input iterator (`data_wait_fraction`).

The perturbed partners of IASC-CL are made on device inside the step, so they cost the
input pipeline nothing.

Prints one JSON line.

  python -m benchmarks.input_pipeline [--rounds 5]
"""

import argparse
import io
import json
import os
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from data_prep import features
from dgia_jax.common import config_files, host_memory
from dgia_jax.data import pipeline
from dgia_jax.data import tokenizer as tokenizer_lib
from dgia_jax.run import rundir
from dgia_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 512


class _JpegPedestrians(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = epath.Path(__file__).parent  # TFDS cannot infer it when this file runs as __main__

  def _info(self):
    return self.dataset_info_from_configs(features=features.person_text_features())

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
      h, w = int(rng.integers(200, 421)), int(rng.integers(80, 161))
      # Smooth content with edges, so JPEG sizes resemble photos rather than noise.
      base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
      img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=90)
      yield i, {"image": buf.getvalue(), "captions": ["a person walking"], "person_id": i // 3,
                "image_id": i, "path": f"imgs/{i}.jpg"}


def decode_rate(split: pipeline.Split, threads: int, batch: int = 64) -> float:
  order = pipeline.EpochOrder(split.num_pairs, batch, seed=0)
  steps = order.steps_per_epoch
  batches = pipeline.train_batches(split, order, start_step=0, end_step=steps, num_threads=threads, prefetch=8)
  next(batches)  # start the workers
  start = time.perf_counter()
  n = sum(len(b["index"]) for b in batches)
  return n / (time.perf_counter() - start)


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5, help="decode passes per thread count, alternating")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    builder = _JpegPedestrians(data_dir=tmp, file_format="array_record")
    builder.download_and_prepare()
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.train_bpe(["a person walking"] * 4, 100), 16)
    split = pipeline.open_split(builder, "train", tok, (384, 128))
    by_round = {1: [], 2: []}
    for _ in range(args.rounds):  # alternating, so a slow spell of a shared machine hits both alike
      for threads, rates in by_round.items():
        rates.append(decode_rate(split, threads))
    rates = {threads: float(np.median(r)) for threads, r in by_round.items()}

    config = config_files.load_config(os.path.join(ROOT, "configs", "default.py"))
    config.data.data_dir = os.path.join(ROOT, "data", "tfds")
    config.train.epochs = 1
    config.eval.every_epochs = 100
    workdir = os.path.join(tmp, "run")
    train.train_and_evaluate(config, workdir)
    records = rundir.RunDir(workdir).records("train")[1:]  # the first holds compilation
  print(json.dumps({
      "benchmark": "input_pipeline", "cores": os.cpu_count(), "device": jax.devices()[0].device_kind,
      "jpeg_384x128_images_per_s": {f"{t}_threads": round(r, 1) for t, r in rates.items()},
      "jpeg_384x128_images_per_s_by_round": {f"{t}_threads": [round(x, 1) for x in r] for t, r in by_round.items()},
      "images_per_s_per_core": round(rates[1], 1),
      "default_config": {"seconds_per_step": round(float(np.mean([r["seconds_per_step"] for r in records])), 4),
                         "pairs_per_s": round(64 / float(np.mean([r["seconds_per_step"] for r in records])), 1),
                         "data_wait_fraction": round(float(np.mean([r["data_wait_fraction"] for r in records])), 4)}}))


if __name__ == "__main__":
  main()
