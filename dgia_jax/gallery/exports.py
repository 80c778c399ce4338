"""Exported embeddings: the layout of an export, written in shards with a JSONL index, read back
checked, and the exported images' bytes (`ExportedImages`). `gallery.searcher` searches them.

`python -m dgia_jax.tools.export` writes an export of a split of the run's data set
(`export_split`) or of a folder of the user's own images (`export_images`); `tools.search`,
`tools.report` and `tools.serve` read it. Layout of an export directory (row i of an index is
row i of its shards, concatenated):

  manifest.json                  source ("split" or "images"), run config, checkpoint step (`best`:
                                 the best-on-validation one), workdir, split (and the data set's
                                 `source_split`) or images_dir (and its real path, `images_root`),
                                 dim, counts, format, every shard with its row count and sha256, and
                                 each index file's sha256 (`index`); an images export also lists the
                                 files it could not read
  images-00000-of-00001.npy      float32 [rows, D] L2-normalised image embeddings, in record (or
                                 sorted path) order, at most `shard_rows` rows per shard
  texts-00000-of-00001.npy       float32 [rows, D] caption embeddings, in caption order (none for images)
  images.jsonl                   one line per image: {"row", "record", "path", "person_id", "source_record",
                                 "sha256"} (a split), or {"row", "path", "resolved", "size", "mtime_ns",
                                 "sha256"} (own images: no person ids); sha256: the image file's bytes
  texts.jsonl                    one line per caption: {"row", "caption", "record", "person_id"}
                                 (`record`: the row of the caption's image)

In the safetensors format the shards are `.safetensors` files holding one tensor,
`embeddings`. The index is JSONL, not Parquet: it needs no dependency (pyarrow is not
one), is read and written a line at a time, and diffs and greps like any text. An export is
written whole or not at all (`write_export`): a failed one leaves the previous export as it was.

The features are the evaluator's (`encoding.extract_features`: eval transforms, the run's
eval batch size) and shards are written the same way each time, so two exports of one
checkpoint are bit-identical (equal sha256 in the manifest). Features are computed in
memory ([N, D] float32: 2 GB for a million 512-d images) and written in shards; exact
search holds one shard at a time on the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import io
import json
import os
import stat as stat_module

import ml_collections
import numpy as np
import safetensors.numpy

from dgia_jax.common import errors, parallel
from dgia_jax.data import datasets, pipeline
from dgia_jax.inference import encoding, rebuild
from dgia_jax.run import files

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


def _jsonl_bytes(rows: list[dict]) -> bytes:
  return "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()


def _manifest_in(out_dir: str) -> dict | None:
  """The manifest of the export in `out_dir`, or None if it holds none."""
  path = os.path.join(out_dir, MANIFEST_FILE)
  return files.read_json(path, dict) if os.path.exists(path) else None


def _listed_files(out_dir: str) -> set[str]:
  """The files of the export in `out_dir` (none if it holds none, or a manifest too damaged to list them)."""
  try:
    old = _manifest_in(out_dir)
    if old is None:
      return set()
    return {e["file"] for kind in KINDS for e in old["shards"][kind]} | {index_file(kind) for kind in KINDS}
  except (errors.BadInputError, KeyError, TypeError):
    return set()


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
  into the manifest, with each shard's and each index file's sha256. The files are written into a
  staging folder and moved in only when all are written, the manifest last
  (`files.replace_folder_files`): a failed write (disk full, file-size limit, read-only target)
  raises WriteError naming `out_dir` and leaves the export there as it was. Files in `out_dir` that
  are no export's are never touched.
  """
  check_options(fmt, shard_rows)
  files.make_dirs(out_dir, "--out")
  manifest = {}

  def write_into(staging: str) -> None:
    shards = {kind: write_shards(staging, kind, feats[kind], shard_rows, fmt) for kind in KINDS}
    index = {}
    for kind in KINDS:
      data = _jsonl_bytes(rows[kind])
      with open(os.path.join(staging, index_file(kind)), "wb") as f:
        f.write(data)
      index[index_file(kind)] = hashlib.sha256(data).hexdigest()
    dims = {int(f.shape[1]) for f in feats.values() if len(f)}
    manifest.update({**meta, "format": fmt, "dim": dims.pop() if dims else 0,
                     "counts": {kind: len(feats[kind]) for kind in KINDS}, "shards": shards, "index": index})
    files.write_json(os.path.join(staging, MANIFEST_FILE), manifest)

  files.replace_folder_files(out_dir, write_into, _listed_files(out_dir), last=MANIFEST_FILE)
  return manifest


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_DECODE_CHUNK = 1024  # own images decoded and embedded this many at a time (memory: ~150 MB at 384x128)


