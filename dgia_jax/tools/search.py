"""Text search over exported image embeddings: the top-k images of a description, with scores.

  python -m dgia_jax.tools.search --emb emb/ --query "a woman in a red coat with a black backpack" -k 10
  python -m dgia_jax.tools.search --emb emb/ --queries_file queries.txt -k 10      # one query a line
  python -m dgia_jax.tools.search --emb emb/ --query "..." --index faiss [--faiss_factory IVF1024,PQ32]

Queries are embedded by the text tower of the run and checkpoint the export names
(`--workdir` if the run has moved). Exact search is a jitted matmul + top-k per shard
(`searcher.exact_search`); `--index faiss` builds a FAISS index shard by shard instead
(faiss-cpu, imported only then).
"""

import numpy as np
from absl import flags

from dgia_jax import cli
from dgia_jax.common import errors
from dgia_jax.gallery import exports, searcher

_EMB = flags.DEFINE_string("emb", None, "Export directory (python -m dgia_jax.tools.export).")
_QUERY = flags.DEFINE_string("query", None, "One text query.")
_QUERIES_FILE = flags.DEFINE_string("queries_file", None, "File of text queries, one a line (batch mode).")
_K = flags.DEFINE_integer("k", 10, "Results per query (at most the gallery's size are found).", lower_bound=1,
                          upper_bound=100_000)
_INDEX = flags.DEFINE_enum("index", "exact", ("exact", "faiss"), "Exact jitted search, or a FAISS index.")
_FAISS_FACTORY = flags.DEFINE_string("faiss_factory", "Flat", "FAISS index factory string (Flat: exact).")
_NPROBE = flags.DEFINE_integer("nprobe", 8, "Inverted lists searched by an IVF FAISS index.", lower_bound=1)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (default: the one the export names).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The field checkpoint an export of one was made with, if it "
                                  "moved (default: the one the export names).")
_VERIFY = flags.DEFINE_bool("verify", True, "Check every shard's sha256 against the manifest first.")
flags.mark_flags_as_required(["emb"])


def format_results(emb: exports.Embeddings, texts: list[str], scores: np.ndarray, rows: np.ndarray) -> str:
  """One block per query: its text, then rank, score, person id and path of each result."""
  lines = []
  for q, text in enumerate(texts):
    lines.append(f"query {q + 1}: {text}")
    for rank, (score, row) in enumerate(zip(scores[q], rows[q]), 1):
      item = emb.image_index[row]
      person = f"person {item['person_id']}" if "person_id" in item else "person ?"  # own images carry none
      lines.append(f"  {rank:3d}  {score:.4f}  {person}  {item['path']}")
  return "\n".join(lines)


def main(argv):
  cli.start(argv)
  if (_QUERY.value is None) == (_QUERIES_FILE.value is None):
    raise errors.ConfigError("give exactly one of --query and --queries_file")
  texts = [_QUERY.value] if _QUERY.value is not None else searcher.read_queries(_QUERIES_FILE.value)
  emb = exports.load(_EMB.value, verify=_VERIFY.value)
  scores, rows = searcher.search_texts(emb, texts, _K.value, _INDEX.value, _WORKDIR.value, _FAISS_FACTORY.value,
                                      _NPROBE.value, _CHECKPOINT.value)
  print(format_results(emb, texts, scores, rows))


if __name__ == "__main__":
  cli.run(main)
