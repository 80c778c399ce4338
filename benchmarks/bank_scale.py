"""The global relations' memory banks at millions of rows: per-device memory and the train step's cost
against N, on 8 simulated devices (`--xla_force_host_platform_device_count=8`), with the real step of
the small model (all four losses on, batch 64); and what bfloat16 bank storage changes.

For each N (training pairs) × D (embedding width) × storage dtype whose two banks fit `--budget_gib`:
the step compiled for that bank (`build.training`: the banks sharded over the 8 devices along N), its
memory analysis per device (arguments, temporaries), a check that no bank-sized array is gathered onto
one device (no [N_pad, D] shape in the compiled program: every device holds N_pad / 8 rows), and the
seconds per step of `--steps` real steps (after a warm-up). Speed does not depend on the banks' values,
so they are left unfilled (the search still scores every row). Then:

- bfloat16 against float32 storage: the same 1 M × D clustered features stored both ways, 1,024 anchors
  searched (`identity_graph.search_neighbours`, k = 3, threshold 0.7): the share of candidate lists and of
  selected (over-threshold) neighbours that are the same, and the largest cosine difference;
- the epoch order of 5 M pairs: one permutation per epoch (seconds), and a step's 64 lookups (microseconds).

Prints one JSON line; progress on stderr. Figures past what this 24 GB machine holds are extrapolated in
docs/SCALE.md from the measured per-row costs, and marked so.

  python -m benchmarks.bank_scale [--sizes 68126,1000000,2000000,5000000] [--dims 128,512]
                                  [--dtypes float32,bfloat16] [--steps 3] [--budget_gib 12]
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from dgia_jax.common import config_files, host_memory, parallel  # noqa: E402
from dgia_jax.data.pipeline import EpochOrder  # noqa: E402
from dgia_jax.method import identity_graph  # noqa: E402
from dgia_jax.models import presets  # noqa: E402
from dgia_jax.training import build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
BATCH, CONTEXT = 64, 48
_START = time.perf_counter()


class _Tokenizer:  # what the model needs of a tokenizer
  vocab_size, eot_id, context_length, mask_id = 1000, 999, CONTEXT, 998


def _progress(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def config(dim: int, dtype: str):
  c = config_files.load_config(os.path.join(ROOT, "configs", "default.py"))
  c.model, c.model.embed_dim = presets.small(), dim
  c.data.context_length, c.train.batch_size, c.gsrc.bank_dtype = CONTEXT, BATCH, dtype
  c.relations.start_epoch = c.gsrc.start_epoch = 1
  return c


def _batch(mesh, n: int, rng):
  tokens = np.zeros((BATCH, CONTEXT), np.int32)
  for i, length in enumerate(rng.integers(8, CONTEXT - 2, size=BATCH)):
    tokens[i, 0], tokens[i, 1:length], tokens[i, length] = 997, rng.integers(1, 990, size=length - 1), 999
  return parallel.to_global({"image": rng.integers(0, 256, size=(BATCH, 96, 32, 3), dtype=np.uint8), "tokens": tokens,
                             "index": rng.choice(n, BATCH, replace=False).astype(np.int32)}, mesh)


def step_at(n: int, dim: int, dtype: str, steps: int) -> dict:
  """Memory and seconds per step of the small model's step with banks of `n` rows × `dim`."""
  mesh = parallel.make_mesh()
  c = config(dim, dtype)
  built = build.training(c, _Tokenizer, 1000, n, mesh)
  padded = identity_graph.padded_size(n, mesh)
  rng = np.random.default_rng(0)
  batch = _batch(mesh, n, rng)
  pids = parallel.global_array(np.full(padded, -1, np.int32), parallel.data_sharding(mesh))
  started = time.perf_counter()
  compiled, flops = timing.compile_step(built.step, built.state, batch, pids)
  compile_seconds = time.perf_counter() - started
  hlo = compiled.as_text()
  gathered = any(f"[{padded},{dim}]" in line for line in hlo.splitlines())
  m = compiled.memory_analysis()
  seconds = timing.step_timer(compiled, built.state, batch, pids)(steps)
  bank_bytes = 2 * padded * dim * jnp.dtype(dtype).itemsize
  return {"rows": n, "dim": dim, "dtype": dtype, "devices": len(mesh.devices.ravel()),
          "bank_gib_per_device": round(bank_bytes / 8 / GIB, 3), "bank_gib_total": round(bank_bytes / GIB, 3),
          "arguments_gib_per_device": round(m.argument_size_in_bytes / GIB, 3),
          "temporaries_gib_per_device": round(m.temp_size_in_bytes / GIB, 3),
          "bank_gathered_on_one_device": gathered, "compile_seconds": round(compile_seconds, 1),
          "seconds_per_step": round(seconds, 4), "gflop_per_step": round(flops / 1e9, 2),
          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}


