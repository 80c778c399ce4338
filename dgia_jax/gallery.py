"""Exported embeddings: written in shards with a JSONL index, read back, searched by top-k.

`python -m dgia_jax.tools.export` writes an export; `tools.search`, `tools.report` and
`tools.serve` read it. Layout of an export directory (row i of an index is row i of its shards, concatenated):

  manifest.json                  run config, checkpoint step (`best`: the best-on-validation one),
                                 workdir, split, dim, counts, format,
                                 and every shard with its row count and sha256
  images-00000-of-00001.npy      float32 [rows, D] L2-normalised image embeddings, in record order,
                                 at most `shard_rows` rows per shard
  texts-00000-of-00001.npy       float32 [rows, D] caption embeddings, in caption order
  images.jsonl                   one line per image: {"row", "record", "path", "person_id"}
  texts.jsonl                    one line per caption: {"row", "caption", "record", "person_id"}
                                 (`record`: the row of the caption's image)

In the safetensors format the shards are `.safetensors` files holding one tensor,
`embeddings`. The index is JSONL, not Parquet: it needs no dependency (pyarrow is not
one), is read and written a line at a time, and diffs and greps like any text. The
manifest is written last, so a directory with one holds a complete export.

The features are the evaluator's (`inference.extract_features`: eval transforms, the run's
eval batch size) and shards are written the same way each time, so two exports of one
checkpoint are bit-identical (equal sha256 in the manifest). Features are computed in
memory ([N, D] float32: 2 GB for a million 512-d images) and written in shards; exact
search holds one shard at a time on the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import ml_collections
import numpy as np
import safetensors.numpy

from dgia_jax import inference, metrics, parallel, reporting
from dgia_jax.data import datasets

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


def _remove_previous(out_dir: str) -> None:
  """Deletes the files of an export already in `out_dir` (its shard count may differ)."""
  path = os.path.join(out_dir, MANIFEST_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    os.remove(path)
    for kind in KINDS:
      for entry in old["shards"][kind]:
        if os.path.exists(os.path.join(out_dir, entry["file"])):
          os.remove(os.path.join(out_dir, entry["file"]))


def export_split(workdir: str, split_name: str, out_dir: str, step: int | None = None, shard_rows: int = 65536,
                 fmt: str = "npy", best: bool = False) -> dict:
  """Embeds every image and caption of `split_name` with checkpoint `step` of `workdir` (its
  best-on-validation one if `best`); returns the manifest."""
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  if shard_rows < 1:
    raise ValueError(f"shard_rows must be positive, got {shard_rows}")
  config, _, model, params, step = inference.load_trained(workdir, step, best)
  _, splits = datasets.load(config.data, (split_name,))
  split = splits[split_name]
  mesh = parallel.make_mesh()
  txt, img = inference.extract_features(inference.make_encoders(model, mesh), params, split, mesh,
                                        config.eval.batch_size)
  os.makedirs(out_dir, exist_ok=True)
  _remove_previous(out_dir)
  shards = {kind: write_shards(out_dir, kind, feats, shard_rows, fmt) for kind, feats in zip(KINDS, (img, txt))}
  _write_jsonl(os.path.join(out_dir, index_file("images")),
               ({"row": r, "record": r, "path": p, "person_id": int(pid)}
                for r, (p, pid) in enumerate(zip(split.image_paths, split.person_ids))))
  _write_jsonl(os.path.join(out_dir, index_file("texts")),
               ({"row": i, "caption": c, "record": int(r), "person_id": int(split.person_ids[r])}
                for i, (c, r) in enumerate(zip(split.pair_caption, split.pair_record))))
  manifest = {"workdir": os.path.abspath(workdir), "step": int(step), "best": best, "split": split_name,
              "format": fmt, "dim": int(img.shape[1]), "counts": {"images": len(img), "texts": len(txt)},
              "shards": shards, "config": config.to_dict()}
  reporting.write_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
  return manifest


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
    raise FileNotFoundError(f"{path} is missing (listed in the manifest)")
  if verify and sha256(path) != entry["sha256"]:
    raise ValueError(f"{path}: sha256 differs from the manifest's; the file changed after export")
  arr = np.load(path, mmap_mode="r") if fmt == "npy" else safetensors.numpy.load_file(path)[_TENSOR]
  if arr.shape != (entry["rows"], dim) or arr.dtype != np.float32:
    raise ValueError(f"{path}: {arr.dtype} {arr.shape}, the manifest says float32 {(entry['rows'], dim)}")
  return arr


def _read_jsonl(path: str, rows: int) -> list[dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing")
  with open(path) as f:
    out = [json.loads(line) for line in f if line.strip()]
  if len(out) != rows:
    raise ValueError(f"{path}: {len(out)} rows, the manifest says {rows}")
  return out


def load(emb_dir: str, verify: bool = True) -> Embeddings:
  """Reads an export; with `verify`, checks every shard's sha256 against the manifest (one pass over the files)."""
  path = os.path.join(emb_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {emb_dir} is not an export (python -m dgia_jax.tools.export)")
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
    raise ImportError("FAISS search needs faiss-cpu: pip install faiss-cpu==1.15.1") from e
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
  raise ValueError(f"index must be 'exact' or 'faiss', got {index!r}")
