"""Exported embeddings: written in shards with a JSONL index, read back, searched by top-k.

`python -m dgia_jax.tools.export` writes an export of a split of the run's data set
(`export_split`) or of a folder of the user's own images (`export_images`); `tools.search`,
`tools.report` and `tools.serve` read it. Layout of an export directory (row i of an index is
row i of its shards, concatenated):

  manifest.json                  source ("split" or "images"), run config, checkpoint step (`best`:
                                 the best-on-validation one), workdir, split or images_dir, dim,
                                 counts, format, and every shard with its row count and sha256;
                                 an images export also lists the files it could not read
  images-00000-of-00001.npy      float32 [rows, D] L2-normalised image embeddings, in record (or
                                 sorted path) order, at most `shard_rows` rows per shard
  texts-00000-of-00001.npy       float32 [rows, D] caption embeddings, in caption order (none for images)
  images.jsonl                   one line per image: {"row", "record", "path", "person_id"} (a split), or
                                 {"row", "path", "size", "mtime_ns"} (own images: no person ids)
  texts.jsonl                    one line per caption: {"row", "caption", "record", "person_id"}
                                 (`record`: the row of the caption's image)

In the safetensors format the shards are `.safetensors` files holding one tensor,
`embeddings`. The index is JSONL, not Parquet: it needs no dependency (pyarrow is not
one), is read and written a line at a time, and diffs and greps like any text. An export is
written whole or not at all (`write_export`): a failed one leaves the previous export as it was.

The features are the evaluator's (`inference.extract_features`: eval transforms, the run's
eval batch size) and shards are written the same way each time, so two exports of one
checkpoint are bit-identical (equal sha256 in the manifest). Features are computed in
memory ([N, D] float32: 2 GB for a million 512-d images) and written in shards; exact
search holds one shard at a time on the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil

import ml_collections
import numpy as np
import safetensors.numpy

from dgia_jax import errors, inference, metrics, parallel, reporting
from dgia_jax.data import datasets, pipeline

MANIFEST_FILE = "manifest.json"
FORMATS = ("npy", "safetensors")
KINDS = ("images", "texts")
_TENSOR = "embeddings"  # the tensor's name in a .safetensors shard


def index_file(kind: str) -> str:
  return f"{kind}.jsonl"


def _shard_file(kind: str, index: int, count: int, fmt: str) -> str:
  return f"{kind}-{index:05d}-of-{count:05d}.{fmt}"


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_shards(out_dir: str, kind: str, feats: np.ndarray, shard_rows: int, fmt: str) -> list[dict]:
  """Writes feats [N, D] as float32 shards of at most `shard_rows` rows; their manifest entries."""
  count = max(1, -(-len(feats) // shard_rows))
  entries = []
  for i in range(count):
    part = np.ascontiguousarray(feats[i * shard_rows:(i + 1) * shard_rows], np.float32)
    name = _shard_file(kind, i, count, fmt)
    data = _shard_bytes(part, fmt)
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(data)
    entries.append({"file": name, "rows": len(part), "sha256": hashlib.sha256(data).hexdigest()})
  return entries


def _shard_bytes(part: np.ndarray, fmt: str) -> bytes:
  """The file contents of one shard float32 [n, D], so it is hashed as written, not read back."""
  if fmt == "safetensors":
    return safetensors.numpy.save({_TENSOR: part})
  buf = io.BytesIO()
  np.save(buf, part, allow_pickle=False)
  return buf.getvalue()


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


STAGING_DIR = ".staging"  # inside an export directory: the next export, until it is complete


def _manifest_in(out_dir: str) -> dict | None:
  """The manifest of the export in `out_dir`, or None if it holds none."""
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _listed_files(out_dir: str) -> set[str]:
  """The files of the export in `out_dir` (none if it holds none)."""
  old = _manifest_in(out_dir)
  if old is None:
    return set()
  return {e["file"] for kind in KINDS for e in old["shards"][kind]} | {index_file(kind) for kind in KINDS}


def check_options(fmt: str, shard_rows: int) -> None:
  """Refuses a shard format or size an export cannot be written with (before any work is done)."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
  if shard_rows < 1:
    raise errors.ConfigError(f"shard_rows must be positive, got {shard_rows}")


