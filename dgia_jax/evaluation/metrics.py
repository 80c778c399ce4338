"""Retrieval metrics exactly as the text-to-person field reports them (IRRA's definitions).

For each query the gallery is ranked by descending similarity; ties keep gallery order
(a stable sort). With the 1-based ranks r_1 < … < r_n of the query's n positives:

  Rank-k = 100 · mean_q [r_1 ≤ k]             (CMC clipped at one hit)
  AP     = mean_j  j / r_j                    (precision at each positive, over positives)
  mINP   = 100 · mean_q  n / r_n              (inverse rank of the hardest positive)
  mAP    = 100 · mean_q AP

Figures are never computed from non-finite numbers: features or similarities holding a NaN or an
infinity are refused (`errors.NonFiniteError`), since a NaN compares false both ways and would rank
every positive first (R1 100, mAP over 100). Instead of sorting whole rows, the rank of each positive is counted directly,
r_j = 1 + #{g : s_g > s_j or (s_g = s_j and g < j)}, in fixed-size query blocks, so
neither a full similarity matrix nor a full argsort is ever materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dgia_jax.common import errors

MAX_RANK = 10
METRIC_NAMES = ("R1", "R5", f"R{MAX_RANK}", "mAP", "mINP")
_BLOCK_ELEMENTS = 1 << 25  # block rows × max positives × gallery size per jitted call


def require_finite(values, what: str) -> None:
  """Raises NonFiniteError naming `what` ("text features") if any row of `values` [N, ...] holds a
  NaN or an infinity."""
  bad = ~np.isfinite(np.asarray(values)).reshape(len(values), -1).all(axis=1)
  if bad.any():
    raise errors.NonFiniteError(f"{int(bad.sum())} of {len(values)} {what} are not finite (the model diverged); "
                                "no figure is computed from them")


def positive_index(query_pids: np.ndarray, gallery_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gallery indices of each query's positives, padded.

  Returns int32 [Q, Pmax] indices in ascending gallery order and bool [Q, Pmax] validity.
  Raises ValueError if a query has no positive in the gallery (its AP would be undefined).
  """
  query_pids, gallery_pids = np.asarray(query_pids), np.asarray(gallery_pids)
  order = np.argsort(gallery_pids, kind="stable")
  uniq, starts, counts = np.unique(gallery_pids[order], return_index=True, return_counts=True)
  slot = np.searchsorted(uniq, query_pids)
  slot_ok = (slot < len(uniq)) & (uniq[np.minimum(slot, len(uniq) - 1)] == query_pids)
  if not slot_ok.all():
    bad = int(np.flatnonzero(~slot_ok)[0])
    raise ValueError(f"query {bad} (person id {query_pids[bad]}) has no positive in the gallery; "
                     f"{int((~slot_ok).sum())} queries lack positives")
  pmax = int(counts.max())
  offsets = np.arange(pmax)
  n = counts[slot][:, None]
  valid = offsets[None, :] < n
  idx = order[np.minimum(starts[slot][:, None] + offsets[None, :], len(order) - 1)]
  return np.where(valid, idx, 0).astype(np.int32), valid


@jax.jit
def _positive_ranks(sim: jax.Array, pos_idx: jax.Array, pos_valid: jax.Array) -> jax.Array:
  """1-based ranks int32 [b, Pmax] of each positive in its row of sim [b, G]; padding -> G + 1."""
  g = jnp.arange(sim.shape[1], dtype=jnp.int32)
  pos_score = jnp.take_along_axis(sim, pos_idx, axis=1)
  s, p = sim[:, None, :], pos_score[:, :, None]
  ahead = (s > p) | ((s == p) & (g[None, None, :] < pos_idx[:, :, None]))
  ranks = jnp.sum(ahead, axis=-1, dtype=jnp.int32) + 1
  return jnp.where(pos_valid, ranks, sim.shape[1] + 1)


@jax.jit
def _similarity(query_feats: jax.Array, gallery_feats: jax.Array) -> jax.Array:
  return jnp.dot(query_feats, gallery_feats.T, precision=jax.lax.Precision.HIGHEST)


