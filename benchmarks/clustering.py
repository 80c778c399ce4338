"""Pseudo-identity clustering at CUHK-PEDES size and at millions: sparse k-reciprocal Jaccard + DBSCAN.

Synthetic 512-d features with CUHK-PEDES-like cluster sizes: 11,003 ids, and either
34,054 points (the train images, ~3.1 per id with a spread) or 68,126 points (the field's
image bank has one row per image-caption pair, ~6.2 per id). Ours is
`dgia_jax.clustering.cluster_images`; the reference is the field's dense re-ranking
(`dense_jaccard_distance` below: N × N similarities, encodings and distances, as
SpCL / cluster-contrast / ICPG compute them) followed by DBSCAN on the dense matrix. It runs
at the largest N whose two N × N float32 matrices (its peak: V with its query
expansion, then V with the distances) fit `--dense_gb`, and ours runs at that
N too for the ratios and the agreement of the two labelings (ARI, each outlier a cluster of its own).

Past `relations.clusters.ann_threshold` the k-NN graph comes from an inverted-file search over three
independent k-means partitions instead of the exact search ("ann"): it runs at `--ann_sizes` (past CUHK-PEDES, ~6.2 points per id as in its pair
bank), and at the first of them beside the exact path too, for the agreement of the two labelings.

Every run is a fresh process, so each peak RSS is that run's own. Prints one JSON line.

  python -m benchmarks.clustering [--sizes 34054,68126] [--dense_gb 6] [--ann_sizes 68126,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_IDS, NUM_IMAGES, NUM_PAIRS, DIM = 11_003, 34_054, 68_126, 512
NOISE = 0.75  # norm of the noise added to a unit centre
TARGET_SECONDS, TARGET_GB = 120.0, 4.0  # at N = 68,126 on a 2-core CPU


def cluster_sizes(num_ids: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
  """int64 [num_ids]: sizes ≥ 1 summing to num_points, 1 + Poisson around the mean."""
  sizes = 1 + rng.poisson(num_points / num_ids - 1, num_ids)
  while (excess := int(sizes.sum()) - num_points) != 0:
    pick = rng.choice(np.flatnonzero(sizes > 1) if excess > 0 else num_ids, abs(excess))
    np.add.at(sizes, pick, -np.sign(excess))
    sizes = np.maximum(sizes, 1)
  return sizes


def num_ids_for(num_points: int) -> int:
  """CUHK-PEDES's 11,003 ids from its 34,054 images to its 68,126 pairs; below, ~3.1 points per id,
  past it ~6.2 (a collection of millions as many crops per person as CUHK-PEDES's pair bank)."""
  if num_points < NUM_IMAGES:
    return max(1, round(num_points * NUM_IDS / NUM_IMAGES))
  return NUM_IDS if num_points <= NUM_PAIRS else round(num_points * NUM_IDS / NUM_PAIRS)


def clustered_features(num_ids: int, num_points: int, dim: int = DIM, noise: float = NOISE,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(unit features float32 [N, dim], generating ids int64 [N]), in random order.

  Centres are uniform on the sphere; a point is its centre plus Gaussian noise of norm
  ~`noise`, so same-id cosine is ~1 / (1 + noise²) and other pairs ~0.
  """
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.repeat(np.arange(num_ids), cluster_sizes(num_ids, num_points, rng)))
  centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  x = centres[ids] + np.float32(noise / np.sqrt(dim)) * rng.standard_normal((num_points, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True), ids


def dense_jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6) -> np.ndarray:
  """float32 [N, N]: the field's dense k-reciprocal Jaccard distance of unit features [N, D].

  Straightforward re-ranking on N × N matrices (reference for tests and this benchmark):
  full distances, per-row reciprocal sets and expansion, dense encodings V and their
  query expansion, then the inverted-index Jaccard loop. Rows rank themselves first and
  break ties by index, as `clustering.nearest_neighbours` does.
  """
  x = np.asarray(features, np.float32)
  n = len(x)
  dist = 2.0 - 2.0 * (x @ x.T)
  rank = np.empty((n, k1 + 1), np.int64)
  for s in range(0, n, 1024):
    chunk = dist[s:s + 1024].copy()
    chunk[np.arange(len(chunk)), np.arange(s, s + len(chunk))] = -np.inf
    rank[s:s + 1024] = np.argsort(chunk, axis=1, kind="stable")[:, :k1 + 1]

  def reciprocal(i: int, k: int) -> np.ndarray:
    forward = rank[i, :k + 1]
    return forward[(rank[forward, :k + 1] == i).any(1)]

  v = np.zeros((n, n), np.float32)
  for i in range(n):
    near = reciprocal(i, k1)
    expanded = near
    for c in near:
      half = reciprocal(c, int(np.around(k1 / 2)))
      if len(np.intersect1d(half, near)) > 2 / 3 * len(half):
        expanded = np.append(expanded, half)
    expanded = np.unique(expanded)
    weight = np.exp(-dist[i, expanded].astype(np.float64))
    v[i, expanded] = weight / weight.sum()
  del dist
  if k2 > 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = v[rank[i, :k2]].mean(0)
    v = v_qe
    del v_qe
  cols, rows = np.nonzero(v.T)
  holders = np.split(rows, np.cumsum(np.bincount(cols, minlength=n))[:-1])  # rows with V[row, l] ≠ 0, per l
  jaccard = np.empty((n, n), np.float32)
  for i in range(n):
    shared = np.zeros(n)
    for l in np.flatnonzero(v[i]):
      shared[holders[l]] += np.minimum(v[i, l], v[holders[l], l])
    jaccard[i] = np.maximum(1.0 - shared / (2.0 - shared), 0.0)
  return jaccard


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_one(method: str, n: int, labels_path: str) -> dict:
  """Clusters N synthetic points with `method` in this process: 'sparse' (exact k-NN), 'ann' (partitioned k-NN)
  or 'dense' (the field's reference)."""
  from sklearn.cluster import DBSCAN

  from dgia_jax.method import clustering

  x, ids = clustered_features(num_ids_for(n), n)
  cfg = clustering.DEFAULTS
  start = time.perf_counter()
  if method in ("sparse", "ann"):
    labels = clustering.cluster_images(x, np.arange(n), **cfg, ann_threshold=0 if method == "ann" else n)
  else:
    distance = dense_jaccard_distance(x, cfg["k1"], cfg["k2"])
    labels = DBSCAN(eps=cfg["eps"], min_samples=cfg["min_samples"], metric="precomputed").fit_predict(distance)
  seconds = time.perf_counter() - start
  np.save(labels_path, labels)
  quality = clustering.label_quality(labels, ids)
  return {"method": method, "n": n, "seconds": round(seconds, 2), "peak_rss_gb": round(peak_rss_gb(), 3),
          **{k: round(v, 4) if isinstance(v, float) else v for k, v in quality.items()}}


def in_fresh_process(method: str, n: int, labels_path: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.clustering", "--run", method, "--n", str(n), "--labels", labels_path]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{method} N={n} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_size(gigabytes: float) -> int:
  """Largest N (a multiple of 1,000) whose two N × N float32 matrices fit `gigabytes`."""
  return int(np.sqrt(gigabytes * 2**30 / 8) // 1000 * 1000)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default=f"{NUM_IMAGES},{NUM_PAIRS}")
  parser.add_argument("--dense_gb", type=float, default=6.0, help="memory for the dense reference's matrices")
  parser.add_argument("--ann_sizes", default=f"{NUM_PAIRS},1000000", help="sizes clustered with the partitioned (approximate) k-NN graph")
  parser.add_argument("--run", choices=("sparse", "ann", "dense"), help=argparse.SUPPRESS)
  parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--labels", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run:
    print(json.dumps(run_one(args.run, args.n, args.labels)))
    return

  from sklearn import metrics

  from dgia_jax.method import clustering

  with tempfile.TemporaryDirectory() as tmp:
    path = lambda name: os.path.join(tmp, f"{name}.npy")  # noqa: E731
    sparse = [in_fresh_process("sparse", int(n), path(f"sparse{n}")) for n in args.sizes.split(",")]
    n_dense = dense_size(args.dense_gb)
    dense = in_fresh_process("dense", n_dense, path("dense"))
    same_n = in_fresh_process("sparse", n_dense, path("same_n"))
    agreement = metrics.adjusted_rand_score(*(clustering.outliers_as_singletons(np.load(path(name)))
                                              for name in ("dense", "same_n")))
    ann = []
    for n in map(int, args.ann_sizes.split(",")):
      ann.append(in_fresh_process("ann", n, path(f"ann{n}")))
      print(json.dumps(ann[-1]), file=sys.stderr, flush=True)
    n_both = int(args.ann_sizes.split(",")[0])
    exact = next((r for r in sparse if r["n"] == n_both), None) or in_fresh_process("sparse", n_both, path(f"sparse{n_both}"))
    ann_vs_exact = metrics.adjusted_rand_score(*(clustering.outliers_as_singletons(np.load(path(f"{name}{n_both}")))
                                                 for name in ("sparse", "ann")))
  largest = max(sparse, key=lambda r: r["n"])
  print(json.dumps({
      "benchmark": "clustering", "dim": DIM, "noise": NOISE, "cpus": os.cpu_count(),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "sparse": sparse,
      "dense_reference": dense,
      "sparse_at_dense_n": same_n,
      "dense_vs_sparse_ari": round(float(agreement), 5),
      "speedup_at_dense_n": round(dense["seconds"] / same_n["seconds"], 2),
      "memory_ratio_at_dense_n": round(dense["peak_rss_gb"] / same_n["peak_rss_gb"], 2),
      "dense_gb_at_largest_n": round(2 * 4 * largest["n"] ** 2 / 2**30, 1),
      "ann": ann, "ann_vs_exact": {"n": n_both, "ari": round(float(ann_vs_exact), 5),
                                   "speedup": round(exact["seconds"] / ann[0]["seconds"], 2)},
      "target": {"n": NUM_PAIRS, "seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_GB,
                 "met": largest["n"] == NUM_PAIRS and largest["seconds"] < TARGET_SECONDS
                        and largest["peak_rss_gb"] < TARGET_GB}}))


if __name__ == "__main__":
  main()
