"""Exports of a tiny trained run: bit-identical shards holding the evaluator's features, errors that
name the file, writes whole or not at all, and a folder of one's own images (links, unreadable files,
only what changed embedded again)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dgia_jax.common import errors, parallel
from dgia_jax.data import datasets, pipeline
from dgia_jax.gallery import exports, searcher
from dgia_jax.inference import encoding, rebuild
from tests import helpers


def test_export_is_bit_identical_and_holds_the_evaluators_features(tiny_run, exported):
  first, second = exported
  manifests = [json.load(open(os.path.join(d, exports.MANIFEST_FILE))) for d in exported]
  assert manifests[0]["shards"] == manifests[1]["shards"]
  assert [e["rows"] for e in manifests[0]["shards"]["images"]] == [10, 6]
  for entry in manifests[0]["shards"]["images"] + manifests[0]["shards"]["texts"]:
    with open(os.path.join(first, entry["file"]), "rb") as a, open(os.path.join(second, entry["file"]), "rb") as b:
      assert a.read() == b.read()
  config, _, model, params, step = rebuild.load_trained(tiny_run)
  assert manifests[0]["step"] == step and manifests[0]["config"] == config.to_dict()
  _, splits = datasets.load(config.data, ("test",))
  split = splits["test"]
  mesh = parallel.make_mesh()
  txt, img = encoding.extract_features(encoding.make_encoders(model, mesh), params, split, mesh, config.eval.batch_size)
  emb = exports.load(first)
  np.testing.assert_array_equal(np.concatenate(emb.images), img)
  np.testing.assert_array_equal(np.concatenate(emb.texts), txt)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  assert [r["path"] for r in emb.image_index] == split.image_paths
  assert [r["person_id"] for r in emb.text_index] == split.pair_person_ids.tolist()
  assert [r["caption"] for r in emb.text_index] == split.pair_caption


def test_safetensors_export_reads_back_the_same_arrays(tiny_run, exported, tmp_path):
  manifest = exports.export_split(tiny_run, "test", str(tmp_path), shard_rows=10, fmt="safetensors")
  assert manifest["shards"]["images"][0]["file"] == "images-00000-of-00002.safetensors"
  a, b = exports.load(exported[0]), exports.load(str(tmp_path))
  for kind in exports.KINDS:
    np.testing.assert_array_equal(np.concatenate(getattr(a, kind)), np.concatenate(getattr(b, kind)))


def test_damaged_or_missing_files_are_named(exported, tmp_path):
  copy = str(tmp_path / "emb")
  shutil.copytree(exported[0], copy)
  shard = os.path.join(copy, "images-00001-of-00002.npy")
  np.save(shard, np.zeros((6, 32), np.float32))
  with pytest.raises(ValueError, match=re.escape(shard) + ": sha256 differs"):
    exports.load(copy)
  np.save(shard, np.zeros((5, 32), np.float32))
  with pytest.raises(ValueError, match=re.escape(shard) + r": float32 \(5, 32\), the manifest says float32 \(6, 32\)"):
    exports.load(copy, verify=False)
  os.remove(os.path.join(copy, exports.MANIFEST_FILE))
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    exports.load(copy)
  with pytest.raises(FileNotFoundError, match="is not a training workdir"):
    exports.export_split(str(tmp_path / "nowhere"), "test", str(tmp_path / "out"))
  empty = tmp_path / "queries.txt"
  empty.write_text("\n  \n")
  proc = helpers.run_module("dgia_jax.tools.search", "--emb", exported[0], "--queries_file", str(empty))
  assert proc.returncode == 1 and proc.stderr.strip() == f"error: {empty} holds no queries (one a line)"


_EXPORT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # every shard of the tiny export is larger
sys.argv = ["export", "--workdir", WORKDIR, "--out", OUT, "--shard_rows", "10", "--compilation_cache_dir="]
runpy.run_module("dgia_jax.tools.export", run_name="__main__", alter_sys=True)
"""


def test_a_failed_export_write_is_named_and_the_previous_export_stays(tiny_run, exported, tmp_path):
  copy = str(tmp_path / "emb")
  shutil.copytree(exported[0], copy)
  before = {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy)}
  code = _EXPORT_UNDER_A_FILE_SIZE_LIMIT.replace("WORKDIR", repr(tiny_run)).replace("OUT", repr(copy))
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, capture_output=True, text=True, timeout=300,
                        env=helpers.env())
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: could not write {copy}: File too large; what was there before is intact")
  assert {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy)} == before
  exports.load(copy)  # every shard's sha256 still matches its manifest


