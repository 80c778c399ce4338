"""The search service under load: queries/s, latency and memory over a 100,000-image gallery.

Builds, in a temporary folder, a run of the small CPU model (random weights: speed does not
depend on them), a tokenizer, and an export of 100,000 random unit image embeddings; starts
`python -m dgia_jax.tools.serve` on a free loopback port; then, for each client count, that many
clients each send their next query as soon as the last is answered (GET /api/search, k = 10,
captions of the synthetic set's vocabulary) for `--seconds`. Reports per client count the
queries/s, p50 / p99 / max latency, the errors (non-200 answers; must be 0) and the server's
resident memory, now and at its peak.

  python -m benchmarks.serve [--clients 1,8,32] [--seconds 20] [--index exact|faiss] [--gallery 100000]

Prints one JSON line; progress on stderr.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import jax
import numpy as np

from dgia_jax.common import config_files, parallel
from dgia_jax.data import tokenizer as tokenizer_lib
from dgia_jax.gallery import exports
from dgia_jax.run import checkpointing, rundir
from dgia_jax.training import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a man woman girl boy wearing red blue black white grey green yellow coat jacket shirt skirt trousers jeans "
         "shorts shoes sneakers boots bag backpack handbag hat glasses long short hair carrying walking").split()


def make_run_and_export(root: str, gallery_rows: int) -> str:
  """A run directory (small model, random weights, a tokenizer of WORDS) and an export of
  `gallery_rows` random images; returns the export's directory."""
  tok_path = os.path.join(root, "tokenizer.json")
  tokenizer_lib.train_bpe([" ".join(WORDS)] * 8, vocab_size=200).save(tok_path)
  config = config_files.load_config(os.path.join(ROOT, "configs", "synthetic_scratch.py"))
  config.data.tokenizer = tok_path
  tokenizer = tokenizer_lib.Tokenizer.from_file(tok_path, config.data.context_length)
  run = rundir.RunDir(os.path.join(root, "run"))
  run.write_config(config)
  built = build.training(config, tokenizer, 100, 8, parallel.make_mesh())
  ckpt = checkpointing.Checkpointer(run.checkpoints, async_save=False)
  ckpt.save(0, {"params": built.state.params}, force=True)
  ckpt.close()
  dim = config.model.embed_dim
  feats = np.random.default_rng(0).normal(size=(gallery_rows, dim)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  rows = {"images": [{"row": i, "path": f"gallery/{i:06d}.jpg", "size": 0, "mtime_ns": 0} for i in range(gallery_rows)],
          "texts": []}
  meta = {"source": "images", "workdir": run.path, "step": 0, "best": False, "images_dir": os.path.join(root, "imgs"),
          "image_size": list(config.data.image_size), "resize": config.data.resize, "config": config.to_dict()}
  out = os.path.join(root, "emb")
  exports.write_export(out, {"images": feats, "texts": np.zeros((0, dim), np.float32)}, rows, meta, 65536, "npy")
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _memory_mb(pid: int) -> dict[str, float]:
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}


async def _load(base: str, clients: int, seconds: float) -> dict:
  """`clients` clients, each sending its next query as soon as the last is answered, for `seconds`."""
  latencies, errors = [], 0
  deadline = time.perf_counter() + seconds

  async def client(seed: int) -> None:
    nonlocal errors
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
      while time.perf_counter() < deadline:
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 14))))
        started = time.perf_counter()
        answer = await http.get("/api/search", params={"q": query, "k": 10})
        latencies.append(time.perf_counter() - started)
        errors += answer.status_code != 200

  started = time.perf_counter()
  await asyncio.gather(*(client(i) for i in range(clients)))
  elapsed = time.perf_counter() - started
  ms = np.asarray(latencies) * 1000
  return {"queries": len(latencies), "queries_per_s": round(len(latencies) / elapsed, 1),
          "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
                         "max": round(float(ms.max()), 2)}, "errors": errors}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--clients", default="1,8,32", help="client counts, one load phase each")
  parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
  parser.add_argument("--gallery", type=int, default=100_000, help="images in the gallery")
  parser.add_argument("--index", choices=("exact", "faiss"), default="exact")
  args = parser.parse_args()
  out = {"benchmark": "serve", "gallery": args.gallery, "index": args.index, "device": jax.devices()[0].device_kind,
         "cores": os.cpu_count(), "seconds_per_phase": args.seconds}
  with tempfile.TemporaryDirectory() as root:
    emb = make_run_and_export(root, args.gallery)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "dgia_jax.tools.serve", "--emb", emb, "--port", str(port),
                               "--index", args.index, "--compilation_cache_dir="], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
      started = time.perf_counter()
      while True:
        if server.poll() is not None:
          raise SystemExit("error: the server exited before it answered")
        try:
          if httpx.get(base + "/", timeout=2).status_code == 200:
            break
        except httpx.HTTPError:
          time.sleep(0.5)
      out["server_start_seconds"] = round(time.perf_counter() - started, 1)
      out["server_memory_idle"] = {k: round(v, 1) for k, v in _memory_mb(server.pid).items()}
      for clients in map(int, args.clients.split(",")):
        print(f"{clients} clients for {args.seconds:g} s", file=sys.stderr, flush=True)
        phase = asyncio.run(_load(base, clients, args.seconds))
        phase["server_memory"] = {k: round(v, 1) for k, v in _memory_mb(server.pid).items()}
        out[f"clients_{clients}"] = phase
    finally:
      server.terminate()
      server.wait(timeout=30)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
