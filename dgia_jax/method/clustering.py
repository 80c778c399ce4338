"""Image-anchored pseudo identities: k-reciprocal Jaccard distance, then DBSCAN, all sparse.

Every training image is a point; images of one pseudo identity (one DBSCAN cluster) are
taken as the same person, and the captions of an image inherit its label. The distance is
the k-reciprocal Jaccard distance of Zhong et al. 2017 ("Re-ranking person
re-identification with k-reciprocal encoding"), as used by the clustering-based re-id and
text-person methods, computed without any N × N matrix:

1. `nearest_neighbours`: cosine k-NN, k1 + 1 per row (the row itself first): exact, from jitted
   query-block matmuls, up to `ann_threshold` points; past it approximate, from three k-means
   partitions, each point searched among the points stored in its cell (3 · (N / 256 + 4,096)
   comparisons a point instead of N: ~40× fewer at a million points, 13 minutes on 2 CPU cores,
   docs/SCALE.md).
2. `expanded_neighbours`: R(i, k) = {j among i's k + 1 nearest with i among j's k + 1
   nearest}; E(i) = R(i, k1) plus R(c, k1/2) for each c in R(i, k1) that shares more than
   2/3 of R(c, k1/2) with R(i, k1).
3. `encode`: V[i, j] = softmax over j in E(i) of -|x_i - x_j|² (each row sums to 1).
4. `query_expansion`: V[i] ← mean of V over i's k2 nearest (itself included).
5. `jaccard_distance`: d(i, j) = 1 - Σ min(V_i, V_j) / Σ max(V_i, V_j) = 1 - m / (2 - m)
   with m = Σ_l min(V_il, V_jl), only for pairs that share a column l (others are 1).
6. `dbscan_labels`: DBSCAN on the sparse distances (absent entries are not neighbours).

Memory is O(N · k1 · k2) for V and O(N · s) for the distances, s the number of pairs per
row sharing a column; the Jaccard step is O(N · s̄) work, evaluated in row blocks.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from dgia_jax.evaluation import metrics as retrieval_metrics

# The field's settings (SpCL, cluster-contrast, ICPG): the keyword arguments of `cluster_images`.
DEFAULTS = {"k1": 30, "k2": 6, "eps": 0.6, "min_samples": 4, "block": 1024}

_PAIRS_PER_BLOCK = 1 << 20  # Jaccard step: (row, shared column, other row) triples per block


def unit_rows(features: np.ndarray) -> np.ndarray:
  """float32 [N, D]: rows scaled to unit L2 norm."""
  x = np.asarray(features, np.float32)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
    bad = np.flatnonzero(~(norms[:, 0] > 0) | ~np.isfinite(norms[:, 0]))
    raise ValueError(f"features: rows {bad[:10].tolist()} ({len(bad)} in all) have zero or non-finite norm")
  return x / norms


ANN_THRESHOLD = 200_000  # points past which the k-NN graph is approximate (inverted-file search)
CELL_POINTS, PROBED_CELLS, PARTITIONS = 256, 16, 3  # past it: mean rows a cell, cells a row is stored in, partitions


def nearest_neighbours(features: np.ndarray, k: int, block: int = 1024, ann_threshold: int = ANN_THRESHOLD) -> np.ndarray:
  """int64 [N, k + 1]: each row's k + 1 most cosine-similar rows, itself first.

  `features` [N, D] are unit rows. Up to `ann_threshold` rows, exact search, `block` query rows per
  jitted matmul, equal similarities keeping the lower index first; past it, an inverted-file search
  (approximate; `_cell_neighbours`). If duplicates push a row out of its own top k + 1, it is still
  put first and the last neighbour dropped.
  """
  n = len(features)
  if not 0 < k < n:
    raise ValueError(f"need 0 < k < N for a {k}-NN graph of {n} points")
  if n > ann_threshold:
    idx = _cell_neighbours(features, k + 1)
  else:
    _, idx = retrieval_metrics.top_k(features, features, k + 1, block)
  idx = idx.astype(np.int64)
  own = np.arange(n)[:, None]
  is_self = idx == own
  order = np.argsort(np.where(is_self, -1, np.arange(k + 1)), axis=1, kind="stable")
  idx = np.take_along_axis(idx, order, 1)
  lost = ~is_self.any(1)
  idx[lost] = np.concatenate([own[lost], idx[lost, :-1]], 1)
  return idx


def _cell_neighbours(features: np.ndarray, k: int, cell_points: int = CELL_POINTS, probe: int = PROBED_CELLS,
                     partitions: int = PARTITIONS, block: int = 1024) -> np.ndarray:
  """int64 [N, k]: approximate cosine k-NN of unit rows [N, D], from `partitions` independent ones.

  Each partition has N // `cell_points` centroids (spherical k-means: 4 rounds on a sample of 8
  rows a centroid, its own seed); a row is stored in its `probe` nearest cells and searched exactly
  among the rows stored in its nearest one, `block` rows at a time. A neighbour is missed only if
  every partition misses it. About partitions · N · (N / cell_points + probe · cell_points) · D
  multiply-adds instead of N² · D. Neighbours are in decreasing similarity, equal ones by index.
  """
  x = np.ascontiguousarray(features, np.float32)
  found = [_partition_neighbours(x, k, cell_points, probe, seed, block) for seed in range(partitions)]
  idx = np.concatenate([f[0] for f in found], 1)
  sims = np.concatenate([f[1] for f in found], 1)
  order = np.lexsort((-sims, idx), axis=1)  # by index: a row found twice is adjacent, kept once
  idx, sims = np.take_along_axis(idx, order, 1), np.take_along_axis(sims, order, 1)
  sims[:, 1:][idx[:, 1:] == idx[:, :-1]] = -np.inf
  order = np.lexsort((idx, -sims), axis=1)[:, :k]
  return np.take_along_axis(idx, order, 1)


def _partition_neighbours(x: np.ndarray, k: int, cell_points: int, probe: int, seed: int,
                          block: int) -> tuple[np.ndarray, np.ndarray]:
  """(int64 [N, k] neighbours, float32 [N, k] similarities) of unit rows x [N, D] in one k-means partition."""
  n = len(x)
  rng = np.random.default_rng(seed)
  num_cells = max(1, n // cell_points)
  probe = min(probe, num_cells)
  sample = x[np.sort(rng.choice(n, min(n, 8 * num_cells), replace=False))]
  centroids = sample[rng.choice(len(sample), num_cells, replace=False)]
  for _ in range(4):
    nearest = retrieval_metrics.top_k(sample, centroids, 1, block)[1][:, 0]
    members = sparse.csr_matrix((np.ones(len(sample), np.float32), (nearest, np.arange(len(sample)))),
                                shape=(num_cells, len(sample)))
    sums = members @ sample
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-30), centroids)  # an empty cell keeps its centroid
  cells = retrieval_metrics.top_k(x, centroids, probe, block)[1]  # [N, probe], nearest first
  home, home_bounds = _grouped(cells[:, 0], num_cells)  # rows by their nearest cell
  stored, stored_bounds = _grouped(cells.ravel(), num_cells)  # rows by each of their `probe` cells
  stored //= probe
  idx, sims = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
  for c in np.flatnonzero(np.diff(home_bounds)):
    candidates = np.sort(stored[stored_bounds[c]:stored_bounds[c + 1]])
    if len(candidates) < k:  # few rows stored here: add the nearest cells' own rows, nearest first
      for j in np.argsort(-(centroids @ centroids[c]), kind="stable"):
        candidates = np.union1d(candidates, home[home_bounds[j]:home_bounds[j + 1]])
        if len(candidates) >= k:
          break
    rows, gallery = home[home_bounds[c]:home_bounds[c + 1]], x[candidates].T
    for start in range(0, len(rows), block):
      block_sims = x[rows[start:start + block]] @ gallery
      top = np.argpartition(-block_sims, k - 1, axis=1)[:, :k]
      idx[rows[start:start + block]] = candidates[top]
      sims[rows[start:start + block]] = np.take_along_axis(block_sims, top, 1)
  return idx, sims


def _grouped(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions int64 [M] sorted by key, stably; bounds int64 [num_keys + 1]) of keys int [M] in [0, num_keys)."""
  order = np.argsort(keys, kind="stable")
  return order, np.searchsorted(keys[order], np.arange(num_keys + 1))


