"""Timing a jitted train step: warm up (compilation included), then time `steps` steps; its FLOPs."""

import time

import jax


def seconds_per_step(step, state, batch, pair_pids, steps: int, warmup: int = 2):
  """Mean seconds of `step(state, batch, pair_pids)` over `steps` runs; returns (seconds, state)."""
  for _ in range(warmup):
    state, metrics, _ = step(state, batch, pair_pids)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics, _ = step(state, batch, pair_pids)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


def step_flops(step, state, batch, pair_pids) -> float:
  """FLOPs of one `step(state, batch, pair_pids)` from XLA's cost analysis of the compiled program."""
  return step.lower(state, batch, pair_pids).compile().cost_analysis()["flops"]