def list_images(images_dir: str) -> tuple[list[dict], list[dict]]:
  """(images, unreadable) under `images_dir`, recursively, in sorted path order.

  An image (`IMAGE_SUFFIXES`, any case) is {"path" (relative to `images_dir`), "resolved" (its real
  file, relative to the folder's real path), "size", "mtime_ns"}. What cannot be read as one is
  listed in `unreadable` ({"path", "error"}), never dropped silently: a dangling link, a link loop, a
  link to a file outside the folder, something that is not a plain file, a link to a folder (not
  followed).
  """
  if not os.path.isdir(images_dir):
    raise errors.MissingPathError(f"--images {images_dir} is not a folder")
  root = os.path.realpath(images_dir)
  found, unreadable = [], []
  for dirpath, dirs, names in os.walk(images_dir):  # links to folders are listed in dirs, never entered
    dirs.sort()
    for name in dirs:
      if os.path.islink(os.path.join(dirpath, name)):
        unreadable.append({"path": os.path.relpath(os.path.join(dirpath, name), images_dir),
                           "error": "a link to a folder, not followed"})
    for name in names:
      if not name.lower().endswith(IMAGE_SUFFIXES):
        continue
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, images_dir)
      try:
        entry = _image_entry(full, root)
        found.append({"path": rel, **entry})
      except OSError as e:
        unreadable.append({"path": rel, "error": e.strerror or str(e)})
  if not found and not unreadable:
    raise errors.BadInputError(f"--images {images_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
  return sorted(found, key=lambda e: e["path"]), sorted(unreadable, key=lambda e: e["path"])


def _image_entry(path: str, root: str) -> dict:
  """{"resolved", "size", "mtime_ns"} of an image file; OSError says why it cannot be one."""
  real = os.path.realpath(path)
  stat = os.stat(path)  # a dangling link or a loop: OSError
  if os.path.commonpath([root, real]) != root:
    raise OSError(errno.EXDEV, "a link to a file outside the folder")
  if not stat_module.S_ISREG(stat.st_mode):
    raise OSError(errno.EINVAL, "not a plain file")
  return {"resolved": os.path.relpath(real, root), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _previous_rows(out_dir: str, meta: dict) -> dict[tuple, tuple[np.ndarray, str]]:
  """{(path, resolved, size, mtime_ns): (embedding, sha256)} of an earlier export of the same images
  with the same run, checkpoint and transforms in `out_dir` (empty if there is none or it is damaged)."""
  try:
    old = _manifest_in(out_dir)
    same = ("source", "workdir", "checkpoint", "step", "best", "images_dir", "images_root", "image_size", "resize")
    if old is None or any(old.get(k) != meta.get(k) for k in same):
      return {}
    emb = load(out_dir)
  except errors.UserError:
    return {}
  feats = np.concatenate(emb.images) if emb.images else np.zeros((0, emb.manifest["dim"]), np.float32)
  return {_image_key(r): (feats[r["row"]], r["sha256"]) for r in emb.image_index}


def _image_key(entry: dict) -> tuple:
  return entry["path"], entry["resolved"], entry["size"], entry["mtime_ns"]


def export_images(model, images_dir: str, out_dir: str, step: int | None = None, shard_rows: int = 65536,
                  fmt: str = "npy", best: bool = False, num_threads: int = 8) -> dict:
  """Embeds every image under `images_dir` (`list_images`) with the model's eval transforms and image
  tower (`model`: a run's workdir, its checkpoint `step` or best; or a `rebuild.FieldCheckpoint`), as
  an export with no captions and no person ids; returns the manifest.

  A file that cannot be read or decoded is listed in the manifest's `unreadable` (path and error),
  never dropped silently. Each image's row records its size, modification time and sha256, what the
  search service checks before it serves the file. If `out_dir` holds an export of the same folder by
  the same run, checkpoint and transforms, files whose path, size and modification time are unchanged
  keep their embedding and only the others are embedded (`manifest["embedded"]`, `["reused"]`); the
  export is rewritten whole (`write_export`).
  """
  check_options(fmt, shard_rows)
  run = rebuild.load_model(model, step, best)
  data = run.config.data
  meta = {"source": "images", **rebuild.describe_model(model), "step": int(run.step), "best": best,
          "images_dir": os.path.abspath(images_dir), "images_root": os.path.realpath(images_dir),
          "image_size": list(data.image_size), "resize": data.get("resize", "bicubic"), "config": run.config.to_dict()}
  listed, unreadable = list_images(images_dir)
  previous = _previous_rows(out_dir, meta)
  todo = [entry for entry in listed if _image_key(entry) not in previous]
  mesh = parallel.make_mesh()
  encoders = encoding.make_encoders(run.model, mesh)
  embedded = dict(previous)

  def decode(entry: dict) -> tuple[np.ndarray, str]:
    with open(os.path.join(images_dir, entry["path"]), "rb") as f:
      raw = f.read()
    image = pipeline.decode_image(raw, tuple(data.image_size), meta["resize"], name=entry["path"])
    return image, hashlib.sha256(raw).hexdigest()

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # PIL decodes without the GIL
    for start in range(0, len(todo), _DECODE_CHUNK):
      chunk = todo[start:start + _DECODE_CHUNK]
      decoded = list(pool.map(lambda entry: _try(decode, entry), chunk))
      good = [(entry, out) for entry, out in zip(chunk, decoded) if not isinstance(out, Exception)]
      unreadable += [{"path": entry["path"], "error": _reason(out)} for entry, out in zip(chunk, decoded)
                     if isinstance(out, Exception)]
      if good:
        feats = encoding.encode_images(encoders, run.params, np.stack([img for _, (img, _) in good]), mesh,
                                        run.config.eval.batch_size)
        embedded.update({_image_key(entry): (f, sha) for (entry, (_, sha)), f in zip(good, feats)})
  kept = [entry for entry in listed if _image_key(entry) in embedded]
  dim = run.model.cfg.embed_dim
  feats = np.stack([embedded[_image_key(e)][0] for e in kept]) if kept else np.zeros((0, dim), np.float32)
  rows = {"images": [{"row": i, **e, "sha256": embedded[_image_key(e)][1]} for i, e in enumerate(kept)],
          "texts": []}
  meta.update(embedded=len(kept) - sum(_image_key(e) in previous for e in kept),
              reused=sum(_image_key(e) in previous for e in kept), unreadable=sorted(unreadable, key=lambda u: u["path"]))
  return write_export(out_dir, {"images": feats, "texts": np.zeros((0, dim), np.float32)}, rows, meta, shard_rows, fmt)


def _try(fn, arg):
  """`fn(arg)`, or the user error (an unreadable file) it raised."""
  try:
    return fn(arg)
  except (OSError, errors.BadInputError) as e:
    return e


def _reason(error: Exception) -> str:
  return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def export_split(model, split_name: str, out_dir: str, step: int | None = None, shard_rows: int = 65536,
                 fmt: str = "npy", best: bool = False) -> dict:
  """Embeds every image and caption of `split_name` of the model's data set with `model`: a run's
  workdir (its checkpoint `step`, its best-on-validation one if `best`) or a `rebuild.FieldCheckpoint`
  (its config's data set); returns the manifest."""
  check_options(fmt, shard_rows)
  config, _, towers, params, step = rebuild.load_model(model, step, best)
  _, splits = datasets.load(config.data, (split_name,))
  split = splits[split_name]
  mesh = parallel.make_mesh()
  txt, img = encoding.extract_features(encoding.make_encoders(towers, mesh), params, split, mesh,
                                        config.eval.batch_size)
  rows = {"images": [{"row": r, "record": r, "path": p, "person_id": int(pid),
                      "source_record": int(split.source_records[r]),
                      "sha256": hashlib.sha256(split.image_bytes(r)).hexdigest()}
                     for r, (p, pid) in enumerate(zip(split.image_paths, split.person_ids))],
          "texts": [{"row": i, "caption": c, "record": int(r), "person_id": int(split.person_ids[r])}
                    for i, (c, r) in enumerate(zip(split.pair_caption, split.pair_record))]}
  meta = {"source": "split", **rebuild.describe_model(model), "step": int(step), "best": best,
          "split": split_name, "source_split": split.source_split, "config": config.to_dict()}
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
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"{path} is missing (listed in the manifest)")
  if verify and sha256(path) != entry["sha256"]:
    raise errors.BadInputError(f"{path}: sha256 differs from the manifest's; the file changed after export")
  try:
    arr = np.load(path, mmap_mode="r") if fmt == "npy" else safetensors.numpy.load_file(path)[_TENSOR]
  except (ValueError, OSError, KeyError) as e:
    raise errors.BadInputError(f"{path} is damaged: {e}") from e
  if arr.shape != (entry["rows"], dim) or arr.dtype != np.float32:
    raise errors.BadInputError(f"{path}: {arr.dtype} {arr.shape}, the manifest says float32 {(entry['rows'], dim)}")
  return arr


def _read_index(emb_dir: str, kind: str, manifest: dict) -> list[dict]:
  """The rows of index file `kind`, checked against the manifest's sha256 and row count."""
  path = os.path.join(emb_dir, index_file(kind))
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"{path} is missing")
  with open(path, "rb") as f:
    data = f.read()
  if hashlib.sha256(data).hexdigest() != manifest["index"][index_file(kind)]:
    raise errors.BadInputError(f"{path}: sha256 differs from the manifest's; the index changed after export")
  try:
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
  except (ValueError, RecursionError) as e:
    raise errors.BadInputError(f"{path} is damaged: {e}") from e
  if len(rows) != manifest["counts"][kind] or any(not isinstance(r, dict) or r.get("row") != i
                                                   for i, r in enumerate(rows)):
    raise errors.BadInputError(f"{path}: {len(rows)} rows numbered otherwise than the manifest's "
                               f"{manifest['counts'][kind]}")
  return rows


