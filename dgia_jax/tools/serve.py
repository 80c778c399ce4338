"""Serves a search page and a JSON API over an export (`dgia_jax.serving`), with uvicorn.

  python -m dgia_jax.tools.serve --emb emb/ [--host 127.0.0.1] [--port 8000] [--index faiss]

Then open http://127.0.0.1:8000/ (or GET /api/search?q=a+woman+in+a+red+coat&k=10). The run's
text tower is compiled at start-up, before the first request is taken.
"""

import uvicorn
from absl import flags

from dgia_jax import cli, serving

_EMB = flags.DEFINE_string("emb", None, "Export directory (python -m dgia_jax.tools.export).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (default: the one the export names).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_INDEX = flags.DEFINE_enum("index", "exact", ("exact", "faiss"), "Exact jitted search, or a FAISS index.")
_FAISS_FACTORY = flags.DEFINE_string("faiss_factory", "Flat", "FAISS index factory string (Flat: exact).")
_NPROBE = flags.DEFINE_integer("nprobe", 8, "Inverted lists searched by an IVF FAISS index.")
_QUERY_BATCH = flags.DEFINE_integer("query_batch", 16, "Queries embedded together, at most.")
_VERIFY = flags.DEFINE_bool("verify", True, "Check every shard's sha256 against the manifest first.")
flags.mark_flags_as_required(["emb"])


def main(argv):
  cli.start(argv)
  service = serving.SearchService(_EMB.value, _WORKDIR.value, _INDEX.value, _FAISS_FACTORY.value, _NPROBE.value,
                                  _QUERY_BATCH.value, _VERIFY.value)
  print(f"dgia-jax: serving {service.size} images of {_EMB.value} at http://{_HOST.value}:{_PORT.value}/", flush=True)
  uvicorn.run(serving.create_app(service), host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
  cli.run(main)
