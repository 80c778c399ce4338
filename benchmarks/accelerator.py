"""The full method at paper scale on an accelerator: ViT-B/16, 384×128, bf16, all four losses.

Measures, per batch size: step time, pairs/s, FLOPs per step (XLA's cost analysis of the
lowered step: every op of the program, not a formula; with --attention cudnn, of the same step
with XLA's attention, as the fused kernel counts as none) and model FLOPs utilisation against the
chip's peak; with --profile, the busiest ops of 3 traced steps. Also times an end-to-end
evaluation of a CUHK-PEDES-sized test split (3,074 images, 6,148 captions: encode both, then
metrics), its first pass (compilation included) and a second, and projects a 40-epoch
CUHK-PEDES run (68,126 pairs per epoch, evaluation every epoch). Progress goes to stderr.

The memory banks hold N = 68,126 rows, as on CUHK-PEDES. Inputs are random (speed does not
depend on content). Runs on CPU too, for a smoke test
(`--batches 2 --steps 1 --eval_batch 4 --eval_fraction 0.002`). With --attention cudnn, the fused
kernel is first tried alone at both towers' shapes; if it is refused, the error goes into the
JSON line (`cudnn_preflight`) and the run measures XLA's attention instead.

  python -m benchmarks.accelerator [--batches 64,128] [--steps 20] [--peak_tflops 989] [--profile /tmp/trace]
                                  [--attention xla|cudnn]

Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from dgia_jax.common import config_files, host_memory, parallel
from dgia_jax.evaluation import metrics
from dgia_jax.inference import encoding, rebuild
from dgia_jax.method import identity_graph
from dgia_jax.models import clip, presets
from dgia_jax.training import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUHK_PAIRS, CUHK_TEST_IMAGES, CUHK_TEST_CAPTIONS, EPOCHS = 68126, 3074, 6148, 40


_START = time.perf_counter()


def _progress(message: str):
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


class _ClipTokenizer:  # the facts the model needs from CLIP's tokenizer
  vocab_size, eot_id, context_length, mask_id = 49408, 49407, 77, 49405


def _config(batch: int, attention: str):
  config = config_files.load_config(os.path.join(ROOT, "configs", "default.py"))
  config.model = presets.vit_b16()
  config.model.dtype = "bfloat16"
  config.model.attention = attention
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


def cudnn_preflight(batch: int) -> str | None:
  """None if cuDNN's fused attention runs forward and backward at both towers' shapes (bf16),
  else its error: a refused kernel shows in seconds, not after minutes of compiling the step."""
  config = _config(batch, "cudnn")
  tok = _ClipTokenizer
  cfg = clip.config_from_dict(config.model, config.data.image_size, tok.vocab_size, tok.eot_id, tok.context_length)
  v, t = cfg.vision, cfg.text
  shapes = [(v.grid[0] * v.grid[1] + 1, v.heads, v.width // v.heads, False),  # image tower: patches + class token
            (t.context_length, t.heads, t.width // t.heads, True)]  # text tower, causal
  try:
    for length, heads, dim, causal in shapes:
      q = jnp.ones((batch, length, heads, dim), jnp.bfloat16)
      loss = lambda q, causal=causal: clip.padded_attention(q, q, q, causal, "cudnn").astype(jnp.float32).sum()  # noqa: E731
      jax.block_until_ready(jax.jit(jax.grad(loss))(q))
  except Exception as error:  # noqa: BLE001 (reported in the JSON line; the run falls back to XLA's attention)
    return f"{type(error).__name__}: {error}"
  return None


def measure_step(batch: int, steps: int, profile: str | None, attention: str) -> dict:
  config = _config(batch, attention)
  mesh = parallel.make_mesh()
  steps_per_epoch = CUHK_PAIRS // batch
  built = build.training(config, _ClipTokenizer, steps_per_epoch, CUHK_PAIRS, mesh)
  rows = identity_graph.padded_size(CUHK_PAIRS, mesh)
  state = timing.with_filled_bank(built.state, rows, 512, mesh, seed=0)
  rng = np.random.default_rng(0)
  batch_arrays = parallel.to_global({
      "image": rng.integers(0, 256, size=(batch, 384, 128, 3), dtype=np.uint8),
      "tokens": _tokens(rng, batch),
      "index": rng.choice(CUHK_PAIRS, batch, replace=False).astype(np.int32)}, mesh)
  pids = parallel.global_array(rng.integers(0, 11003, size=rows).astype(np.int32), parallel.data_sharding(mesh))
  _progress(f"batch {batch}: state built; compiling the step")
  step, flops = timing.compile_step(built.step, state, batch_arrays, pids)
  if attention != "xla":  # a fused kernel is a custom call, which cost analysis counts as 0 FLOPs
    xla_step = build.training(_config(batch, "xla"), _ClipTokenizer, steps_per_epoch, CUHK_PAIRS, mesh).step
    flops = xla_step.lower(state, batch_arrays, pids).cost_analysis()["flops"]
  _progress(f"batch {batch}: compiled ({flops / 1e12:.2f} TFLOPs per step); timing {steps} steps")
  seconds, state = timing.seconds_per_step(step, state, batch_arrays, pids, steps, warmup=3)
  _progress(f"batch {batch}: {seconds * 1e3:.1f} ms per step")
  out = {"seconds_per_step": seconds, "pairs_per_s": batch / seconds, "tflops_per_step": flops / 1e12,
         "achieved_tflops": flops / seconds / 1e12, "steps_per_epoch": steps_per_epoch}
  if profile:  # a few more steps under the profiler, kept apart from the timed ones
    trace_dir = os.path.join(profile, f"batch_{batch}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      _, state = timing.seconds_per_step(step, state, batch_arrays, pids, 3, warmup=0)
    out["profile"] = timing.trace_top_ops(trace_dir)
    _progress(f"batch {batch}: profiled")
  return out | {"params": state.params}


def measure_eval(params, batch: int, fraction: float, attention: str) -> tuple[float, float]:
  """Seconds to encode a CUHK-sized test split (scaled by `fraction`) and compute every metric
  both ways: (first pass, compilation of the encoders and metric programs included; a second pass,
  as every later epoch's evaluation in a run)."""
  config = _config(batch, attention)
  mesh = parallel.make_mesh()
  enc_img, enc_txt, _ = encoding.make_encoders(rebuild.build_model(config, _ClipTokenizer), mesh)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(batch, 384, 128, 3), dtype=np.uint8)
  tokens = _tokens(rng, batch)
  num_images = max(batch, int(CUHK_TEST_IMAGES * fraction))
  num_ids = max(1, num_images // 3)
  g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_images - num_ids)])
  q_pids = np.repeat(g_pids, 2)

  def one_pass() -> float:
    start = time.perf_counter()
    img = [parallel.to_host(enc_img(params, parallel.to_global({"x": images}, mesh)["x"]))
           for _ in range(-(-num_images // batch))]
    txt = [parallel.to_host(enc_txt(params, parallel.to_global({"x": tokens}, mesh)["x"]))
           for _ in range(-(-len(q_pids) // batch))]
    metrics.evaluate_retrieval(np.concatenate(txt)[:len(q_pids)], np.concatenate(img)[:num_images], q_pids, g_pids)
    return time.perf_counter() - start

  return one_pass(), one_pass()


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="64,128")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H100/H200 SXM)")
  parser.add_argument("--eval_batch", type=int, default=512)
  parser.add_argument("--eval_fraction", type=float, default=1.0, help="scale the test split (CPU smoke tests)")
  parser.add_argument("--profile", default=None, help="trace 3 steps of the first batch size here and report the busiest ops")
  parser.add_argument("--attention", default="xla", help="model.attention: xla, or cudnn (fused, GPUs)")
  args = parser.parse_args()
  out = {"benchmark": "accelerator", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "flops_source": "XLA cost analysis of the lowered step", "peak_tflops": args.peak_tflops,
         "attention": args.attention}
  attention = args.attention
  if attention == "cudnn":
    refused = cudnn_preflight(int(args.batches.split(",")[0]))
    out["cudnn_preflight"] = refused or "ok"
    if refused:
      _progress(f"cuDNN attention refused ({refused}); measuring with XLA's attention instead")
      attention = out["attention"] = "xla"
  params = None
  for i, batch in enumerate(map(int, args.batches.split(","))):
    m = measure_step(batch, args.steps, args.profile if i == 0 else None, attention)  # profile once
    params = m.pop("params")
    m["mfu"] = m["achieved_tflops"] / args.peak_tflops
    out[f"batch_{batch}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    _progress(f"batch {batch}: {json.dumps(out[f'batch_{batch}'])}")
  _progress("evaluation of a CUHK-PEDES-sized test split")
  first_eval, later_eval = (t / args.eval_fraction for t in measure_eval(params, args.eval_batch, args.eval_fraction, attention))
  out["cuhk_test_eval_seconds"] = {"first": round(first_eval, 2), "later": round(later_eval, 2)}
  first = out[f"batch_{args.batches.split(',')[0]}"]
  train_seconds = EPOCHS * first["steps_per_epoch"] * first["seconds_per_step"]
  out["projected_40_epoch_cuhk_hours"] = round((train_seconds + first_eval + (EPOCHS - 1) * later_eval) / 3600, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
