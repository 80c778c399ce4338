"""Retrieval metrics against hand-computed cases and a straightforward argsort reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgia_jax.common import errors
from dgia_jax.evaluation import metrics


def reference_metrics(sim, q_pids, g_pids, max_rank=10):
  """The field's definitions over a stable descending argsort of each whole row."""
  order = np.argsort(-sim, axis=1, kind="stable")
  matches = g_pids[order] == q_pids[:, None]
  cmc = np.minimum(matches.cumsum(1), 1)
  hits = matches.cumsum(1)
  pos = np.arange(1, sim.shape[1] + 1)
  ap = (hits / pos * matches).sum(1) / matches.sum(1)
  last = np.array([np.flatnonzero(m)[-1] + 1 for m in matches])
  inp = matches.sum(1) / last
  return {"R1": 100 * cmc[:, 0].mean(), "R5": 100 * cmc[:, 4].mean(), "R10": 100 * cmc[:, max_rank - 1].mean(),
          "mAP": 100 * ap.mean(), "mINP": 100 * inp.mean()}


def check(sim, q, g, expected):
  got = metrics.rank_metrics(np.asarray(sim, np.float32), np.asarray(q), np.asarray(g))
  for k, v in expected.items():
    assert got[k] == pytest.approx(v, abs=1e-4), (k, got)


def test_hand_computed_hits_at_one_and_three():
  # Positives (pid 1) at ranks 1 and 3: AP = (1/1 + 2/3) / 2, mINP = 2/3.
  check([[0.9, 0.8, 0.7, 0.6] + [0.0] * 8], [1], [1, 2, 1, 3] + [9] * 8,
        {"R1": 100, "R5": 100, "R10": 100, "mAP": 100 * (1 + 2 / 3) / 2, "mINP": 100 * 2 / 3})


def test_positives_all_at_the_end():
  # Gallery of 12, positives ranked 11 and 12: misses Rank-10; AP = (1/11 + 2/12) / 2, mINP = 2/12.
  sims = np.linspace(1.0, 0.0, 12)[None]
  check(sims, [7], [1] * 10 + [7, 7], {"R1": 0, "R5": 0, "R10": 0, "mAP": 100 * (1 / 11 + 2 / 12) / 2,
                                        "mINP": 100 * 2 / 12})


def test_ties_keep_gallery_order():
  # All scores equal: the stable order is the gallery order, so the positives rank 2 and 3.
  check(np.full((1, 12), 0.5), [1], [2, 1, 1] + [3] * 9,
        {"R1": 0, "R5": 100, "mAP": 100 * (1 / 2 + 2 / 3) / 2, "mINP": 100 * 2 / 3})


def test_means_over_queries():
  sim = np.array([[0.9, 0.1] + [0.0] * 10, [0.9, 0.1] + [0.0] * 10])
  check(sim, [1, 2], [1, 2] + [3] * 10, {"R1": 50, "mAP": 100 * (1 + 1 / 2) / 2, "mINP": 100 * (1 + 1 / 2) / 2})


@pytest.mark.parametrize("seed", range(3))
def test_matches_argsort_reference_with_ties_and_many_blocks(seed, monkeypatch):
  monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 4096)  # force many padded blocks
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(0, 20, size=203)
  g_pids = np.concatenate([np.arange(20), rng.integers(0, 20, size=57)])
  sim = np.round(rng.normal(size=(203, 77)), 1).astype(np.float32)  # rounding creates ties
  got = metrics.rank_metrics(sim, q_pids, g_pids)
  ref = reference_metrics(sim, q_pids, g_pids)
  for k in ref:
    assert got[k] == pytest.approx(ref[k], abs=1e-4), k


def test_feature_and_similarity_entry_points_agree():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(50, 8)).astype(np.float32)
  g = rng.normal(size=(30, 8)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, 10, 50), np.arange(30) % 10
  a = metrics.retrieval_metrics(q, g, q_pids, g_pids)
  b = metrics.rank_metrics(q @ g.T, q_pids, g_pids)
  assert a == pytest.approx(b, abs=1e-4)


def test_query_without_positive_is_reported():
  with pytest.raises(ValueError, match=r"query 1 \(person id 5\) has no positive"):
    metrics.rank_metrics(np.zeros((2, 3)), [1, 5], [1, 2, 3])


def test_top_k_returns_best_first():
  rng = np.random.default_rng(4)
  q, g = rng.normal(size=(5, 4)), rng.normal(size=(9, 4))
  scores, idx = metrics.top_k(q, g, 3, block=2)
  ref = np.argsort(-(q @ g.T), axis=1)[:, :3]
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, ref, 1), rtol=1e-5)


def test_non_finite_features_are_refused_never_ranked():
  """NaN similarities compare false both ways: ranked, every positive came first (R1 100, mAP 550)."""
  q, g = np.eye(4, 8, dtype=np.float32), np.eye(6, 8, dtype=np.float32)
  q[1, 3] = np.nan
  with pytest.raises(errors.NonFiniteError, match="1 of 4 text features are not finite"):
    metrics.evaluate_retrieval(q, g, [0, 1, 2, 3], [0, 1, 2, 3, 0, 1])
  g[5] = np.inf
  with pytest.raises(errors.NonFiniteError, match="1 of 6 gallery features are not finite"):
    metrics.retrieval_metrics(np.eye(4, 8, dtype=np.float32), g, [0, 1, 2, 3], [0, 1, 2, 3, 0, 1])
  with pytest.raises(errors.NonFiniteError, match="similarity rows"):
    metrics.rank_metrics(np.full((2, 3), np.nan), [1, 2], [1, 2, 3])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(10, 20), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_figures_are_percentages_for_any_finite_input(queries, gallery, ids, seed):
  rng = np.random.default_rng(seed)
  g_pids = np.concatenate([np.arange(ids), rng.integers(0, ids, max(gallery - ids, 0))])[:max(gallery, ids)]
  q_pids = rng.choice(g_pids, queries)
  sim = rng.choice([-1.0, 0.0, 0.5, 1.0, 1e30, -1e30], (queries, len(g_pids))).astype(np.float32)  # ties, extremes
  out = metrics.rank_metrics(sim, q_pids, g_pids)
  assert all(0.0 <= v <= 100.0 for v in out.values()), out
  assert out["R1"] <= out["R5"] <= out["R10"]
  expected = reference_metrics(sim, q_pids, g_pids)
  assert out == pytest.approx(expected, abs=1e-4)