def _own_images(folder) -> dict[str, bytes]:
  """A folder as a user has it: nested folders, JPEG/PNG/WebP in any case, a broken file, a note."""
  files = {}
  for i, (name, fmt) in enumerate([("street/a.jpg", "JPEG"), ("street/cam2/b.png", "PNG"), ("c.webp", "WEBP"),
                                   ("D.JPG", "JPEG")]):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20 + 4 * i, 48), (40 * i, 200 - 30 * i, 90)).save(path, format=fmt)
    files[name] = path.read_bytes()
  (folder / "street" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  (folder / "notes.txt").write_text("not an image, not listed")
  return files


def test_export_of_own_images_lists_the_unreadable_and_embeds_only_what_changed(tiny_run, tmp_path):
  folder, out = tmp_path / "crops", str(tmp_path / "emb_mine")
  files = _own_images(folder)
  first = exports.export_images(tiny_run, str(folder), out, shard_rows=3)
  assert first["source"] == "images" and first["counts"] == {"images": 4, "texts": 0}
  assert (first["embedded"], first["reused"]) == (4, 0)
  assert [u["path"] for u in first["unreadable"]] == ["street/broken.png"] and "cannot decode" in first["unreadable"][0]["error"]
  emb = exports.load(out)
  assert [r["path"] for r in emb.image_index] == ["D.JPG", "c.webp", "street/a.jpg", "street/cam2/b.png"]
  assert all("person_id" not in r for r in emb.image_index)
  config, _, model, params, _ = rebuild.load_trained(tiny_run)
  mesh = parallel.make_mesh()
  decoded = np.stack([pipeline.decode_image(files["c.webp"], tuple(config.data.image_size), config.data.resize)])
  np.testing.assert_array_equal(  # the eval transforms and the image tower, as the evaluator's
      np.concatenate(emb.images)[1], encoding.encode_images(encoding.make_encoders(model, mesh), params, decoded,
                                                             mesh, config.eval.batch_size)[0])

  proc = helpers.run_module("dgia_jax.tools.export", "--workdir", tiny_run, "--images", str(folder), "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "exported 4 images of" in proc.stdout and "(0 embedded now, 4 unchanged since the last export)" in proc.stdout
  assert "unreadable, not exported: street/broken.png: cannot decode street/broken.png" in proc.stdout

  Image.new("RGB", (30, 60), (1, 2, 3)).save(folder / "street" / "e.jpg")  # the folder gained a file
  (folder / "c.webp").unlink()  # and lost one
  again = exports.export_images(tiny_run, str(folder), out, shard_rows=3)
  assert (again["embedded"], again["reused"], again["counts"]["images"]) == (1, 3, 4)
  later = exports.load(out)
  assert [r["path"] for r in later.image_index] == ["D.JPG", "street/a.jpg", "street/cam2/b.png", "street/e.jpg"]
  before = dict(zip([r["path"] for r in emb.image_index], np.concatenate(emb.images)))
  for r, f in zip(later.image_index, np.concatenate(later.images)):
    if r["path"] in before:
      np.testing.assert_array_equal(f, before[r["path"]])  # kept as they were, not re-embedded
  scores, rows = searcher.search_texts(later, ["a man in a red coat"], k=2)
  assert rows.shape == (1, 2) and set(rows[0]) <= set(range(4))


def test_export_of_own_images_errors_name_the_folder(tiny_run, tmp_path):
  with pytest.raises(errors.MissingPathError, match=f"--images {tmp_path}/none is not a folder"):
    exports.export_images(tiny_run, str(tmp_path / "none"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.BadInputError, match="holds no image files"):
    exports.export_images(tiny_run, str(tmp_path / "empty"), str(tmp_path / "out"))


def test_export_of_own_images_lists_links_that_dangle_loop_or_leave_the_folder_and_goes_on(tiny_run, tmp_path):
  folder = tmp_path / "crops"
  _own_images(folder)
  outside = tmp_path / "outside.jpg"
  Image.new("RGB", (20, 40), (9, 9, 9)).save(outside)
  os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
  os.symlink(folder / "loop.jpg", folder / "loop.jpg")
  os.symlink(outside, folder / "out.jpg")
  os.symlink(folder / "street" / "a.jpg", folder / "inside.jpg")  # a link inside the folder is an image
  os.symlink(tmp_path, folder / "up")  # a link to a folder is not followed
  m = exports.export_images(tiny_run, str(folder), str(tmp_path / "emb"))
  unreadable = {u["path"]: u["error"] for u in m["unreadable"]}
  assert unreadable.pop("street/broken.png").startswith("cannot decode street/broken.png")
  assert unreadable == {"dangling.jpg": "No such file or directory", "loop.jpg": "Too many levels of symbolic links",
                        "out.jpg": "a link to a file outside the folder", "up": "a link to a folder, not followed"}
  rows = {r["path"]: r for r in exports.load(str(tmp_path / "emb")).image_index}
  assert sorted(rows) == ["D.JPG", "c.webp", "inside.jpg", "street/a.jpg", "street/cam2/b.png"]
  assert rows["inside.jpg"]["resolved"] == "street/a.jpg" and rows["inside.jpg"]["sha256"] == rows["street/a.jpg"]["sha256"]