def metrics_from_ranks(ranks: np.ndarray, valid: np.ndarray, max_rank: int = MAX_RANK) -> dict[str, float]:
  """R1/R5/R10, mAP, mINP (percent) from positive ranks [Q, Pmax] and validity [Q, Pmax]."""
  ranks = np.sort(np.where(valid, ranks, np.iinfo(np.int32).max), axis=1).astype(np.float64)
  n = valid.sum(1)
  ordinal = np.arange(1, ranks.shape[1] + 1)[None, :]
  ap = np.where(ordinal <= n[:, None], ordinal / ranks, 0.0).sum(1) / n
  last = ranks[np.arange(len(n)), n - 1]
  out = {f"R{k}": 100.0 * float(np.mean(ranks[:, 0] <= k)) for k in (1, 5, max_rank)}
  out["mAP"] = 100.0 * float(ap.mean())
  out["mINP"] = 100.0 * float(np.mean(n / last))
  return out


def _block_rows(pmax: int, gallery_size: int) -> int:
  rows = _BLOCK_ELEMENTS // max(1, pmax * gallery_size)
  return int(max(8, min(1024, rows)) // 8 * 8)


def _ranks_in_blocks(similarity_of, num_queries: int, pos_idx: np.ndarray, pos_valid: np.ndarray,
                     gallery_size: int) -> np.ndarray:
  """Positive ranks [Q, Pmax], computing similarity_of(rows) [b, G] one fixed-size block at a time."""
  b = _block_rows(pos_idx.shape[1], gallery_size)
  out = []
  for start in range(0, num_queries, b):
    rows = np.minimum(np.arange(start, start + b), num_queries - 1)  # pad the last block
    ranks = _positive_ranks(similarity_of(rows), pos_idx[rows], pos_valid[rows])
    out.append(np.asarray(ranks)[: min(b, num_queries - start)])
  return np.concatenate(out)


def rank_metrics(similarity, query_pids, gallery_pids) -> dict[str, float]:
  """Metrics of a similarity matrix [Q, G] (rows are queries)."""
  require_finite(similarity, "similarity rows")
  sim = jnp.asarray(similarity, jnp.float32)
  pos_idx, pos_valid = positive_index(query_pids, gallery_pids)
  ranks = _ranks_in_blocks(lambda rows: sim[rows], sim.shape[0], pos_idx, pos_valid, sim.shape[1])
  return metrics_from_ranks(ranks, pos_valid)


def retrieval_metrics(query_feats, gallery_feats, query_pids, gallery_pids) -> dict[str, float]:
  """Metrics of cosine retrieval between L2-normalised features [Q, D] and [G, D]."""
  require_finite(query_feats, "query features")
  require_finite(gallery_feats, "gallery features")
  q = jnp.asarray(query_feats, jnp.float32)
  g = jnp.asarray(gallery_feats, jnp.float32)
  pos_idx, pos_valid = positive_index(query_pids, gallery_pids)
  ranks = _ranks_in_blocks(lambda rows: _similarity(q[rows], g), q.shape[0], pos_idx, pos_valid, g.shape[0])
  return metrics_from_ranks(ranks, pos_valid)


def evaluate_retrieval(text_feats, image_feats, text_pids, image_pids) -> dict[str, dict[str, float]]:
  """Text→image (every caption a query over every image) and image→text metrics."""
  require_finite(text_feats, "text features")
  require_finite(image_feats, "image features")
  return {"t2i": retrieval_metrics(text_feats, image_feats, text_pids, image_pids),
          "i2t": retrieval_metrics(image_feats, text_feats, image_pids, text_pids)}


@functools.partial(jax.jit, static_argnames="k")
def _topk(query_feats: jax.Array, gallery_feats: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return jax.lax.top_k(_similarity(query_feats, gallery_feats), k)


def top_k(query_feats, gallery_feats, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and gallery indices int32 [Q, k] of the k most similar items."""
  q = np.asarray(query_feats, np.float32)
  g = jnp.asarray(gallery_feats, jnp.float32)
  k = min(k, g.shape[0])
  scores, idx = [], []
  for start in range(0, len(q), block):
    s, i = _topk(jnp.asarray(q[start:start + block]), g, k)
    scores.append(np.asarray(s))
    idx.append(np.asarray(i))
  return np.concatenate(scores), np.concatenate(idx)
