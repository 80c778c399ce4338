"""The one searcher: the top-k images of queries over an export's image shards, exact or through FAISS,
for `tools.search`, `tools.serve` and `tools.report` alike; and free-text queries embedded with the
run and checkpoint an export names.

Exact search is the evaluator's jitted matmul + top-k (`metrics.top_k`) one shard at a time, the
per-shard top-k merged; FAISS (faiss-cpu, imported only when asked) builds an index shard by shard.
Shapes: Q queries, D embedding width, k results.
"""

from __future__ import annotations

import os

import numpy as np

from dgia_jax.common import errors
from dgia_jax.evaluation import metrics
from dgia_jax.gallery import exports
from dgia_jax.inference import encoding, rebuild


def exact_search(queries: np.ndarray, shards: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and gallery rows int64 [Q, k] of the k highest inner products.

  Each shard [n_i, D] is searched with the evaluator's jitted matmul + top-k
  (`metrics.top_k`), one shard on the device at a time; the per-shard top-k are merged.
  Tied scores keep gallery order, as in the evaluator.
  """
  scores, rows, offset = [], [], 0
  for shard in shards:
    s, i = metrics.top_k(queries, shard, k)
    scores.append(s)
    rows.append(i.astype(np.int64) + offset)
    offset += len(shard)
  scores, rows = np.concatenate(scores, 1), np.concatenate(rows, 1)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def faiss_index(shards: list[np.ndarray], factory: str = "Flat", nprobe: int = 8):
  """A FAISS inner-product index over the shards, added one shard at a time.

  `factory` is a FAISS index factory string: "Flat" is exact (it holds the gallery in RAM,
  float32); e.g. "IVF1024,PQ32" stores 32 bytes per item for galleries beyond memory, is
  trained on the first shard, and searches `nprobe` of its lists (approximate). A factory FAISS
  does not parse, or one whose training needs more rows than the first shard has, is a ConfigError.
  """
  faiss = errors.import_optional("faiss", "FAISS search (--index faiss)")
  dim = shards[0].shape[1] if shards else 0
  try:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  except RuntimeError as e:
    raise errors.ConfigError(f"--faiss_factory {factory!r} is not a FAISS index factory: {_faiss_reason(e)}") from e
  try:
    if not index.is_trained:
      index.train(np.ascontiguousarray(shards[0], np.float32))
    for shard in shards:
      index.add(np.ascontiguousarray(shard, np.float32))
  except RuntimeError as e:
    raise errors.ConfigError(f"--faiss_factory {factory!r} cannot index this gallery ({sum(map(len, shards))} rows, "
                             f"the first shard trains it): {_faiss_reason(e)}") from e
  if "IVF" in factory:
    faiss.extract_index_ivf(index).nprobe = nprobe
  return index


def _faiss_reason(error: RuntimeError) -> str:
  """FAISS's message without its C++ location lines."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  said = [line for line in lines if line.lower().startswith("error")]
  return (said or lines or [type(error).__name__])[-1].removeprefix("Error: ").strip("'")


def faiss_search(queries: np.ndarray, index, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and gallery rows int64 [Q, k] from a `faiss_index`."""
  scores, rows = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
  return scores, rows.astype(np.int64)


INDEXES = ("exact", "faiss")


class Searcher:
  """Top-k search over an export's image shards, exact or through FAISS: one behaviour for every
  caller (`tools.search`, `tools.serve`, `tools.report`).

  Exact search pads the queries to a multiple of `query_block` rows and rounds k up to a power of
  two, so the jitted search compiles once per such shape, not per query count or k asked for.
  """

  def __init__(self, shards: list[np.ndarray], index: str = "exact", faiss_factory: str = "Flat", nprobe: int = 8,
               query_block: int = 16):
    if index not in INDEXES:
      raise errors.ConfigError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
    self.shards, self.query_block = shards, query_block
    self.size = sum(len(s) for s in shards)
    self._faiss = faiss_index(shards, faiss_factory, nprobe) if index == "faiss" and self.size else None

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores float32 [Q, k'] and image rows int64 [Q, k'] of each query [Q, D]'s k' = min(k, size)
    most similar images, best first (ties in gallery order)."""
    if k < 1:
      raise errors.ConfigError(f"k must be at least 1, got {k}")
    k = min(k, self.size)
    if k == 0:
      return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if self._faiss is not None:
      return faiss_search(queries, self._faiss, k)
    k_search = min(1 << (k - 1).bit_length(), self.size)
    padded = np.concatenate([queries, np.zeros((-len(queries) % self.query_block, queries.shape[1]), np.float32)])
    scores, rows = exact_search(padded, self.shards, k_search)
    return scores[:len(queries), :k], rows[:len(queries), :k]


def take_rows(shards: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
  """float32 [len(rows), D]: rows of the shards' concatenation, reading only those rows."""
  offsets = np.cumsum([0] + [len(s) for s in shards])
  which = np.searchsorted(offsets, rows, side="right") - 1
  return np.stack([shards[s][r - offsets[s]] for s, r in zip(which, rows)]).astype(np.float32)


def read_queries(path: str) -> list[str]:
  """The non-blank lines of UTF-8 text file `path`, stripped: search queries, one a line."""
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"--queries_file {path}: " + ("a folder, not a file" if os.path.isdir(path)
                                                               else "no such file"))
  try:
    with open(path, encoding="utf-8") as f:
      queries = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise errors.BadInputError(f"--queries_file {path} is not UTF-8 text (byte {e.start})") from e
  if not queries:
    raise errors.BadInputError(f"{path} holds no queries (one a line)")
  return queries


def search_texts(emb: exports.Embeddings, texts: list[str], k: int, index: str = "exact", workdir: str | None = None,
                 faiss_factory: str = "Flat", nprobe: int = 8,
                 checkpoint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and image rows int64 [Q, k] of each text's top-k images: the texts
  embedded with the model and checkpoint the export names (at `workdir` or `checkpoint` if moved)."""
  searcher = Searcher(emb.images, index, faiss_factory, nprobe)
  m = emb.manifest
  run = rebuild.load_model(rebuild.model_of_manifest(m, workdir, checkpoint), m["step"], m.get("best", False))
  queries, _ = encoding.TextEncoder(run).embed(texts)
  return searcher.search(queries, k)
