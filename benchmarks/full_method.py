"""Cost of the full method over ITC alone: FLOPs expected vs time measured, same step.

The full step encodes every pair twice (the pair and its information-asymmetric partner)
and adds the in-batch relation losses and the sharded bank search. The towers dominate,
so the FLOP ratio full/ITC should be close to 2 (XLA's cost analysis of the two programs gives
the exact figure); the target is a measured time ratio within 10 % of the FLOP ratio, i.e.
no overhead beyond the arithmetic.

Prints one JSON line: FLOPs per step (XLA cost analysis), seconds per step (median of
alternating rounds, every round listed), and both ratios, for the default CPU config at
batch 64 with a bank of N = 4,000 pairs.

  python -m benchmarks.full_method [--steps 5] [--rounds 3]
"""

import argparse
import json
import os

import jax
import numpy as np

from benchmarks import timing
from dgia_jax.common import config_files, host_memory, parallel
from dgia_jax.method import identity_graph
from dgia_jax.training import build

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
NUM_PAIRS = 4000


class _Tok:  # the facts the model needs from a tokenizer
  vocab_size, eot_id, context_length, mask_id = 256, 255, 48, 254


def build_step(full: bool, images, tokens, index):
  """(time_steps(n) -> seconds per step, GFLOPs per step) of the ITC-only or the full step."""
  config = config_files.load_config(DEFAULT_CONFIG)
  config.loss.update(dict(lrc=full, iasc=full, gsrc=full))
  config.relations.start_epoch = config.gsrc.start_epoch = 1  # everything on from the first step
  mesh = parallel.make_mesh()
  built = build.training(config, _Tok, 100, NUM_PAIRS, mesh)
  rows = identity_graph.padded_size(NUM_PAIRS, mesh)
  state = timing.with_filled_bank(built.state, rows, config.model.embed_dim, mesh) if full else built.state
  batch = parallel.to_global({"image": images, "tokens": tokens, "index": index}, mesh)
  pids = parallel.global_array(np.zeros(rows, np.int32), parallel.data_sharding(mesh))
  step, flops = timing.compile_step(built.step, state, batch, pids)
  return timing.step_timer(step, state, batch, pids), flops / 1e9


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating ITC/full timing rounds")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  batch = 64
  images = rng.integers(0, 256, size=(batch, 96, 32, 3), dtype=np.uint8)
  tokens = np.zeros((batch, _Tok.context_length), np.int32)
  for i, n in enumerate(rng.integers(12, 40, size=batch)):
    tokens[i, 0], tokens[i, 1:n], tokens[i, n] = 1, rng.integers(5, 250, size=n - 1), _Tok.eot_id
  index = rng.choice(NUM_PAIRS, batch, replace=False).astype(np.int32)
  steps = {"itc": build_step(False, images, tokens, index), "full": build_step(True, images, tokens, index)}
  rounds = {name: [] for name in steps}
  for _ in range(args.rounds):  # alternating, so that drift in the machine's speed hits both alike
    for name, (time_steps, _) in steps.items():
      rounds[name].append(time_steps(args.steps))
  itc, full = ({"gflops_per_step": steps[name][1], "seconds_per_step": float(np.median(rounds[name])),
                "rounds": [round(r, 4) for r in rounds[name]]} for name in ("itc", "full"))
  flop_ratio = full["gflops_per_step"] / itc["gflops_per_step"]
  time_ratio = full["seconds_per_step"] / itc["seconds_per_step"]
  print(json.dumps({
      "benchmark": "full_method", "device": jax.devices()[0].device_kind, "batch": batch, "bank_rows": NUM_PAIRS,
      "itc": {k: round(v, 4) if isinstance(v, float) else v for k, v in itc.items()},
      "full": {k: round(v, 4) if isinstance(v, float) else v for k, v in full.items()},
      "flop_ratio": round(flop_ratio, 3), "time_ratio": round(time_ratio, 3),
      "time_over_flop_ratio": round(time_ratio / flop_ratio, 3), "target": "time ratio within 10% of FLOP ratio"}))


if __name__ == "__main__":
  main()
