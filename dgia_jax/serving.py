"""The search service over an export (`python -m dgia_jax.tools.serve`): a web page and a JSON API.

  GET /api/search?q=<text>&k=<n>         the top-k images of a description
  GET /api/search?caption=<row>&k=<n>    the same for a caption of the export; each result says whether
                                         it shows that caption's person (where person ids are known)
  GET /api/captions/random               a caption of the export: {"row", "caption", "person_id"}
  GET /images/<row>                      an image the export lists, by its row
  GET /                                  the page: a query box and the top-k as a grid of thumbnails

Everything is loaded once (`SearchService`): the export (checked against its manifest), the run's
text tower compiled for batches of `query_batch` queries, the gallery's index. Queries that
arrive together are embedded together (`_Batcher`: each waits a few milliseconds for others),
then searched as `gallery.exact_search` does (or through FAISS). No path a client sends reaches
the file system: images are addressed by row, and only the files the manifest lists are read.
Bad input gets a 4xx JSON body {"error": "<what>"}, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from dgia_jax import errors, gallery, inference
from dgia_jax.data import datasets


class RequestError(Exception):
  """A request the service refuses: `status` (4xx) and a message naming the problem."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _media_type(data: bytes) -> str:
  if data[:3] == b"\xff\xd8\xff":
    return "image/jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "image/png"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "image/webp"
  return "application/octet-stream"


class SearchService:
  """An export, the run that made it and its compiled text tower, ready for queries.

  Args:
    emb_dir: the export (`tools.export`).
    workdir: the training run (default: the one the export names).
    index: "exact" (`gallery.exact_search`) or "faiss" (`gallery.faiss_index`, `faiss_factory`, `nprobe`).
    query_batch: queries embedded and searched per call (padded), so shapes never change.
  """

  def __init__(self, emb_dir: str, workdir: str | None = None, index: str = "exact", faiss_factory: str = "Flat",
               nprobe: int = 8, query_batch: int = 16, verify: bool = True):
    self.emb = gallery.load(emb_dir, verify=verify)
    m = self.emb.manifest
    self.run = inference.load_trained(workdir or m["workdir"], m["step"], m.get("best", False))
    self.encoder = inference.TextEncoder(self.run, query_batch)
    self.size = m["counts"]["images"]
    self._faiss = gallery.faiss_index(self.emb.images, faiss_factory, nprobe) if index == "faiss" else None
    self._image_bytes = self._image_reader()
    self.search(["warm up"], [1])  # compile the search too

  def _image_reader(self):
    """row -> the image file's bytes: from the data set for a split export, from the folder for own images."""
    m = self.emb.manifest
    if m.get("source") == "images":
      def from_folder(row: int) -> bytes:
        path = os.path.join(m["images_dir"], self.emb.image_index[row]["path"])
        try:
          with open(path, "rb") as f:
            return f.read()
        except OSError as e:
          raise RequestError(404, f"image row {row}: {path} cannot be read since the export: {e.strerror}") from e

      return from_folder
    _, splits = datasets.load(self.run.config.data, (m["split"],))
    split = splits[m["split"]]
    if split.image_paths != [r["path"] for r in self.emb.image_index]:
      raise errors.BadInputError(f"the images of split '{m['split']}' differ from those of {self.emb.path}: the "
                                 "data set changed since export; export again")
    return split.image_bytes

  def search(self, texts: list[str], ks: list[int]) -> list[dict]:
    """For each text and its k: its word pieces, whether they were cut, and the top-k (scores, rows)."""
    feats, pieces = self.encoder.embed(texts)
    # A k rounded up to a power of two: the jitted top-k compiles once per such k, not per k asked for.
    k_search = min(1 << (max(ks) - 1).bit_length(), self.size)
    if self._faiss is not None:
      scores, rows = gallery.faiss_search(feats, self._faiss, k_search)
    else:
      padded = np.concatenate([feats, np.zeros((-len(feats) % self.encoder.batch, feats.shape[1]), feats.dtype)])
      scores, rows = gallery.exact_search(padded, self.emb.images, k_search)
    return [{"tokens": int(n), "truncated": bool(n > self.encoder.max_pieces), "scores": scores[i, :k],
             "rows": rows[i, :k]} for i, (n, k) in enumerate(zip(pieces, ks))]

  def image(self, row_text: str) -> tuple[bytes, str]:
    """(bytes, media type) of image row `row_text`; anything but a listed row is refused."""
    if not row_text.isdigit() or int(row_text) >= self.size:
      raise RequestError(404, f"no image row {row_text!r}: images are addressed by their row, 0 to {self.size - 1}")
    data = self._image_bytes(int(row_text))
    return data, _media_type(data)


