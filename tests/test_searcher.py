"""The one searcher: exact and FAISS search over export shards, free-text queries with the export's run and checkpoint."""

import re

import numpy as np

from dgia_jax.common import parallel
from dgia_jax.data import datasets
from dgia_jax.evaluation import metrics, retrieval
from dgia_jax.gallery import exports, searcher
from dgia_jax.inference import encoding, rebuild
from tests import helpers


def test_search_over_the_export_gives_the_evaluators_rank_k(tiny_run, exported):
  emb = exports.load(exported[0])
  captions = [r["caption"] for r in emb.text_index]
  _, rows = searcher.search_texts(emb, captions, k=10)
  image_pids = np.array([r["person_id"] for r in emb.image_index])
  hit = image_pids[rows] == np.array([r["person_id"] for r in emb.text_index])[:, None]
  config, _, model, params, _ = rebuild.load_trained(tiny_run)
  _, splits = datasets.load(config.data, ("test",))
  mesh = parallel.make_mesh()
  expected = retrieval.evaluate_split(encoding.make_encoders(model, mesh), params, splits["test"], mesh,
                                  config.eval.batch_size)["t2i"]
  for k in (1, 5, 10):
    assert 100.0 * hit[:, :k].any(1).mean() == expected[f"R{k}"], k
  # The free-text path embeds a caption as the export did.
  embedded = encoding.TextEncoder(rebuild.load_trained(tiny_run)).embed(captions[:3])[0]
  np.testing.assert_allclose(embedded, np.concatenate(emb.texts)[:3], atol=1e-6)


def test_exact_search_over_shards_equals_one_gallery_and_faiss():
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
  gal, queries = unit(rng.normal(size=(503, 24))), unit(rng.normal(size=(37, 24)))
  shards = np.array_split(gal, [100, 300, 450])
  scores, rows = searcher.exact_search(queries, shards, 7)
  ref_scores, ref_rows = metrics.top_k(queries, gal, 7)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-6)  # the matmul's summation order depends on its shape
  f_scores, f_rows = searcher.faiss_search(queries, searcher.faiss_index(shards), 7)
  np.testing.assert_array_equal(f_rows, rows)
  np.testing.assert_allclose(f_scores, scores, atol=1e-5)


def test_exact_search_with_shards_smaller_than_k():
  rng = np.random.default_rng(1)
  gal, queries = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
  shards = np.array_split(gal, [3, 5, 6])  # 3, 2, 1 and 6 rows, k = 7
  scores, rows = searcher.exact_search(queries, shards, 7)
  ref_scores, ref_rows = metrics.top_k(queries, gal, 7)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  scores, rows = searcher.exact_search(queries, shards[:2], 7)  # 5 rows in all: every row, best first
  assert rows.shape == (5, 5) and all(sorted(r) == list(range(5)) for r in rows.tolist())
  np.testing.assert_array_equal(np.diff(scores, axis=1) <= 0, True)


def test_search_command_prints_top_k_and_reads_a_query_file(exported, tmp_path):
  queries = tmp_path / "queries.txt"
  queries.write_text("a man in red trousers\n\na woman with a pink bag\n")
  proc = helpers.run_module("dgia_jax.tools.search", "--emb", exported[0], "--queries_file", str(queries), "-k", "3", "--index", "faiss")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not re.search(r"^[WE]\d{4} ", proc.stderr, re.M), proc.stderr  # no log noise (cli._WithoutNotices)
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == "query 1: a man in red trousers" and lines[4] == "query 2: a woman with a pink bag"
  assert re.fullmatch(r"\s+1  -?\d\.\d{4}  person \d+  test/\S+\.png", lines[1])
  bad = helpers.run_module("dgia_jax.tools.search", "--emb", str(tmp_path), "--query", "x")
  assert bad.returncode != 0 and bad.stderr.strip() == (
      f"error: {tmp_path}/manifest.json is missing: {tmp_path} is not an export (python -m dgia_jax.tools.export)")