def write_export(out_dir: str, feats: dict[str, np.ndarray], rows: dict[str, list[dict]], meta: dict, shard_rows: int,
                 fmt: str) -> dict:
  """Writes an export (module docstring) whole or not at all; returns its manifest.

  `feats` and `rows` hold, per kind, float32 [N, D] embeddings and their N index rows; `meta` goes
  into the manifest. Every file is first written into `out_dir/.staging`; only when all are
  written are they moved in, the manifest last, and the files of the export there before that
  the new one does not reuse removed. A write that fails (disk full, file-size limit, read-only
  target) raises WriteError naming `out_dir` and leaves the export that was there as it was.
  Files in `out_dir` that are no export's are never touched.
  """
  check_options(fmt, shard_rows)
  staging = os.path.join(out_dir, STAGING_DIR)
  try:
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that failed
    os.makedirs(staging)
    shards = {kind: write_shards(staging, kind, feats[kind], shard_rows, fmt) for kind in KINDS}
    for kind in KINDS:
      _write_jsonl(os.path.join(staging, index_file(kind)), rows[kind])
    dims = {int(f.shape[1]) for f in feats.values() if len(f)}
    manifest = {**meta, "format": fmt, "dim": dims.pop() if dims else 0,
                "counts": {kind: len(feats[kind]) for kind in KINDS}, "shards": shards}
    reporting.write_json(os.path.join(staging, MANIFEST_FILE), manifest)
  except OSError as e:
    shutil.rmtree(staging, ignore_errors=True)
    kept = "; the export there before is intact" if os.path.exists(os.path.join(out_dir, MANIFEST_FILE)) else ""
    raise errors.WriteError(f"could not write the export to {out_dir}: {e}{kept}") from e
  old = _listed_files(out_dir)
  new = sorted(set(os.listdir(staging)) - {MANIFEST_FILE})
  for name in new + [MANIFEST_FILE]:
    os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
  for name in old - set(new):
    os.remove(os.path.join(out_dir, name))
  os.rmdir(staging)
  return manifest


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_DECODE_CHUNK = 1024  # own images decoded and embedded this many at a time (memory: ~150 MB at 384x128)