def _rows_graph(cols: np.ndarray, n: int) -> sparse.csr_matrix:
  """int32 [N, N] CSR with ones at (i, cols[i, t]); `cols` [N, m] holds distinct columns per row."""
  m = cols.shape[1]
  return sparse.csr_matrix((np.ones(cols.size, np.int32), cols.ravel(), np.arange(0, cols.size + 1, m)),
                           shape=(n, n))


def reciprocal_neighbours(rank: np.ndarray, k: int) -> sparse.csr_matrix:
  """int32 [N, N] 0/1, symmetric: j ∈ R(i, k), i.e. j is among i's k + 1 nearest and i among j's.

  `rank` [N, >= k + 1] are `nearest_neighbours` rows (self first), so i ∈ R(i, k).
  """
  forward = _rows_graph(rank[:, :k + 1], len(rank))
  return forward.multiply(forward.T).tocsr()


def expanded_neighbours(rank: np.ndarray, k1: int) -> sparse.csr_matrix:
  """int32 [N, N] 0/1: E(i) = R(i, k1) ∪ R(c, k1/2) for each c ∈ R(i, k1) with |R(c, k1/2) ∩ R(i, k1)| > 2/3 |R(c, k1/2)|."""
  full = reciprocal_neighbours(rank, k1)
  half = reciprocal_neighbours(rank, int(np.around(k1 / 2)))
  shared = (full @ half).multiply(full).tocoo()  # half is symmetric: [i, c] = |R(c, k1/2) ∩ R(i, k1)|
  half_size = half.getnnz(axis=1)
  keep = 3 * shared.data > 2 * half_size[shared.col]
  accepted = sparse.csr_matrix((np.ones(keep.sum(), np.int32), (shared.row[keep], shared.col[keep])),
                               shape=full.shape)
  expanded = (full + accepted @ half).tocsr()
  expanded.data[:] = 1
  return expanded