class _Batcher:
  """Queries that arrive together are embedded together: the first waits `wait_s` for others, up to
  the encoder's batch, and one worker thread runs the calls (JAX releases the GIL meanwhile)."""

  def __init__(self, service: SearchService, wait_s: float = 0.005):
    self._service, self._wait_s = service, wait_s
    self._queue: asyncio.Queue = asyncio.Queue()
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="search")
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def search(self, text: str, k: int) -> dict:
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((text, k, future))
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = [await self._queue.get()]
      deadline = loop.time() + self._wait_s
      while len(items) < self._service.encoder.batch and (left := deadline - loop.time()) > 0:
        try:
          items.append(await asyncio.wait_for(self._queue.get(), left))
        except asyncio.TimeoutError:
          break
      try:
        found = await loop.run_in_executor(self._worker, self._service.search, [t for t, _, _ in items],
                                           [k for _, k, _ in items])
      except Exception as e:  # noqa: BLE001 (handed to every waiting request)
        for _, _, future in items:
          future.set_exception(e)
      else:
        for (_, _, future), result in zip(items, found):
          future.set_result(result)

  async def close(self) -> None:
    self._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await self._task
    self._worker.shutdown()


def _parse_k(text: str | None, size: int) -> int:
  if text is None:
    return min(10, size)
  try:
    k = int(text)
  except ValueError:
    raise RequestError(400, f"k must be a whole number, got {text!r}") from None
  if not 1 <= k <= size:
    raise RequestError(400, f"k must be between 1 and {size} (the gallery's size), got {k}")
  return k


