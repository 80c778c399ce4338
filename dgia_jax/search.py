"""Text search over exported image embeddings: the top-k images of a description, with scores.

  python -m dgia_jax.search --emb emb/ --query "a woman in a red coat with a black backpack" -k 10
  python -m dgia_jax.search --emb emb/ --queries_file queries.txt -k 10      # one query a line
  python -m dgia_jax.search --emb emb/ --query "..." --index faiss [--faiss_factory IVF1024,PQ32]

Queries are embedded by the text tower of the run and checkpoint the export names
(`--workdir` if the run has moved). Exact search is a jitted matmul + top-k per shard
(`gallery.exact_search`); `--index faiss` builds a FAISS index shard by shard instead
(faiss-cpu, imported only then).
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from dgia_jax import cli, gallery, parallel, train



def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so the functions import anywhere."""
  flags.DEFINE_string("emb", None, "Export directory (python -m dgia_jax.export).", required=True)
  flags.DEFINE_string("query", None, "One text query.")
  flags.DEFINE_string("queries_file", None, "File of text queries, one a line (batch mode).")
  flags.DEFINE_integer("k", 10, "Results per query.")
  flags.DEFINE_enum("index", "exact", ("exact", "faiss"), "Exact jitted search, or a FAISS index.")
  flags.DEFINE_string("faiss_factory", "Flat", "FAISS index factory string (Flat: exact).")
  flags.DEFINE_integer("nprobe", 8, "Inverted lists searched by an IVF FAISS index.")
  flags.DEFINE_string("workdir", None, "Training workdir (default: the one the export names).")
  flags.DEFINE_bool("verify", True, "Check every shard's sha256 against the manifest first.")


def read_queries(path: str) -> list[str]:
  """The non-blank lines of `path`, stripped."""
  with open(path) as f:
    queries = [line.strip() for line in f if line.strip()]
  if not queries:
    raise ValueError(f"{path} holds no queries (one a line)")
  return queries


def embed_queries(emb: gallery.Embeddings, texts: list[str], workdir: str | None = None) -> np.ndarray:
  """float32 [Q, D]: the texts embedded with the export's run (or `workdir`) and checkpoint."""
  config, tokenizer, model, params, _ = train.load_trained(workdir or emb.manifest["workdir"], emb.manifest["step"],
                                                           emb.manifest.get("best", False))
  mesh = parallel.make_mesh()
  return train.encode_tokens(train.make_encoders(model, mesh), params, tokenizer.encode(texts, "queries"), mesh,
                             config.eval.batch_size)


def search_texts(emb: gallery.Embeddings, texts: list[str], k: int, index: str = "exact", workdir: str | None = None,
                 faiss_factory: str = "Flat", nprobe: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and image rows int64 [Q, k] of each text's top-k images."""
  queries = embed_queries(emb, texts, workdir)
  if index == "exact":
    return gallery.exact_search(queries, emb.images, k)
  if index == "faiss":
    return gallery.faiss_search(queries, gallery.faiss_index(emb.images, faiss_factory, nprobe), k)
  raise ValueError(f"index must be 'exact' or 'faiss', got {index!r}")


def format_results(emb: gallery.Embeddings, texts: list[str], scores: np.ndarray, rows: np.ndarray) -> str:
  """One block per query: its text, then rank, score, person id and path of each result."""
  lines = []
  for q, text in enumerate(texts):
    lines.append(f"query {q + 1}: {text}")
    for rank, (score, row) in enumerate(zip(scores[q], rows[q]), 1):
      item = emb.image_index[row]
      lines.append(f"  {rank:3d}  {score:.4f}  person {item['person_id']}  {item['path']}")
  return "\n".join(lines)


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  if (f.query is None) == (f.queries_file is None):
    raise app.UsageError("give exactly one of --query and --queries_file")
  try:
    texts = [f.query] if f.query is not None else read_queries(f.queries_file)
    emb = gallery.load(f.emb, verify=f.verify)
    scores, rows = search_texts(emb, texts, f.k, f.index, f.workdir, f.faiss_factory, f.nprobe)
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f"error: {e}")
  print(format_results(emb, texts, scores, rows))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