_MANIFEST_KEYS = {"source": str, "format": str, "dim": int, "counts": dict, "shards": dict, "index": dict, "step": int,
                  "workdir": str, "config": dict}
_SOURCE_KEYS = {"split": {"split": str, "source_split": str}, "images": {"images_dir": str, "images_root": str}}


def read_manifest(emb_dir: str) -> dict:
  """The manifest of the export in `emb_dir`, its layout checked (BadInputError names what is wrong)."""
  path = os.path.join(emb_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"{path} is missing: {emb_dir} is not an export (python -m dgia_jax.tools.export)")
  manifest = files.read_json(path, dict)
  wrong = [k for k, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(k), kind)]
  if not wrong and (manifest["format"] not in FORMATS or set(manifest["index"]) != {index_file(k) for k in KINDS}
                    or any(not isinstance(manifest["counts"].get(k), int) or not isinstance(manifest["shards"].get(k), list)
                           for k in KINDS)):
    wrong = ["format, counts, shards or index"]
  if not wrong:
    wrong = [k for k, kind in _SOURCE_KEYS.get(manifest["source"], {"a known source": None}).items()
             if not isinstance(manifest.get(k), kind or ())]
  if wrong:
    hint = " (an export of an older dgia-jax: export again)" if set(wrong) & {"index", "source_split", "images_root"} else ""
    raise errors.BadInputError(f"{path} is damaged: {', '.join(wrong)} missing or malformed{hint}")
  return manifest