def _row_of_entries(m: sparse.csr_matrix) -> np.ndarray:
  return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


def _pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
  """float32 [E]: x[rows[e]] · x[cols[e]], gathered `chunk` pairs at a time."""
  out = np.empty(len(rows), np.float32)
  for s in range(0, len(rows), chunk):
    out[s:s + chunk] = np.einsum("ed,ed->e", x[rows[s:s + chunk]], x[cols[s:s + chunk]])
  return out


def encode(features: np.ndarray, sets: sparse.csr_matrix) -> sparse.csr_matrix:
  """float32 [N, N]: V[i, j] = exp(-|x_i - x_j|²) / Σ_{j' ∈ E(i)} exp(-|x_i - x_j'|²) on the pattern of `sets`.

  `features` [N, D] are unit rows, so |x_i - x_j|² = 2 - 2 x_i · x_j.
  """
  sets = sets.tocsr()
  sets.sort_indices()
  rows = _row_of_entries(sets)
  weight = np.exp(-(2.0 - 2.0 * _pair_dots(features, rows, sets.indices).astype(np.float64)))
  weight /= np.bincount(rows, weights=weight, minlength=sets.shape[0])[rows]
  return sparse.csr_matrix((weight.astype(np.float32), sets.indices.copy(), sets.indptr.copy()), shape=sets.shape)


def query_expansion(v: sparse.csr_matrix, rank: np.ndarray, k2: int) -> sparse.csr_matrix:
  """float32 [N, N]: row i is the mean of V's rows over i's k2 nearest (`rank[i, :k2]`, itself included)."""
  if k2 == 1:
    return v
  mean = _rows_graph(rank[:, :k2], len(rank)).astype(np.float32) / np.float32(k2)
  out = (mean @ v).tocsr()
  out.sort_indices()
  return out


def _row_blocks(cost: np.ndarray, n: int) -> list[tuple[int, int]]:
  """Consecutive row ranges [start, stop) within the Jaccard step's per-block budgets.

  `cost` [N] is each row's number of (row, column, other row) triples; a block holds at most
  `_PAIRS_PER_BLOCK` of them (or one row).
  """
  ends = np.cumsum(cost)
  blocks, start = [], 0
  while start < n:
    done = ends[start - 1] if start else 0
    stop = int(np.searchsorted(ends, done + _PAIRS_PER_BLOCK, side="right"))
    stop = min(max(stop, start + 1), n)
    blocks.append((start, stop))
    start = stop
  return blocks