def bfloat16_agreement(n: int, dim: int, anchors: int = 1024, k: int = 3, threshold: float = 0.7) -> dict:
  """Candidates of `anchors` anchors searched in the same clustered bank stored as float32 and bfloat16."""
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(1)
  ids = n // 20  # about 20 rows per identity: near neighbours above the threshold exist
  centres = rng.normal(size=(ids, dim)).astype(np.float32)
  padded = identity_graph.padded_size(n, mesh)

  def shard(index):
    rows = np.arange(padded)[index[0]]
    r = np.random.default_rng([2, int(rows[0])])
    x = centres[rows % ids] + 0.35 * r.normal(size=(len(rows), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  data = parallel.data_sharding(mesh)
  f32 = jax.make_array_from_callback((padded, dim), data, shard)
  filled = jax.device_put(jnp.arange(padded) < n, data)
  probe = rng.choice(n, anchors, replace=False)
  anchor = np.asarray(f32[jnp.asarray(probe)])  # the probed rows themselves (their own row is excluded)
  out = {}
  for dtype in ("float32", "bfloat16"):
    image = f32.astype(dtype)
    bank = identity_graph.MemoryBank(image=image, text=image, filled=filled)
    sims, rows, valid = jax.jit(lambda b, a, i: identity_graph.search_neighbours(b, a, i, k, threshold, mesh))(
        bank, jnp.asarray(anchor), jnp.asarray(probe, jnp.int32))
    out[dtype] = (np.asarray(sims), np.asarray(rows), np.asarray(valid))
  (s32, r32, v32), (s16, r16, v16) = out["float32"], out["bfloat16"]
  same_lists = float(np.mean([set(a) == set(b) for a, b in zip(r32, r16)]))
  selected = [(set(a[va]), set(b[vb])) for a, b, va, vb in zip(r32, r16, v32, v16)]
  same_selected = float(np.mean([x == y for x, y in selected]))
  jaccard = float(np.mean([len(x & y) / max(len(x | y), 1) for x, y in selected]))
  return {"rows": n, "dim": dim, "anchors": anchors, "k": k, "threshold": threshold,
          "same_candidate_lists": round(same_lists, 4), "same_selected_neighbours": round(same_selected, 4),
          "selected_jaccard": round(jaccard, 4), "selected_per_anchor_float32": round(float(v32.sum(1).mean()), 3),
          "max_cosine_difference": float(np.abs(s32 - s16).max())}


def epoch_order(pairs: int = 5_000_000) -> dict:
  order = EpochOrder(pairs, BATCH, seed=0)
  started = time.perf_counter()
  order.permutation(0)
  permutation = time.perf_counter() - started
  started = time.perf_counter()
  for step in range(100):
    for row in range(BATCH):
      order.pair(step, row)
  per_step = (time.perf_counter() - started) / 100
  return {"pairs": pairs, "permutation_seconds": round(permutation, 3), "lookups_per_step_microseconds": round(
      per_step * 1e6, 1), "steps_per_epoch": order.steps_per_epoch}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="68126,1000000,2000000,5000000")
  parser.add_argument("--dims", default="128,512")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--budget_gib", type=float, default=12.0, help="the most both banks may take, all devices")
  parser.add_argument("--agreement_rows", type=int, default=1_000_000)
  args = parser.parse_args()
  host_memory.retain_freed_memory()
  out = {"benchmark": "bank_scale", "backend": jax.default_backend(), "devices": jax.device_count(),
         "model": "small preset (4x128 towers), all four losses, batch 64", "steps": [], "skipped": []}
  for dim in map(int, args.dims.split(",")):
    for dtype in args.dtypes.split(","):
      for n in map(int, args.sizes.split(",")):
        need = 2 * n * dim * jnp.dtype(dtype).itemsize / GIB
        if need > args.budget_gib:
          out["skipped"].append({"rows": n, "dim": dim, "dtype": dtype, "bank_gib_total": round(need, 2)})
          continue
        out["steps"].append(step_at(n, dim, dtype, args.steps))
        _progress(json.dumps(out["steps"][-1]))
  out["bfloat16_agreement"] = bfloat16_agreement(args.agreement_rows, 512)
  _progress(json.dumps(out["bfloat16_agreement"]))
  out["epoch_order"] = epoch_order()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