def list_images(images_dir: str) -> list[str]:
  """The image files (`IMAGE_SUFFIXES`, any case) under `images_dir`, recursively, as sorted paths relative to it."""
  if not os.path.isdir(images_dir):
    raise errors.MissingPathError(f"--images {images_dir} is not a folder")
  found = []
  for root, dirs, files in os.walk(images_dir):
    dirs.sort()
    found += [os.path.relpath(os.path.join(root, f), images_dir) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
  if not found:
    raise errors.BadInputError(f"--images {images_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
  return sorted(found)


def _file_key(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _previous_rows(out_dir: str, meta: dict) -> dict[tuple, np.ndarray]:
  """{(path, size, mtime_ns): embedding} of an earlier export of the same images with the same run,
  checkpoint and transforms in `out_dir` (empty if there is none)."""
  old = _manifest_in(out_dir)
  if old is None:
    return {}
  same = ("source", "workdir", "step", "best", "images_dir", "image_size", "resize")
  if any(old.get(k) != meta[k] for k in same):
    return {}
  emb = load(out_dir)
  feats = np.concatenate(emb.images) if emb.images else np.zeros((0, emb.manifest["dim"]), np.float32)
  return {(r["path"], r["size"], r["mtime_ns"]): feats[r["row"]] for r in emb.image_index}


def export_images(workdir: str, images_dir: str, out_dir: str, step: int | None = None, shard_rows: int = 65536,
                  fmt: str = "npy", best: bool = False, num_threads: int = 8) -> dict:
  """Embeds every image under `images_dir` (`list_images`) with the run's eval transforms and image
  tower, as an export with no captions and no person ids; returns the manifest.

  A file PIL cannot decode is listed in the manifest's `unreadable` (path and error), never
  dropped silently. If `out_dir` holds an export of the same folder by the same run, checkpoint and
  transforms, files whose path, size and modification time are unchanged keep their embedding
  and only the others are embedded (`manifest["embedded"]`, `["reused"]`); the export is rewritten
  whole (`write_export`).
  """
  check_options(fmt, shard_rows)
  run = inference.load_trained(workdir, step, best)
  data = run.config.data
  meta = {"source": "images", "workdir": os.path.abspath(workdir), "step": int(run.step), "best": best,
          "images_dir": os.path.abspath(images_dir), "image_size": list(data.image_size),
          "resize": data.get("resize", "bicubic"), "config": run.config.to_dict()}
  files = list_images(images_dir)
  keys = [(rel, *_file_key(os.path.join(images_dir, rel))) for rel in files]
  previous = _previous_rows(out_dir, meta)
  todo = [key for key in keys if key not in previous]
  mesh = parallel.make_mesh()
  encoders = inference.make_encoders(run.model, mesh)
  embedded, unreadable = dict(previous), []

  def decode(key):
    with open(os.path.join(images_dir, key[0]), "rb") as f:
      return pipeline.decode_image(f.read(), tuple(data.image_size), meta["resize"])

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # PIL decodes without the GIL
    for start in range(0, len(todo), _DECODE_CHUNK):
      chunk = todo[start:start + _DECODE_CHUNK]
      decoded = list(pool.map(lambda key: _try(decode, key), chunk))
      good = [(key, img) for key, img in zip(chunk, decoded) if not isinstance(img, Exception)]
      unreadable += [{"path": key[0], "error": str(img)} for key, img in zip(chunk, decoded) if isinstance(img, Exception)]
      if good:
        feats = inference.encode_images(encoders, run.params, np.stack([img for _, img in good]), mesh,
                                        run.config.eval.batch_size)
        embedded.update({key: f for (key, _), f in zip(good, feats)})
  kept = [key for key in keys if key in embedded]
  dim = run.model.cfg.embed_dim
  feats = np.stack([embedded[key] for key in kept]) if kept else np.zeros((0, dim), np.float32)
  rows = {"images": [{"row": i, "path": key[0], "size": key[1], "mtime_ns": key[2]} for i, key in enumerate(kept)],
          "texts": []}
  meta.update(embedded=len(todo) - len(unreadable), reused=sum(key in previous for key in kept), unreadable=unreadable)
  return write_export(out_dir, {"images": feats, "texts": np.zeros((0, dim), np.float32)}, rows, meta, shard_rows, fmt)


def _try(fn, arg):
  """`fn(arg)`, or the user error (an unreadable file) it raised."""
  try:
    return fn(arg)
  except (OSError, errors.BadInputError) as e:
    return e


def export_split(workdir: str, split_name: str, out_dir: str, step: int | None = None, shard_rows: int = 65536,
                 fmt: str = "npy", best: bool = False) -> dict:
  """Embeds every image and caption of `split_name` with checkpoint `step` of `workdir` (its
  best-on-validation one if `best`); returns the manifest."""
  check_options(fmt, shard_rows)
  config, _, model, params, step = inference.load_trained(workdir, step, best)
  _, splits = datasets.load(config.data, (split_name,))
  split = splits[split_name]
  mesh = parallel.make_mesh()
  txt, img = inference.extract_features(inference.make_encoders(model, mesh), params, split, mesh,
                                        config.eval.batch_size)
  rows = {"images": [{"row": r, "record": r, "path": p, "person_id": int(pid)}
                     for r, (p, pid) in enumerate(zip(split.image_paths, split.person_ids))],
          "texts": [{"row": i, "caption": c, "record": int(r), "person_id": int(split.person_ids[r])}
                    for i, (c, r) in enumerate(zip(split.pair_caption, split.pair_record))]}
  meta = {"source": "split", "workdir": os.path.abspath(workdir), "step": int(step), "best": best,
          "split": split_name, "config": config.to_dict()}
  return write_export(out_dir, {"images": img, "texts": txt}, rows, meta, shard_rows, fmt)


@dataclasses.dataclass
class Embeddings:
  """An export read back.

  Attributes:
    path: the export directory.
    manifest: its manifest.json.
    images, texts: shards, float32 [rows_i, D] each (memory-mapped for .npy).
    image_index, text_index: one dict per row (see the module docstring).
  """

  path: str
  manifest: dict
  images: list[np.ndarray]
  texts: list[np.ndarray]
  image_index: list[dict]
  text_index: list[dict]

  @property
  def config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.manifest["config"])


def _read_shard(path: str, entry: dict, fmt: str, dim: int, verify: bool) -> np.ndarray:
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{path} is missing (listed in the manifest)")
  if verify and sha256(path) != entry["sha256"]:
    raise errors.BadInputError(f"{path}: sha256 differs from the manifest's; the file changed after export")
  arr = np.load(path, mmap_mode="r") if fmt == "npy" else safetensors.numpy.load_file(path)[_TENSOR]
  if arr.shape != (entry["rows"], dim) or arr.dtype != np.float32:
    raise errors.BadInputError(f"{path}: {arr.dtype} {arr.shape}, the manifest says float32 {(entry['rows'], dim)}")
  return arr


def _read_jsonl(path: str, rows: int) -> list[dict]:
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{path} is missing")
  with open(path) as f:
    out = [json.loads(line) for line in f if line.strip()]
  if len(out) != rows:
    raise errors.BadInputError(f"{path}: {len(out)} rows, the manifest says {rows}")
  return out


def load(emb_dir: str, verify: bool = True) -> Embeddings:
  """Reads an export; with `verify`, checks every shard's sha256 against the manifest (one pass over the files)."""
  path = os.path.join(emb_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{path} is missing: {emb_dir} is not an export (python -m dgia_jax.tools.export)")
  with open(path) as f:
    manifest = json.load(f)
  arrays = {kind: [_read_shard(os.path.join(emb_dir, e["file"]), e, manifest["format"], manifest["dim"], verify)
                   for e in manifest["shards"][kind]] for kind in KINDS}
  index = {kind: _read_jsonl(os.path.join(emb_dir, index_file(kind)), manifest["counts"][kind]) for kind in KINDS}
  return Embeddings(emb_dir, manifest, arrays["images"], arrays["texts"], index["images"], index["texts"])


# ---------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------

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


def _import_faiss():
  try:
    import faiss  # optional: only `--index faiss` needs it
  except ImportError as e:
    raise errors.MissingDependencyError("FAISS search needs faiss-cpu: pip install faiss-cpu==1.15.1") from e
  return faiss


def faiss_index(shards: list[np.ndarray], factory: str = "Flat", nprobe: int = 8):
  """A FAISS inner-product index over the shards, added one shard at a time.

  `factory` is a FAISS index factory string: "Flat" is exact (it holds the gallery in RAM,
  float32); e.g. "IVF1024,PQ32" stores 32 bytes per item for galleries beyond memory, is
  trained on the first shard, and searches `nprobe` of its lists (approximate).
  """
  faiss = _import_faiss()
  index = faiss.index_factory(shards[0].shape[1], factory, faiss.METRIC_INNER_PRODUCT)
  if not index.is_trained:
    index.train(np.ascontiguousarray(shards[0], np.float32))
  for shard in shards:
    index.add(np.ascontiguousarray(shard, np.float32))
  if "IVF" in factory:
    faiss.extract_index_ivf(index).nprobe = nprobe
  return index


def faiss_search(queries: np.ndarray, index, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and gallery rows int64 [Q, k] from a `faiss_index`."""
  scores, rows = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
  return scores, rows.astype(np.int64)


def take_rows(shards: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
  """float32 [len(rows), D]: rows of the shards' concatenation, reading only those rows."""
  offsets = np.cumsum([0] + [len(s) for s in shards])
  which = np.searchsorted(offsets, rows, side="right") - 1
  return np.stack([shards[s][r - offsets[s]] for s, r in zip(which, rows)]).astype(np.float32)


def search_texts(emb: Embeddings, texts: list[str], k: int, index: str = "exact", workdir: str | None = None,
                 faiss_factory: str = "Flat", nprobe: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Scores float32 [Q, k] and image rows int64 [Q, k] of each text's top-k images: the texts
  embedded with the run (`workdir`, default the export's) and checkpoint the export names."""
  run = inference.load_trained(workdir or emb.manifest["workdir"], emb.manifest["step"],
                               emb.manifest.get("best", False))
  queries = inference.embed_texts(run, texts)
  if index == "exact":
    return exact_search(queries, emb.images, k)
  if index == "faiss":
    return faiss_search(queries, faiss_index(emb.images, faiss_factory, nprobe), k)
  raise errors.ConfigError(f"index must be 'exact' or 'faiss', got {index!r}")