def _sum_by_key(key: np.ndarray, values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The distinct keys [K] of `key` [P] (in [0, size)), ascending, and float64 sums [K] of their `values`,
  each added in input order (the same sums either way). A dense accumulator when `size` is within a few
  times P, else the distinct keys first: no O(size) memory for the wide blocks of millions of points."""
  if size <= 8 * len(key):
    sums = np.bincount(key, weights=values, minlength=size)
    distinct = np.flatnonzero(np.bincount(key, minlength=size))
    return distinct, sums[distinct]
  distinct, inverse = np.unique(key, return_inverse=True)
  return distinct, np.bincount(inverse, weights=values, minlength=len(distinct))


def jaccard_distance(v: sparse.csr_matrix, max_distance: float = 1.0) -> sparse.csr_matrix:
  """float32 [N, N] symmetric CSR: d(i, j) = 1 - m / (2 - m), m = Σ_l min(V_il, V_jl).

  `v` [N, N] has rows summing to 1. Only pairs sharing a column l are computed, each once
  (j > i, in row blocks: every entry V_il meets the entries below it in column l); of those,
  entries with d ≤ `max_distance` are stored, each row sorted by distance. The diagonal is
  stored as explicit zeros. Absent pairs are at distance 1 (or beyond `max_distance`).
  """
  n = v.shape[0]
  v = v.tocsr()
  v.sort_indices()
  rows = _row_of_entries(v)
  by_col = np.lexsort((rows, v.indices))  # v's entries column by column, rows ascending
  values = v.data.astype(np.float64)
  col_rows, col_vals = rows[by_col], values[by_col]
  below = np.empty(v.nnz, np.int64)
  below[by_col] = np.arange(1, v.nnz + 1)  # where the entries under each entry start
  col_end = np.cumsum(np.bincount(v.indices, minlength=n))[v.indices]
  count = col_end - below
  # d ≤ max_distance ⟺ m ≥ 2 (1 - max_distance) / (2 - max_distance); the slack keeps boundary pairs for the exact test.
  min_shared = max(2 * (1 - max_distance) / (2 - max_distance) - 1e-6, 0.0)
  out = [(np.arange(n), np.arange(n), np.zeros(n))]
  for start, stop in _row_blocks(np.bincount(rows, weights=count, minlength=n).astype(np.int64), n):
    lo, hi = v.indptr[start], v.indptr[stop]
    c = count[lo:hi]
    at = np.repeat(below[lo:hi] - (np.cumsum(c) - c), c) + np.arange(c.sum())
    width = n - start
    key = np.repeat((rows[lo:hi] - start) * width - start, c) + col_rows[at]
    shared = np.minimum(np.repeat(values[lo:hi], c), col_vals[at])
    flat, m = _sum_by_key(key, shared, (stop - start) * width)
    flat, m = flat[m > min_shared], m[m > min_shared]
    d = np.maximum(1.0 - m / (2.0 - m), 0.0)
    keep = d <= max_distance
    i, j = np.divmod(flat[keep], width)
    out.append((i + start, j + start, d[keep]))
  return _symmetric_csr(*map(np.concatenate, zip(*out)), n)


def _symmetric_csr(rows: np.ndarray, cols: np.ndarray, dist: np.ndarray, n: int) -> sparse.csr_matrix:
  """float32 [N, N] CSR from the entries with i ≤ j, mirrored, each row sorted by distance.

  Built from raw arrays so that explicit zeros stay stored.
  """
  off = rows != cols
  rows, cols, dist = (np.concatenate([rows, cols[off]]), np.concatenate([cols, rows[off]]),
                      np.concatenate([dist, dist[off]]))
  order = np.lexsort((cols, dist, rows))
  indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
  return sparse.csr_matrix((dist[order].astype(np.float32), cols[order].astype(np.int32), indptr), shape=(n, n))


def jaccard_graph(features: np.ndarray, k1: int = 30, k2: int = 6, block: int = 1024,
                  max_distance: float = 1.0, ann_threshold: int = ANN_THRESHOLD) -> sparse.csr_matrix:
  """float32 [N, N] sparse k-reciprocal Jaccard distances of features [N, D] (steps 1-5 above)."""
  x = unit_rows(features)
  rank = nearest_neighbours(x, max(k1, k2), block, ann_threshold)
  v = query_expansion(encode(x, expanded_neighbours(rank, k1)), rank, k2)
  return jaccard_distance(v, max_distance)


def dbscan_labels(distance: sparse.csr_matrix, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
  """int64 [N]: DBSCAN clusters of a sparse precomputed distance matrix; -1 marks outliers.

  Only stored entries ≤ eps are neighbours (stored zeros included); a point is its own
  neighbour and counts towards `min_samples`.
  """
  # Imported here: scikit-learn takes 1.5 s to import, and only a clustering epoch needs it.
  from sklearn.cluster import DBSCAN

  labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
  return labels.astype(np.int64)


def cluster_images(features: np.ndarray, image_index: np.ndarray, k1: int = 30, k2: int = 6, eps: float = 0.6,
                   min_samples: int = 4, block: int = 1024, ann_threshold: int = ANN_THRESHOLD) -> np.ndarray:
  """int64 [R]: pseudo identity of each image r (-1: outlier), keyed by the stable image index.

  `features` [R, D] (any order) with `image_index` [R], the record of each row: every image
  0..R-1 exactly once. Rows are put in image order first, so the labels do not depend on the
  order the features came in.
  """
  image_index = np.asarray(image_index)
  n = len(image_index)
  if np.shape(features)[0] != n:
    raise ValueError(f"{np.shape(features)[0]} feature rows but {n} image indices")
  seen = np.bincount(image_index, minlength=n) if n and image_index.min() >= 0 else None
  if seen is None or len(seen) != n or np.any(seen != 1):
    raise ValueError(f"image_index must hold every image 0..{n - 1} exactly once; "
                     f"got {n} indices in [{image_index.min()}, {image_index.max()}] with "
                     f"{n - len(np.unique(image_index))} repeats")
  order = np.argsort(image_index)
  distance = jaccard_graph(np.asarray(features)[order], k1, k2, block, max_distance=eps, ann_threshold=ann_threshold)
  return dbscan_labels(distance, eps, min_samples)


def pair_labels(image_labels: np.ndarray, pair_record: np.ndarray) -> np.ndarray:
  """int64 [P]: each (image, caption) pair inherits its image's label (`Split.pair_record` [P])."""
  return np.asarray(image_labels)[pair_record]


def label_counts(labels: np.ndarray) -> dict[str, float]:
  """What pseudo labels [N] (-1: outlier) say without any ids: how many clusters, the outliers' share."""
  labels = np.asarray(labels)
  return {"num_clusters": int(len(np.unique(labels[labels >= 0]))), "outlier_share": float((labels < 0).mean())}


def outliers_as_singletons(labels: np.ndarray) -> np.ndarray:
  """int64 [N]: DBSCAN labels [N] with each outlier (-1) a cluster of its own, for ARI and NMI."""
  labels = np.asarray(labels)
  return np.where(labels < 0, labels.max(initial=-1) + 1 + np.arange(len(labels)), labels)


def label_quality(labels: np.ndarray, true_ids: np.ndarray) -> dict[str, float]:
  """Pseudo labels [N] against hidden person ids [N] (measurement only), with `label_counts`.

  ARI and NMI count every outlier as its own cluster; pair precision/recall are over pairs
  put in one cluster vs pairs of one person.
  """
  from sklearn import metrics  # imported here, as in `dbscan_labels`

  labels, true_ids = np.asarray(labels), np.asarray(true_ids)
  outlier = labels < 0
  singletons = outliers_as_singletons(labels)
  table = metrics.cluster.contingency_matrix(true_ids[~outlier], labels[~outlier], sparse=True)
  pairs = lambda c: float((c * (c - 1) / 2).sum())  # noqa: E731
  same_cluster = pairs(np.bincount(labels[~outlier]))
  same_id = pairs(np.unique(true_ids, return_counts=True)[1])
  both = pairs(table.data.astype(np.float64))
  return {
      "ari": float(metrics.adjusted_rand_score(true_ids, singletons)),
      "nmi": float(metrics.normalized_mutual_info_score(true_ids, singletons)),
      **label_counts(labels),
      "num_ids": int(len(np.unique(true_ids))),
      "pair_precision": both / same_cluster if same_cluster else 0.0,
      "pair_recall": both / same_id if same_id else 0.0,
  }
