"""Memory of the compiled train step, and what micro-batches (gradient caching) cost in time.

Part 1, memory: ViT-B/16 at 384×128 with all four losses on and a CUHK-PEDES-sized bank (68,126
pairs), for each dtype, batch, micro-batch (0 = off) and `model.remat`, the compiled step's
memory analysis (`compiled.memory_analysis()`): arguments, outputs, the part of the outputs
aliased to donated arguments (the state), temporaries, and the peak they make,
arguments + outputs − aliased + temporaries. Nothing is allocated: the state is abstract
(`build.training(abstract=True)`), the step only compiled, for this machine's backend.

On CPU, XLA upcasts bfloat16 arithmetic to float32 (the activations it keeps are float32
either way) and its default scheduler orders the program for concurrency, not memory, so that
recomputation (remat) is hoisted and saves nothing. `--scheduler memory` (the default here)
compiles with XLA CPU's memory-minimising list scheduler instead
(`--xla_cpu_enable_concurrency_optimized_scheduler=false`), the closer stand-in for a GPU
compile, whose scheduler is memory-aware; `--scheduler concurrency` keeps XLA's default. A GPU's
own figures need a GPU (docs/BENCHMARKS.md).

Part 2, time: the small CPU model (96×32, batch 64, all four losses, filled bank) steps per
second with micro-batches off, 32 and 16 rows, alternating in one process; the ratios are
chunked / unchunked seconds per step.

  python -m benchmarks.memory [--scheduler memory|concurrency] [--batches 64,128,256] [--micro 0,32,16]
                              [--dtypes bfloat16,float32] [--remat 0,1] [--rounds 3] [--steps 3] [--no_timing]

Prints one JSON line; progress on stderr.
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
from dgia_jax.method import identity_graph
from dgia_jax.models import presets
from dgia_jax.training import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUHK_PAIRS = 68126
GIB = 2 ** 30
_START = time.perf_counter()


class _ClipTokenizer:  # the facts the model needs from CLIP's tokenizer (with the appended mask token)
  vocab_size, eot_id, context_length, mask_id = 49409, 49407, 77, 49408


def config(batch: int, micro: int, dtype: str, remat: bool, small: bool = False):
  """The benchmark recipe (configs/cuhk_pedes.py) with every loss on from the first step."""
  c = config_files.load_config(os.path.join(ROOT, "configs", "cuhk_pedes.py"))
  if small:
    c.model, c.data.image_size, c.iasc.pad = presets.small(), (96, 32), 3
  c.model.dtype, c.model.remat = dtype, remat
  c.train.batch_size, c.train.micro_batch = batch, micro
  c.relations.start_epoch = c.gsrc.start_epoch = 1
  return c


def _batch_specs(c, mesh):
  data, batch = parallel.data_sharding(mesh), c.train.batch_size
  h, w = c.data.image_size
  return ({"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8, sharding=data),
           "tokens": jax.ShapeDtypeStruct((batch, 77), jnp.int32, sharding=data),
           "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)},
          jax.ShapeDtypeStruct((identity_graph.padded_size(CUHK_PAIRS, mesh),), jnp.int32, sharding=data))


def step_memory(batch: int, micro: int, dtype: str, remat: bool) -> dict:
  """GiB of the compiled ViT-B/16 step's arguments, outputs, aliased outputs, temporaries and peak."""
  c = config(batch, micro, dtype, remat)
  mesh = parallel.make_mesh()
  built = build.training(c, _ClipTokenizer, CUHK_PAIRS // batch, CUHK_PAIRS, mesh, abstract=True)
  started = time.perf_counter()
  m = built.step.lower(built.state, *_batch_specs(c, mesh)).compile().memory_analysis()
  parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
  out = {k: round(v / GIB, 3) for k, v in parts.items()}
  out["peak"] = round((parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]) / GIB, 3)
  out["compile_seconds"] = round(time.perf_counter() - started, 1)
  return out


def _small_step(micro: int):
  """(time(n) -> seconds per step) of the small model's step at batch 64 with micro-batches `micro`."""
  c = config(64, micro, "float32", False, small=True)
  mesh = parallel.make_mesh()
  built = build.training(c, _ClipTokenizer, 100, 4000, mesh)
  rows = identity_graph.padded_size(4000, mesh)
  state = timing.with_filled_bank(built.state, rows, c.model.embed_dim, mesh)
  rng = np.random.default_rng(0)
  tokens = np.zeros((64, 77), np.int32)
  for i, n in enumerate(rng.integers(12, 60, size=64)):
    tokens[i, 0], tokens[i, 1:n], tokens[i, n] = 49406, rng.integers(1, 49000, size=n - 1), 49407
  batch = parallel.to_global({"image": rng.integers(0, 256, size=(64, 96, 32, 3), dtype=np.uint8), "tokens": tokens,
                              "index": rng.choice(4000, 64, replace=False).astype(np.int32)}, mesh)
  pids = parallel.global_array(np.zeros(rows, np.int32), parallel.data_sharding(mesh))
  step, _ = timing.compile_step(built.step, state, batch, pids)
  return timing.step_timer(step, state, batch, pids)


def _set_scheduler(scheduler: str) -> None:
  """XLA CPU's memory-minimising scheduler, or its default; read when JAX starts its backend."""
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  if scheduler == "memory" and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}=false").strip()


def _progress(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--scheduler", choices=("memory", "concurrency"), default="memory")
  parser.add_argument("--batches", default="64,128,256")
  parser.add_argument("--micro", default="0,32,16", help="micro-batch rows; 0 = off")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--remat", default="0,1")
  parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (part 2)")
  parser.add_argument("--steps", type=int, default=3, help="steps per timing round")
  parser.add_argument("--no_timing", action="store_true", help="part 1 only")
  args = parser.parse_args()
  _set_scheduler(args.scheduler)  # before the backend starts
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  out = {"benchmark": "memory", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "scheduler": args.scheduler, "model": "ViT-B/16 384x128, all four losses, bank of 68,126 pairs",
         "units": "GiB", "vit_b16": {}}
  for dtype in args.dtypes.split(","):
    for batch in map(int, args.batches.split(",")):
      for micro in map(int, args.micro.split(",")):
        if micro and (micro >= batch or batch % micro):
          continue
        for remat in map(int, args.remat.split(",")):
          key = f"{dtype}/batch_{batch}/micro_{micro or 'off'}/remat_{'on' if remat else 'off'}"
          out["vit_b16"][key] = step_memory(batch, micro, dtype, bool(remat))
          _progress(f"{key}: {json.dumps(out['vit_b16'][key])}")
  if not args.no_timing:
    steps = {micro: _small_step(micro) for micro in (0, 32, 16)}
    rounds = {micro: [] for micro in steps}
    for _ in range(args.rounds):  # alternating, so a slow spell of a shared machine hits all alike
      for micro, time_steps in steps.items():
        rounds[micro].append(time_steps(args.steps))
    median = {micro: float(np.median(r)) for micro, r in rounds.items()}
    out["small_step_seconds"] = {f"micro_{m or 'off'}": {"median": round(s, 4), "rounds": [round(x, 4) for x in rounds[m]]}
                                 for m, s in median.items()}
    out["chunked_over_unchunked"] = {f"micro_{m}": round(median[m] / median[0], 3) for m in (32, 16)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
