"""Rank-k / mAP / mINP on a CUHK-PEDES-sized problem: ours vs the field's argsort way.

CUHK-PEDES test: 6,148 captions (queries) × 3,074 images of 1,000 identities. Features are
drawn with identity structure (so positives are near the top, as after training), the
similarity matrix is computed once, and both implementations rank the same matrix:

- ours: `dgia_jax.metrics.rank_metrics` (positive ranks counted in jitted blocks, no sort);
- reference: a whole-row stable argsort and cumulative sums in NumPy, as the field's
  `rank()` does with torch.

Prints one JSON line: seconds for each (ours warm, i.e. after compilation, and cold),
the speed-up, and the largest metric difference between the two.

  python -m benchmarks.eval_metrics
"""

import json
import time

import numpy as np

from dgia_jax.common import host_memory
from dgia_jax.evaluation import metrics

NUM_IDS, NUM_IMAGES, NUM_CAPTIONS, DIM = 1000, 3074, 6148, 512


def argsort_reference(sim: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, max_rank: int = 10) -> dict:
  order = np.argsort(-sim, axis=1, kind="stable")
  matches = g_pids[order] == q_pids[:, None]
  cmc = np.minimum(matches[:, :max_rank].cumsum(1), 1).mean(0) * 100
  hits = matches.cumsum(1)
  ap = (hits / np.arange(1, sim.shape[1] + 1) * matches).sum(1) / matches.sum(1)
  last = sim.shape[1] - np.argmax(matches[:, ::-1], axis=1)
  inp = matches.sum(1) / last
  return {"R1": cmc[0], "R5": cmc[4], "R10": cmc[max_rank - 1], "mAP": 100 * ap.mean(), "mINP": 100 * inp.mean()}


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  rng = np.random.default_rng(0)
  g_pids = np.concatenate([np.arange(NUM_IDS), rng.integers(0, NUM_IDS, NUM_IMAGES - NUM_IDS)])
  q_pids = np.repeat(g_pids, 2)
  centres = rng.normal(size=(NUM_IDS, DIM))
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
  # Noise 2.5 gives CUHK-like figures after training (R1 ~70, mAP ~51, mINP ~23).
  g = unit(centres[g_pids] + 2.5 * rng.normal(size=(NUM_IMAGES, DIM)))
  q = unit(centres[q_pids] + 2.5 * rng.normal(size=(NUM_CAPTIONS, DIM)))
  sim = q @ g.T

  t = time.perf_counter()
  ours = metrics.rank_metrics(sim, q_pids, g_pids)
  cold = time.perf_counter() - t
  t = time.perf_counter()
  ours = metrics.rank_metrics(sim, q_pids, g_pids)
  warm = time.perf_counter() - t
  t = time.perf_counter()
  ref = argsort_reference(sim, q_pids, g_pids)
  reference = time.perf_counter() - t
  print(json.dumps({
      "benchmark": "eval_metrics", "queries": NUM_CAPTIONS, "gallery": NUM_IMAGES,
      "ours_seconds": round(warm, 3), "ours_cold_seconds": round(cold, 3), "argsort_seconds": round(reference, 3),
      "speedup": round(reference / warm, 2), "target_seconds": 2.0,
      "max_metric_difference": float(max(abs(ours[k] - ref[k]) for k in ref)),
      "t2i": {k: round(v, 3) for k, v in ours.items()}}))


if __name__ == "__main__":
  main()
