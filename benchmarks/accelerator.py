"""The full method at paper scale on an accelerator: ViT-B/16, 384×128, bf16, all four losses.

Measures, per batch size: step time, pairs/s, FLOPs per step (from XLA's cost analysis of
the compiled step, i.e. what the program really executes, not a formula) and model FLOPs
utilisation against the chip's peak. Also times an end-to-end evaluation of a
CUHK-PEDES-sized test split (3,074 images, 6,148 captions: encode both, then metrics), and
projects a 40-epoch CUHK-PEDES run (68,126 pairs per epoch, evaluation every epoch).

The memory banks hold N = 68,126 rows, as on CUHK-PEDES. Inputs are random (speed does not
depend on content). Runs on CPU too, for a smoke test
(`--batches 2 --steps 1 --eval_batch 4 --eval_fraction 0.002`).

  python -m benchmarks.accelerator [--batches 64,128] [--steps 20] [--peak_tflops 989]
      [--profile /tmp/trace]

Prints one JSON line.
"""

import argparse
import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from dgia_jax import cli, evaluate, identity_graph, parallel, train
from dgia_jax.models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUHK_PAIRS, CUHK_TEST_IMAGES, CUHK_TEST_CAPTIONS, EPOCHS = 68126, 3074, 6148, 40


class _ClipTokenizer:  # the facts the model needs from CLIP's tokenizer
  vocab_size, eot_id, context_length, mask_id = 49408, 49407, 77, 49405


def _config(batch: int):
  config = cli.load_config(os.path.join(ROOT, "configs", "default.py"))
  config.model = presets.vit_b16()
  config.model.dtype = "bfloat16"
  config.data.image_size = (384, 128)
  config.iasc.pad = 10
  config.relations.start_epoch = config.gsrc.start_epoch = 1
  config.train.batch_size = batch
  return config


def _tokens(rng, n):
  tokens = np.zeros((n, 77), np.int32)
  for i, length in enumerate(rng.integers(20, 70, size=n)):
    tokens[i, 0], tokens[i, 1:length], tokens[i, length] = 49406, rng.integers(1, 49000, size=length - 1), 49407
  return tokens


def measure_step(batch: int, steps: int, profile: str | None) -> dict:
  config = _config(batch)
  mesh = parallel.make_mesh()
  model = train.build_model(config, _ClipTokenizer)
  steps_per_epoch = CUHK_PAIRS // batch
  tx, schedule = train.make_optimizer(config.train, steps_per_epoch)
  rows = identity_graph.padded_size(CUHK_PAIRS, mesh)
  state = train.init_state(model, tx, 0, rows, mesh)
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(rows, 512)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  bank = identity_graph.MemoryBank(image=jnp.asarray(feats), text=jnp.asarray(feats), filled=jnp.ones(rows, bool))
  state = state.replace(bank=jax.device_put(bank, parallel.data_sharding(mesh)))
  step = train.make_train_step(model, tx, schedule, config, steps_per_epoch, _ClipTokenizer.mask_id, state, mesh)
  batch_arrays = parallel.to_global({
      "image": rng.integers(0, 256, size=(batch, 384, 128, 3), dtype=np.uint8),
      "tokens": _tokens(rng, batch),
      "index": rng.choice(CUHK_PAIRS, batch, replace=False).astype(np.int32)}, mesh)
  pids = parallel.global_array(rng.integers(0, 11003, size=rows).astype(np.int32), parallel.data_sharding(mesh))
  flops = timing.step_flops(step, state, batch_arrays, pids)
  with jax.profiler.trace(profile) if profile else contextlib.nullcontext():
    seconds, state = timing.seconds_per_step(step, state, batch_arrays, pids, steps, warmup=3)
  return {"seconds_per_step": seconds, "pairs_per_s": batch / seconds, "tflops_per_step": flops / 1e12,
          "achieved_tflops": flops / seconds / 1e12, "steps_per_epoch": steps_per_epoch, "params": state.params}


def measure_eval(params, batch: int, fraction: float) -> float:
  """Seconds to encode a CUHK-sized test split (scaled by `fraction`) and compute every metric both ways."""
  config = _config(batch)
  mesh = parallel.make_mesh()
  model = train.build_model(config, _ClipTokenizer)
  enc_img, enc_txt = train.make_encoders(model, mesh)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(batch, 384, 128, 3), dtype=np.uint8)
  tokens = _tokens(rng, batch)
  num_images = max(batch, int(CUHK_TEST_IMAGES * fraction))
  num_ids = max(1, num_images // 3)
  g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_images - num_ids)])
  q_pids = np.repeat(g_pids, 2)
  for _ in range(2):  # compile
    jax.block_until_ready(enc_img(params, parallel.to_global({"x": images}, mesh)["x"]))
    jax.block_until_ready(enc_txt(params, parallel.to_global({"x": tokens}, mesh)["x"]))
  start = time.perf_counter()
  img = [parallel.to_host(enc_img(params, parallel.to_global({"x": images}, mesh)["x"]))
         for _ in range(-(-num_images // batch))]
  txt = [parallel.to_host(enc_txt(params, parallel.to_global({"x": tokens}, mesh)["x"]))
         for _ in range(-(-len(q_pids) // batch))]
  img = np.concatenate(img)[:num_images]
  txt = np.concatenate(txt)[:len(q_pids)]
  evaluate.evaluate_retrieval(txt, img, q_pids, g_pids)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="64,128")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H100/H200 SXM)")
  parser.add_argument("--eval_batch", type=int, default=512)
  parser.add_argument("--eval_fraction", type=float, default=1.0, help="scale the test split (CPU smoke tests)")
  parser.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed steps here")
  args = parser.parse_args()
  out = {"benchmark": "accelerator", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "flops_source": "XLA cost analysis of the compiled step", "peak_tflops": args.peak_tflops}
  params = None
  for batch in map(int, args.batches.split(",")):
    m = measure_step(batch, args.steps, args.profile)
    params = m.pop("params")
    m["mfu"] = m["achieved_tflops"] / args.peak_tflops
    out[f"batch_{batch}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
  eval_seconds = measure_eval(params, args.eval_batch, args.eval_fraction) / args.eval_fraction
  out["cuhk_test_eval_seconds"] = round(eval_seconds, 2)
  first = out[f"batch_{args.batches.split(',')[0]}"]
  hours = (EPOCHS * (first["steps_per_epoch"] * first["seconds_per_step"] + eval_seconds)) / 3600
  out["projected_40_epoch_cuhk_hours"] = round(hours, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