def load(emb_dir: str, verify: bool = True) -> Embeddings:
  """Reads an export: its index files always checked against the manifest's sha256, with `verify`
  every shard too (one pass over the files)."""
  manifest = read_manifest(emb_dir)
  try:
    arrays = {kind: [_read_shard(os.path.join(emb_dir, e["file"]), e, manifest["format"], manifest["dim"], verify)
                     for e in manifest["shards"][kind]] for kind in KINDS}
  except (KeyError, TypeError) as e:
    raise errors.BadInputError(f"{os.path.join(emb_dir, MANIFEST_FILE)} is damaged: a shard entry lacks {e}") from e
  index = {kind: _read_index(emb_dir, kind, manifest) for kind in KINDS}
  return Embeddings(emb_dir, manifest, arrays["images"], arrays["texts"], index["images"], index["texts"])


class ImageChanged(errors.BadInputError):
  """An exported image whose file or bytes are no longer what the export recorded."""


class ExportedImages:
  """The exported images' file bytes by row, each checked against what the export recorded: its
  sha256 and, for own images, that the file opened resolves to the one exported inside the exported
  folder, with the recorded size and modification time. A byte that was not exported is never
  returned: ImageChanged names the row (never a path) instead.

  A split export's images are read from its data set (`datasets.image_source`), images only.
  """

  def __init__(self, emb: Embeddings):
    self._index, m = emb.image_index, emb.manifest
    if m.get("source") == "images":
      self._dir, self._root = m["images_dir"], m["images_root"]
      self._read = self._from_folder
    else:
      self._source = datasets.image_source(emb.config.data, m["source_split"])
      self._read = self._from_data_set

  def __len__(self) -> int:
    return len(self._index)

  def bytes(self, row: int) -> bytes:
    entry = self._index[row]
    data = self._read(row, entry)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise ImageChanged(f"image row {row} changed since export (its bytes differ); export again")
    return data

  def _from_data_set(self, row: int, entry: dict) -> bytes:
    try:
      example = self._source[entry["source_record"]]
    except (IndexError, KeyError) as e:
      raise ImageChanged(f"image row {row} is no longer in the data set; export again") from e
    if example["path"].decode() != entry["path"]:
      raise ImageChanged(f"image row {row} is another image in the data set now; export again")
    return example["image"]

  def _from_folder(self, row: int, entry: dict) -> bytes:
    expected = os.path.join(self._root, entry["resolved"])
    path = os.path.join(self._dir, entry["path"])
    if os.path.commonpath([self._root, os.path.normpath(expected)]) != self._root:
      raise ImageChanged(f"image row {row} lies outside the exported folder")
    try:
      with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        opened = _opened_path(f, path)
        if opened != expected or stat.st_size != entry["size"] or stat.st_mtime_ns != entry["mtime_ns"]:
          raise ImageChanged(f"image row {row} changed since export (another file, size or time); export again")
        return f.read(entry["size"] + 1)
    except OSError as e:
      raise ImageChanged(f"image row {row} cannot be read since export ({e.strerror or e}); export again") from e


def _opened_path(f, path: str) -> str:
  """The real path of open file `f`: what the OS opened (Linux's /proc), else `path` resolved."""
  proc = f"/proc/self/fd/{f.fileno()}"
  return os.readlink(proc) if os.path.islink(proc) else os.path.realpath(path)
