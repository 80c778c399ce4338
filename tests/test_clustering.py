"""Pseudo identities: sparse k-reciprocal Jaccard + DBSCAN against a dense reference, the
stable-index join, label quality, and the trainer's clusters relation source."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from sklearn import metrics
from sklearn.cluster import DBSCAN

from benchmarks.clustering import clustered_features, dense_jaccard_distance
from dgia_jax.common import parallel
from dgia_jax.data import datasets
from dgia_jax.inference import encoding, rebuild
from dgia_jax.method import clustering
from dgia_jax.run import checkpointing, rundir
from dgia_jax.training import hooks, train
from tests import helpers


@pytest.fixture(scope="module")
def points():
  """2,000 unit 64-d points around 500 centres (2-6 per id), in random order."""
  return clustered_features(num_ids=500, num_points=2000, dim=64, noise=0.8, seed=1)


def test_sparse_jaccard_distances_equal_the_dense_reference(points):
  x, _ = points
  eps = 0.6
  dense = dense_jaccard_distance(x, k1=30, k2=6)
  graph = clustering.jaccard_graph(x, k1=30, k2=6, block=256, max_distance=eps)
  assert sparse.issparse(graph) and graph.nnz < 0.05 * len(x) ** 2
  rows, cols = graph.nonzero()
  coo = graph.tocoo()
  np.testing.assert_allclose(coo.data, dense[coo.row, coo.col], atol=1e-5)
  # Every pair within eps of the dense reference is stored (nothing near is lost).
  near_r, near_c = np.nonzero(dense <= eps - 1e-5)
  stored = set(zip(coo.row.tolist(), coo.col.tolist()))
  missing = [(r, c) for r, c in zip(near_r.tolist(), near_c.tolist()) if (r, c) not in stored]
  assert not missing, missing[:5]
  assert len(rows) > len(x)  # more than the diagonal: the test has neighbours to compare


def test_dbscan_labels_agree_with_the_dense_reference_and_the_generating_ids(points):
  x, ids = points
  dense = dense_jaccard_distance(x, k1=30, k2=6)
  reference = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense)
  ours = clustering.cluster_images(x, np.arange(len(x)), **clustering.DEFAULTS)
  assert metrics.adjusted_rand_score(reference, ours) >= 0.99
  assert len(np.unique(ours[ours >= 0])) > 100
  assert clustering.label_quality(ours, ids)["pair_precision"] > 0.9


def test_labels_are_joined_by_image_index_whatever_the_feature_order(points):
  x, _ = points
  x, n = x[:600], 600
  expected = clustering.cluster_images(x, np.arange(n), k1=20, k2=6, eps=0.6, min_samples=2)
  assert len(np.unique(expected[expected >= 0])) > 20
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = clustering.cluster_images(x[perm], perm, k1=20, k2=6, eps=0.6, min_samples=2)
    np.testing.assert_array_equal(shuffled, expected)  # labels by image index, not by row
  # Captions inherit their image's label through the pair → record map.
  pair_record = np.repeat(np.arange(n), 2)[::-1]
  np.testing.assert_array_equal(clustering.pair_labels(expected, pair_record), expected[pair_record])


@pytest.mark.parametrize("index, message", [
    (np.array([0, 1, 1, 3]), "exactly once"),
    (np.array([0, 1, 2, 4]), "exactly once"),
    (np.array([0, 1, 2]), "feature rows"),
])
def test_image_index_must_cover_every_image_once(index, message):
  x = np.eye(4, 8, dtype=np.float32) + 0.1
  with pytest.raises(ValueError, match=message):
    clustering.cluster_images(x, index, k1=2, k2=1, min_samples=2)


def test_zero_or_non_finite_feature_rows_are_named():
  x = np.ones((5, 3), np.float32)
  x[3] = 0
  with pytest.raises(ValueError, match=r"rows \[3\]"):
    clustering.unit_rows(x)


def test_nearest_neighbours_put_each_row_first_even_with_duplicates():
  x = clustering.unit_rows(np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0.1, 1]], np.float32))
  rank = clustering.nearest_neighbours(x, 2, block=2)
  np.testing.assert_array_equal(rank[:, 0], np.arange(5))
  assert set(rank[0, 1:]) == {1, 2} and rank[3, 1] == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.integers(1, 50))
def test_jaccard_sums_are_the_same_from_the_dense_and_the_wide_accumulator(seed, pairs, size):
  """The wide blocks of millions of points sum their triples without an O(N) accumulator, to the same bits."""
  rng = np.random.default_rng(seed)
  key = rng.integers(0, size, pairs)
  values = rng.random(pairs) * rng.choice([1e-8, 1.0, 1e8], pairs)
  dense = clustering._sum_by_key(key, values, size)
  wide = clustering._sum_by_key(key + 10**12, values, 10**12 + size)  # past 8 × P: the distinct keys first
  np.testing.assert_array_equal(dense[0] + 10**12, wide[0])
  np.testing.assert_array_equal(dense[1], wide[1])
  assert np.array_equal(dense[0], np.unique(key))


def test_partitioned_neighbours_find_more_with_each_partition_and_cluster_as_the_exact_ones(points):
  x, ids = points
  x = clustering.unit_rows(x)

  def same_id_recall(neighbours):  # the share of each point's same-id points among its neighbours
    return np.mean([(ids[row] == ids[i]).sum() / (ids == ids[i]).sum() for i, row in enumerate(neighbours)])

  recall = [same_id_recall(clustering._cell_neighbours(x, 11, cell_points=20, probe=4, partitions=p))
            for p in (1, 3)]  # 100 cells: each row searched among ~4 % of the rows a partition
  assert recall[0] < 0.9 and recall[1] > 0.95, recall  # measured: 0.82, 0.98
  approximate = clustering.nearest_neighbours(x, 10, ann_threshold=len(x) - 1)  # past the threshold: partitioned
  assert (approximate[:, 0] == np.arange(len(x))).all() and same_id_recall(approximate) > 0.95
  labels = {t: clustering.cluster_images(x, np.arange(len(x)), k1=10, k2=3, eps=0.5, min_samples=2, ann_threshold=t)
            for t in (len(x), len(x) - 1)}
  assert metrics.adjusted_rand_score(*map(clustering.outliers_as_singletons, labels.values())) > 0.95
  assert clustering.label_quality(labels[len(x) - 1], ids)["ari"] > 0.5


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(12, 120), st.integers(1, 10), st.integers(1, 40), st.booleans())
def test_partitioned_neighbours_are_distinct_sorted_and_exact_when_every_cell_is_searched(seed, n, k, cell_points,
                                                                                         duplicates):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)).astype(np.float32)
  if duplicates:  # equal rows: equal similarities, ordered by index
    x[rng.integers(0, n, n // 2)] = x[0]
  x = clustering.unit_rows(x)
  k = min(k, n - 1)
  found = clustering._cell_neighbours(x, k, cell_points=cell_points, probe=n, partitions=2)
  assert found.shape == (n, k) and ((0 <= found) & (found < n)).all()
  assert all(len(set(row)) == k for row in found.tolist())
  sims = np.einsum("nd,nkd->nk", x, x[found])
  assert (np.diff(sims, axis=1) <= 1e-6).all()
  exact_sims = np.sort(x @ x.T, axis=1)[:, ::-1][:, :k]  # every row stored in every cell: nothing missed
  np.testing.assert_allclose(sims, exact_sims, atol=1e-5)


def test_label_quality_hand_computed():
  labels = np.array([0, 0, 1, 1, -1, 1])
  true = np.array([7, 7, 8, 8, 8, 9])
  q = clustering.label_quality(labels, true)
  assert q["num_clusters"] == 2 and q["num_ids"] == 3
  assert q["outlier_share"] == pytest.approx(1 / 6)
  # Pairs in one cluster: (0,1), (2,3), (2,5), (3,5); of one person: (0,1), (2,3), (2,4), (3,4).
  assert q["pair_precision"] == pytest.approx(2 / 4)
  assert q["pair_recall"] == pytest.approx(2 / 4)
  assert q["ari"] == pytest.approx(metrics.adjusted_rand_score(true, [0, 0, 1, 1, 2, 1]))


@pytest.mark.slow  # trains
def test_trainer_clusters_from_the_epoch_start_params_and_checkpoints_them(tmp_path, data_dir):
  cfg = helpers.tiny_config(data_dir)
  cfg.loss.update(dict(lrc=True, iasc=False, gsrc=False))
  cfg.relations.clusters.update(dict(enabled=True, mode="replace", start_epoch=2, every_epochs=5, k1=4, k2=2,
                                     min_samples=2))
  cfg.checkpoint.keep = 10
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(cfg, workdir)
  records = rundir.RunDir(workdir).records("clusters")
  assert [(r["step"], r["epoch"]) for r in records] == [(4, 2)]
  assert {"ari", "nmi", "num_clusters", "num_ids", "outlier_share", "seconds"} <= set(records[0])

  # The labels in the final checkpoint are those of the epoch-2 start parameters (step 4), by pair.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 10)
  _, at_epoch_start = ckpt.restore_raw(4)
  _, final = ckpt.restore_raw()
  ckpt.close()
  tokenizer, splits = datasets.load(cfg.data, ("train",))
  mesh = parallel.make_mesh()
  model = rebuild.build_model(cfg, tokenizer)
  labels, quality = hooks.pseudo_identities(encoding.make_encoders(model, mesh), at_epoch_start["params"],
                                            splits["train"], mesh, cfg.relations.clusters, 16)
  assert quality["num_clusters"] == records[0]["num_clusters"]
  np.testing.assert_array_equal(np.asarray(final["pseudo_ids"])[:len(labels)], labels)
  assert np.all(np.asarray(at_epoch_start["pseudo_ids"]) == -1)  # saved before the clustering