def create_app(service: SearchService) -> FastAPI:
  """The FastAPI application of `service` (routes: module docstring)."""
  batcher: dict[str, _Batcher] = {}

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher["live"] = _Batcher(service)
    yield
    await batcher["live"].close()

  app = FastAPI(title="dgia-jax search", lifespan=lifespan)
  texts = service.emb.text_index

  @app.exception_handler(RequestError)
  async def refused(request: Request, e: RequestError):
    return JSONResponse({"error": str(e)}, status_code=e.status)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, e: HTTPException):
    return JSONResponse({"error": f"{e.detail}: {request.url.path}"}, status_code=e.status_code)

  @app.get("/api/search")
  async def search(q: str | None = None, caption: str | None = None, k: str | None = None):
    started = time.perf_counter()
    if (q is None) == (caption is None):
      raise RequestError(400, "give one of q (a description) or caption (the row of one of the export's captions)")
    person = None
    if caption is not None:
      if not caption.isdigit() or int(caption) >= len(texts):
        raise RequestError(404, f"no caption row {caption!r}: the export holds {len(texts)} captions")
      q, person = texts[int(caption)]["caption"], texts[int(caption)].get("person_id")
    if not q.strip():
      raise RequestError(400, "the query is empty: describe the person to look for")
    count = _parse_k(k, service.size)
    found = await batcher["live"].search(q, count)
    results = []
    for rank, (score, row) in enumerate(zip(found["scores"], found["rows"]), 1):
      item = service.emb.image_index[int(row)]
      result = {"rank": rank, "score": float(score), "row": int(row), "path": item["path"],
                "image_url": f"/images/{int(row)}"}
      if "person_id" in item:
        result["person_id"] = item["person_id"]
        if person is not None:
          result["match"] = item["person_id"] == person
      results.append(result)
    return {"query": q, "tokens": found["tokens"], "max_tokens": service.encoder.max_pieces,
            "truncated": found["truncated"], "k": count, "gallery": service.size, "person_id": person,
            "latency_ms": round(1000 * (time.perf_counter() - started), 2), "results": results}

  @app.get("/api/captions/random")
  async def random_caption():
    if not texts:
      raise RequestError(404, "this export holds no captions (own images): type a description")
    row = random.randrange(len(texts))
    return {"row": row, "caption": texts[row]["caption"], "person_id": texts[row].get("person_id")}

  @app.get("/images/{row:path}")
  async def image(row: str):
    data, media_type = service.image(row)
    return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return _PAGE.replace("__GALLERY__", str(service.size)).replace("__CAPTIONS__", str(len(texts)))

  return app


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dgia-jax search</title>
<style>
 body{font-family:sans-serif;margin:24px;background:#fafafa}
 form{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
 #q{flex:1;min-width:320px;font-size:16px;padding:6px}
 #k{width:64px;font-size:16px;padding:6px}
 #status{color:#555;margin:12px 0;min-height:1.2em}
 #results{display:flex;flex-wrap:wrap;gap:10px}
 .tile{margin:0;text-align:center;background:#fff;padding:4px;border:4px solid #ddd;border-radius:4px}
 .tile.hit{border-color:#1a9c3a} .tile.miss{border-color:#d62728}
 .tile img{height:180px;display:block;image-rendering:pixelated}
 .tile figcaption{font-size:13px;margin-top:4px}
 .error{color:#d62728}
</style></head>
<body>
<h1>Find a person by description</h1>
<p>__GALLERY__ images. Type what the person looks like; or take one of the export's __CAPTIONS__ captions, and each
result is framed green if it shows that caption's person, red if not.</p>
<form id="search">
 <input id="q" name="q" placeholder="a woman in a red coat carrying a black backpack" autofocus>
 <label>k <input id="k" name="k" type="number" value="10" min="1"></label>
 <button id="go" type="submit">Search</button>
 <button id="random" type="button">Random caption</button>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
let captionRow = null;
const q = document.getElementById("q"), k = document.getElementById("k");
const status = document.getElementById("status"), results = document.getElementById("results");
q.addEventListener("input", () => { captionRow = null; });
document.getElementById("random").addEventListener("click", async () => {
  const r = await fetch("/api/captions/random"), body = await r.json();
  if (!r.ok) { status.innerHTML = '<span class="error">' + body.error + '</span>'; return; }
  q.value = body.caption; captionRow = body.row; search();
});
document.getElementById("search").addEventListener("submit", (e) => { e.preventDefault(); search(); });
async function search() {
  const params = new URLSearchParams({k: k.value});
  if (captionRow !== null) params.set("caption", captionRow); else params.set("q", q.value);
  status.textContent = "searching ...";
  const r = await fetch("/api/search?" + params), body = await r.json();
  results.innerHTML = "";
  if (!r.ok) { status.innerHTML = '<span class="error">' + body.error + '</span>'; return; }
  status.textContent = body.results.length + " results in " + body.latency_ms.toFixed(1) + " ms; query of " +
      body.tokens + " word pieces" + (body.truncated ? " (cut to " + body.max_tokens + ")" : "");
  for (const item of body.results) {
    const tile = document.createElement("figure");
    tile.className = "tile" + ("match" in item ? (item.match ? " hit" : " miss") : "");
    const img = document.createElement("img");
    img.src = item.image_url; img.alt = item.path; img.title = item.path;
    const cap = document.createElement("figcaption");
    cap.className = "score"; cap.textContent = item.rank + ". " + item.score.toFixed(4);
    tile.append(img, cap); results.append(tile);
  }
}
</script>
</body></html>
"""
