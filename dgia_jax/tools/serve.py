"""Serves a search page and a JSON API over an export (`dgia_jax.serving`), with uvicorn.

  python -m dgia_jax.tools.serve --emb emb/ [--host 127.0.0.1] [--port 8000] [--index faiss]
  DGIA_JAX_TOKEN=... python -m dgia_jax.tools.serve --emb emb/ --host 0.0.0.0 --allowed_hosts search.example.org

Then open http://127.0.0.1:8000/ (or GET /api/search?q=a+woman+in+a+red+coat&k=10). The run's
text tower is compiled at start-up, before the first request is taken. It answers only for the
names in `--allowed_hosts` (loopback by default); listening beyond loopback needs a token
(`--token` or `DGIA_JAX_TOKEN`): open /?token=<token> once in a browser, or send
`Authorization: Bearer <token>`. The port is taken before anything else starts, so a port in use
is one `error:` line.
"""

import os
import socket

import uvicorn
from absl import flags

from dgia_jax import cli
from dgia_jax.common import errors
from dgia_jax.gallery import serving

_EMB = flags.DEFINE_string("emb", None, "Export directory (python -m dgia_jax.tools.export).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (default: the one the export names).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The field checkpoint an export of one was made with, if it "
                                  "moved (default: the one the export names).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface; needs a token).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free one).", lower_bound=0, upper_bound=65535)
_ALLOWED_HOSTS = flags.DEFINE_list("allowed_hosts", [], "Host names clients reach the service by (the Host header); "
                                   "loopback names are always allowed.")
_TOKEN = flags.DEFINE_string("token", None, "A secret every request must carry (default: $DGIA_JAX_TOKEN); "
                             "required when --host is not loopback.")
_DOCS = flags.DEFINE_bool("docs", False, "Serve FastAPI's /docs and /openapi.json too.")
_INDEX = flags.DEFINE_enum("index", "exact", ("exact", "faiss"), "Exact jitted search, or a FAISS index.")
_FAISS_FACTORY = flags.DEFINE_string("faiss_factory", "Flat", "FAISS index factory string (Flat: exact).")
_NPROBE = flags.DEFINE_integer("nprobe", 8, "Inverted lists searched by an IVF FAISS index.", lower_bound=1)
_QUERY_BATCH = flags.DEFINE_integer("query_batch", 16, "Queries embedded together, at most.", lower_bound=1,
                                    upper_bound=1024)
_VERIFY = flags.DEFINE_bool("verify", True, "Check every shard's sha256 against the manifest first.")
flags.mark_flags_as_required(["emb"])


def listening_socket(host: str, port: int) -> socket.socket:
  """A socket bound to (host, port), before the service starts: a port in use or an address this
  machine does not have is a ConfigError naming them."""
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except (OSError, UnicodeError) as e:
    raise errors.ConfigError(f"cannot listen on --host {host} --port {port}: {getattr(e, 'strerror', None) or e}") from e
  return sock


def main(argv):
  cli.start(argv)
  token = _TOKEN.value if _TOKEN.value is not None else os.environ.get("DGIA_JAX_TOKEN") or None
  if not serving.is_loopback(_HOST.value):
    if not token:
      raise errors.ConfigError(f"--host {_HOST.value} listens beyond this machine: give a secret with --token or "
                               "DGIA_JAX_TOKEN (or listen on 127.0.0.1)")
    if not _ALLOWED_HOSTS.value:
      raise errors.ConfigError(f"--host {_HOST.value} listens beyond this machine: name the hosts clients reach it by "
                               "with --allowed_hosts (the Host header they send)")
  sock = listening_socket(_HOST.value, _PORT.value)
  service = serving.SearchService(_EMB.value, _WORKDIR.value, _INDEX.value, _FAISS_FACTORY.value, _NPROBE.value,
                                  _QUERY_BATCH.value, _VERIFY.value, _CHECKPOINT.value)
  hosts = serving.LOOPBACK_HOSTS + tuple(_ALLOWED_HOSTS.value)
  app = serving.create_app(service, hosts, token, _DOCS.value)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(f"dgia-jax: serving {service.size} images of {_EMB.value} at http://{shown}:{port}/", flush=True)
  uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])


if __name__ == "__main__":
  cli.run(main)
