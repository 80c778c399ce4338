"""The search service over an export (`python -m dgia_jax.tools.serve`): a web page and a JSON API.

  GET /api/search?q=<text>&k=<n>         the top-k images of a description
  GET /api/search?caption=<row>&k=<n>    the same for a caption of the export; each result says whether
                                         it shows that caption's person (where person ids are known)
  GET /api/captions/random               a caption of the export: {"row", "caption", "person_id"}
  GET /images/<row>                      an image the export lists, by its row
  GET /                                  the page: a query box and the top-k as a grid of thumbnails

(HEAD too.) Everything is loaded once (`SearchService`): the export (checked against its manifest,
its index files by their sha256), the run's text tower compiled for batches of `query_batch`
queries, the gallery's `searcher.Searcher`. Queries that arrive together are embedded together
(`_Batcher`: each waits a few milliseconds for others).

What it serves is only what was exported: no path a client sends reaches the file system (images
are addressed by row), and an image's bytes are served only if they are the exported file's
(`exports.ExportedImages`; else 410 naming the row). Requests must name an allowed host (loopback
by default: DNS rebinding), carry the token when one is set (required off loopback), be GET or HEAD
without a body and with a short URL; every response carries a content security policy and the
usual hardening headers, the page writes server text with `textContent` only. A malformed
parameter is a 4xx JSON body {"error": "<what>"}, never a 500, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import ipaddress
import random
import re
import time
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from dgia_jax.common import errors
from dgia_jax.gallery import exports, searcher
from dgia_jax.inference import encoding, rebuild

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "dgia_jax_token"
MAX_URL_BYTES = 4096  # path and query string; a description needs far less
MAX_QUERY_CHARS = 1000
MAX_K = 1000
_ROW = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() takes '²' and Arabic-Indic digits


class RequestError(Exception):
  """A request the service refuses: `status` (4xx) and a message naming the problem."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def is_loopback(host: str) -> bool:
  """Whether `host` (a name or address to listen on) is this machine only."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _media_type(data: bytes) -> str:
  if data[:3] == b"\xff\xd8\xff":
    return "image/jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "image/png"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "image/webp"
  return "application/octet-stream"


def parse_row(text: str | None, size: int, what: str) -> int:
  """Row `text` (ASCII digits) of `size` rows; RequestError (404) names anything else."""
  if text is None or not _ROW.fullmatch(text) or int(text) >= size:
    shown = text if text is None or len(text) <= 40 else text[:40] + "…"
    raise RequestError(404, f"no {what} row {shown!r}: the export holds {size}, addressed 0 to {size - 1}")
  return int(text)


def parse_k(text: str | None, size: int) -> int:
  """The result count `text` (ASCII digits, 1 to min(size, MAX_K)); default 10."""
  most = min(size, MAX_K)
  if text is None:
    return min(10, most)
  if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= most:
    shown = text if len(text) <= 40 else text[:40] + "…"
    raise RequestError(400, f"k must be a whole number from 1 to {most}, got {shown!r}")
  return int(text)


class SearchService:
  """An export, the run that made it and its compiled text tower, ready for queries.

  Args:
    emb_dir: the export (`tools.export`).
    workdir, checkpoint: the training run or field checkpoint, if it moved (default: the one the export names).
    index, faiss_factory, nprobe: the `searcher.Searcher`.
    query_batch: queries embedded and searched per call (padded), so shapes never change.
  """

  def __init__(self, emb_dir: str, workdir: str | None = None, index: str = "exact", faiss_factory: str = "Flat",
               nprobe: int = 8, query_batch: int = 16, verify: bool = True, checkpoint: str | None = None):
    if query_batch < 1:
      raise errors.ConfigError(f"--query_batch must be at least 1, got {query_batch}")
    self.emb = exports.load(emb_dir, verify=verify)
    m = self.emb.manifest
    self.size = m["counts"]["images"]
    if not self.size:
      raise errors.BadInputError(f"{emb_dir} holds no images to search")
    self.searcher = searcher.Searcher(self.emb.images, index, faiss_factory, nprobe, query_block=query_batch)
    self.images = exports.ExportedImages(self.emb)
    self.run = rebuild.load_model(rebuild.model_of_manifest(m, workdir, checkpoint), m["step"], m.get("best", False))
    self.encoder = encoding.TextEncoder(self.run, query_batch, warn=False)
    self.search(["warm up"], [1])  # compile the search too

  def search(self, texts: list[str], ks: list[int]) -> list[dict]:
    """For each text and its k: its word pieces, whether they were cut, and the top-k (scores, rows)."""
    feats, pieces = self.encoder.embed(texts)
    scores, rows = self.searcher.search(feats, max(ks))
    return [{"tokens": int(n), "truncated": bool(n > self.encoder.max_pieces), "scores": scores[i, :k],
             "rows": rows[i, :k]} for i, (n, k) in enumerate(zip(pieces, ks))]

  def image(self, row_text: str) -> tuple[bytes, str]:
    """(bytes, media type) of image row `row_text`: 404 for anything but a listed row, 410 for an
    image that is no longer what was exported."""
    row = parse_row(row_text, self.size, "image")
    try:
      data = self.images.bytes(row)
    except exports.ImageChanged as e:
      raise RequestError(410, str(e)) from e
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


def _host_of(header: str) -> str:
  """The host of a Host header, without its port (`[::1]:8000` -> `::1`), lower-case."""
  header = header.strip().lower()
  if header.startswith("["):
    return header[1:header.find("]")] if "]" in header else ""
  return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _sha256_source(text: str) -> str:
  return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class _Guard:
  """The ASGI layer in front of the application: the host allow-list, the method and size limits,
  the token, and the hardening headers on every response (a pure ASGI middleware, so it holds for
  errors too)."""

  def __init__(self, app, allowed_hosts: set[str], token: str | None, csp: str):
    self._app, self._hosts, self._token, self._csp = app, allowed_hosts, token, csp

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self._app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    refusal = self._refusal(scope, headers)

    async def hardened(message):
      if message["type"] == "http.response.start":
        message = {**message, "headers": list(message.get("headers", [])) + self._security_headers()}
      await send(message)

    if refusal is None:
      return await self._app(scope, receive, hardened)
    status, text = refusal
    body = JSONResponse({"error": text}, status_code=status, headers={"Cache-Control": "no-store"})
    await body(scope, receive, hardened)

  def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
    if _host_of(headers.get("host", "")) not in self._hosts:
      return 400, "this service does not answer for that Host (allowed: see --allowed_hosts)"
    if scope["method"] not in ("GET", "HEAD"):
      return 405, f"method {scope['method']} is not allowed: GET or HEAD"
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
      return 413, "requests carry no body"
    if len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) > MAX_URL_BYTES:
      return 414, f"the URL is longer than {MAX_URL_BYTES} bytes"
    if self._token is not None and not self._authorised(scope, headers):
      return 401, "a token is required: open /?token=<token> once, or send Authorization: Bearer <token>"
    return None

  def _authorised(self, scope, headers: dict[str, str]) -> bool:
    offered = []
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
      offered.append(auth[7:].strip())
    for part in headers.get("cookie", "").split(";"):
      name, _, value = part.strip().partition("=")
      if name == TOKEN_COOKIE:
        offered.append(value)
    if scope["path"] == "/":
      offered += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
    return any(hmac.compare_digest(o.encode(), self._token.encode()) for o in offered)

  def _security_headers(self) -> list[tuple[bytes, bytes]]:
    return [(b"content-security-policy", self._csp.encode()), (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-resource-policy", b"same-origin"), (b"cross-origin-opener-policy", b"same-origin")]


def create_app(service: SearchService, allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS, token: str | None = None,
               docs: bool = False):
  """The application of `service` (routes: module docstring) behind its guard: requests for a host
  outside `allowed_hosts` are refused; with `token`, every request must carry it. `docs`: FastAPI's
  /docs and /openapi.json (off by default)."""
  batcher: dict[str, _Batcher] = {}

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher["live"] = _Batcher(service)
    yield
    await batcher["live"].close()

  app = FastAPI(title="dgia-jax search", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                openapi_url="/openapi.json" if docs else None)
  texts = service.emb.text_index

  @app.exception_handler(RequestError)
  async def refused(request: Request, e: RequestError):
    return JSONResponse({"error": str(e)}, status_code=e.status, headers={"Cache-Control": "no-store"})

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, e: HTTPException):
    return JSONResponse({"error": f"{e.detail}: {request.url.path[:200]}"}, status_code=e.status_code)

  @app.exception_handler(errors.UserError)
  async def user_error(request: Request, e: errors.UserError):
    return JSONResponse({"error": str(e)}, status_code=400, headers={"Cache-Control": "no-store"})

  @app.api_route("/api/search", methods=["GET", "HEAD"])
  async def search(q: str | None = None, caption: str | None = None, k: str | None = None):
    started = time.perf_counter()
    if (q is None) == (caption is None):
      raise RequestError(400, "give one of q (a description) or caption (the row of one of the export's captions)")
    person = None
    if caption is not None:
      row = parse_row(caption, len(texts), "caption")
      q, person = texts[row]["caption"], texts[row].get("person_id")
    if not q.strip():
      raise RequestError(400, "the query is empty: describe the person to look for")
    if len(q) > MAX_QUERY_CHARS:
      raise RequestError(400, f"the query is longer than {MAX_QUERY_CHARS} characters")
    count = parse_k(k, service.size)
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
    return JSONResponse({"query": q, "tokens": found["tokens"], "max_tokens": service.encoder.max_pieces,
                         "truncated": found["truncated"], "k": count, "gallery": service.size, "person_id": person,
                         "latency_ms": round(1000 * (time.perf_counter() - started), 2), "results": results},
                        headers={"Cache-Control": "no-store"})

  @app.api_route("/api/captions/random", methods=["GET", "HEAD"])
  async def random_caption():
    if not texts:
      raise RequestError(404, "this export holds no captions (own images): type a description")
    row = random.randrange(len(texts))
    return JSONResponse({"row": row, "caption": texts[row]["caption"], "person_id": texts[row].get("person_id")},
                        headers={"Cache-Control": "no-store"})

  @app.api_route("/images/{row:path}", methods=["GET", "HEAD"])
  async def image(row: str):
    data, media_type = service.image(row)
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

  @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
  async def page(request: Request):
    if token is not None and request.query_params.get("token") is not None:  # the guard checked it
      response = RedirectResponse("/", status_code=303)
      response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
      return response
    return HTMLResponse(_PAGE.replace("__GALLERY__", str(service.size)).replace("__CAPTIONS__", str(len(texts))),
                        headers={"Cache-Control": "no-store"})

  csp = (f"default-src 'none'; script-src {_sha256_source(_SCRIPT)}; style-src {_sha256_source(_STYLE)}; "
         "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
  return _Guard(app, {h.lower().strip("[]") for h in allowed_hosts}, token, csp)


_STYLE = """
 body{font-family:sans-serif;margin:24px;background:#fafafa}
 form{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
 #q{flex:1;min-width:320px;font-size:16px;padding:6px}
 #k{width:64px;font-size:16px;padding:6px}
 #status{color:#555;margin:12px 0;min-height:1.2em}
 #status.error{color:#d62728}
 #results{display:flex;flex-wrap:wrap;gap:10px}
 .tile{margin:0;text-align:center;background:#fff;padding:4px;border:4px solid #ddd;border-radius:4px}
 .tile.hit{border-color:#1a9c3a} .tile.miss{border-color:#d62728}
 .tile img{height:180px;display:block;image-rendering:pixelated}
 .tile figcaption{font-size:13px;margin-top:4px}
"""

_SCRIPT = """
let captionRow = null;
const q = document.getElementById("q"), k = document.getElementById("k");
const status = document.getElementById("status"), results = document.getElementById("results");
function say(text, isError) { status.textContent = text; status.className = isError ? "error" : ""; }
async function getJson(url) {
  const r = await fetch(url);
  let body;
  try { body = await r.json(); } catch (e) { body = {error: "the service answered " + r.status}; }
  return [r.ok, body];
}
q.addEventListener("input", () => { captionRow = null; });
document.getElementById("random").addEventListener("click", async () => {
  const [ok, body] = await getJson("/api/captions/random");
  if (!ok) { say(String(body.error), true); return; }
  q.value = body.caption; captionRow = body.row; search();
});
document.getElementById("search").addEventListener("submit", (e) => { e.preventDefault(); search(); });
async function search() {
  const params = new URLSearchParams({k: k.value});
  if (captionRow !== null) params.set("caption", captionRow); else params.set("q", q.value);
  say("searching ...", false);
  const [ok, body] = await getJson("/api/search?" + params);
  results.replaceChildren();
  if (!ok) { say(String(body.error), true); return; }
  say(body.results.length + " results in " + body.latency_ms.toFixed(1) + " ms; query of " + body.tokens +
      " word pieces" + (body.truncated ? " (cut to " + body.max_tokens + ")" : ""), false);
  for (const item of body.results) {
    const tile = document.createElement("figure");
    tile.className = "tile" + ("match" in item ? (item.match ? " hit" : " miss") : "");
    const img = document.createElement("img");
    img.src = "/images/" + Number(item.row); img.alt = String(item.path); img.title = String(item.path);
    const cap = document.createElement("figcaption");
    cap.className = "score"; cap.textContent = item.rank + ". " + Number(item.score).toFixed(4);
    tile.append(img, cap); results.append(tile);
  }
}
"""

_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dgia-jax search</title>
<style>{_STYLE}</style></head>
<body>
<h1>Find a person by description</h1>
<p>__GALLERY__ images. Type what the person looks like; or take one of the export's __CAPTIONS__ captions, and each
result is framed green if it shows that caption's person, red if not.</p>
<form id="search">
 <input id="q" name="q" maxlength="{MAX_QUERY_CHARS}" placeholder="a woman in a red coat carrying a black backpack"
  autofocus>
 <label>k <input id="k" name="k" type="number" value="10" min="1" max="{MAX_K}"></label>
 <button id="go" type="submit">Search</button>
 <button id="random" type="button">Random caption</button>
</form>
<div id="status"></div>
<div id="results"></div>
<script>{_SCRIPT}</script>
</body></html>
"""
