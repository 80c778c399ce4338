"""Inference on a tiny trained run: bit-identical exports, the evaluator's Rank-k from search,
FAISS equal to exact search, errors that name the file, a report that renders, and evaluation of
a run's latest or best checkpoint on its own data set or on another benchmark."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dgia_jax import checkpointing, errors, gallery, inference, metrics, parallel, report, reporting, rundir
from dgia_jax.data import datasets, pipeline
from tests import benchmark_fixtures, helpers, test_structure


def _cli(module, *args):
  env = {**os.environ, "PYTHONPATH": helpers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", f"dgia_jax.tools.{module}", *args], cwd=helpers.ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tiny_run):
  return tiny_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """The test split exported twice, by the command line and by the function, in shards of 10 rows."""
  first, second = (str(tmp_path_factory.mktemp(name)) for name in ("emb_cli", "emb_api"))
  proc = _cli("export", "--workdir", run, "--split", "test", "--out", first, "--shard_rows", "10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported 16 images and 32 captions of split 'test'" in proc.stdout
  gallery.export_split(run, "test", second, shard_rows=10)
  return first, second


def test_export_is_bit_identical_and_holds_the_evaluators_features(run, exported):
  first, second = exported
  manifests = [json.load(open(os.path.join(d, gallery.MANIFEST_FILE))) for d in exported]
  assert manifests[0]["shards"] == manifests[1]["shards"]
  assert [e["rows"] for e in manifests[0]["shards"]["images"]] == [10, 6]
  for entry in manifests[0]["shards"]["images"] + manifests[0]["shards"]["texts"]:
    with open(os.path.join(first, entry["file"]), "rb") as a, open(os.path.join(second, entry["file"]), "rb") as b:
      assert a.read() == b.read()
  config, _, model, params, step = inference.load_trained(run)
  assert manifests[0]["step"] == step and manifests[0]["config"] == config.to_dict()
  _, splits = datasets.load(config.data, ("test",))
  split = splits["test"]
  mesh = parallel.make_mesh()
  txt, img = inference.extract_features(inference.make_encoders(model, mesh), params, split, mesh, config.eval.batch_size)
  emb = gallery.load(first)
  np.testing.assert_array_equal(np.concatenate(emb.images), img)
  np.testing.assert_array_equal(np.concatenate(emb.texts), txt)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  assert [r["path"] for r in emb.image_index] == split.image_paths
  assert [r["person_id"] for r in emb.text_index] == split.pair_person_ids.tolist()
  assert [r["caption"] for r in emb.text_index] == split.pair_caption


def test_safetensors_export_reads_back_the_same_arrays(run, exported, tmp_path):
  manifest = gallery.export_split(run, "test", str(tmp_path), shard_rows=10, fmt="safetensors")
  assert manifest["shards"]["images"][0]["file"] == "images-00000-of-00002.safetensors"
  a, b = gallery.load(exported[0]), gallery.load(str(tmp_path))
  for kind in gallery.KINDS:
    np.testing.assert_array_equal(np.concatenate(getattr(a, kind)), np.concatenate(getattr(b, kind)))


def test_search_over_the_export_gives_the_evaluators_rank_k(run, exported):
  emb = gallery.load(exported[0])
  captions = [r["caption"] for r in emb.text_index]
  _, rows = gallery.search_texts(emb, captions, k=10)
  image_pids = np.array([r["person_id"] for r in emb.image_index])
  hit = image_pids[rows] == np.array([r["person_id"] for r in emb.text_index])[:, None]
  config, _, model, params, _ = inference.load_trained(run)
  _, splits = datasets.load(config.data, ("test",))
  mesh = parallel.make_mesh()
  expected = inference.evaluate_split(inference.make_encoders(model, mesh), params, splits["test"], mesh,
                                  config.eval.batch_size)["t2i"]
  for k in (1, 5, 10):
    assert 100.0 * hit[:, :k].any(1).mean() == expected[f"R{k}"], k
  # The free-text path embeds a caption as the export did.
  embedded = inference.TextEncoder(inference.load_trained(run)).embed(captions[:3])[0]
  np.testing.assert_allclose(embedded, np.concatenate(emb.texts)[:3], atol=1e-6)


def test_exact_search_over_shards_equals_one_gallery_and_faiss():
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
  gal, queries = unit(rng.normal(size=(503, 24))), unit(rng.normal(size=(37, 24)))
  shards = np.array_split(gal, [100, 300, 450])
  scores, rows = gallery.exact_search(queries, shards, 7)
  ref_scores, ref_rows = metrics.top_k(queries, gal, 7)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-6)  # the matmul's summation order depends on its shape
  f_scores, f_rows = gallery.faiss_search(queries, gallery.faiss_index(shards), 7)
  np.testing.assert_array_equal(f_rows, rows)
  np.testing.assert_allclose(f_scores, scores, atol=1e-5)


def test_exact_search_with_shards_smaller_than_k():
  rng = np.random.default_rng(1)
  gal, queries = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
  shards = np.array_split(gal, [3, 5, 6])  # 3, 2, 1 and 6 rows, k = 7
  scores, rows = gallery.exact_search(queries, shards, 7)
  ref_scores, ref_rows = metrics.top_k(queries, gal, 7)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  scores, rows = gallery.exact_search(queries, shards[:2], 7)  # 5 rows in all: every row, best first
  assert rows.shape == (5, 5) and all(sorted(r) == list(range(5)) for r in rows.tolist())
  np.testing.assert_array_equal(np.diff(scores, axis=1) <= 0, True)


def test_damaged_or_missing_files_are_named(exported, tmp_path):
  copy = str(tmp_path / "emb")
  shutil.copytree(exported[0], copy)
  shard = os.path.join(copy, "images-00001-of-00002.npy")
  np.save(shard, np.zeros((6, 32), np.float32))
  with pytest.raises(ValueError, match=re.escape(shard) + ": sha256 differs"):
    gallery.load(copy)
  np.save(shard, np.zeros((5, 32), np.float32))
  with pytest.raises(ValueError, match=re.escape(shard) + r": float32 \(5, 32\), the manifest says float32 \(6, 32\)"):
    gallery.load(copy, verify=False)
  os.remove(os.path.join(copy, gallery.MANIFEST_FILE))
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    gallery.load(copy)
  with pytest.raises(FileNotFoundError, match="is not a training workdir"):
    gallery.export_split(str(tmp_path / "nowhere"), "test", str(tmp_path / "out"))
  empty = tmp_path / "queries.txt"
  empty.write_text("\n  \n")
  proc = _cli("search", "--emb", exported[0], "--queries_file", str(empty))
  assert proc.returncode == 1 and proc.stderr.strip() == f"error: {empty} holds no queries (one a line)"


def test_search_command_prints_top_k_and_reads_a_query_file(exported, tmp_path):
  queries = tmp_path / "queries.txt"
  queries.write_text("a man in red trousers\n\na woman with a pink bag\n")
  proc = _cli("search", "--emb", exported[0], "--queries_file", str(queries), "-k", "3", "--index", "faiss")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not re.search(r"^[WE]\d{4} ", proc.stderr, re.M), proc.stderr  # no log noise (cli._WithoutNotices)
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == "query 1: a man in red trousers" and lines[4] == "query 2: a woman with a pink bag"
  assert re.fullmatch(r"\s+1  -?\d\.\d{4}  person \d+  test/\S+\.png", lines[1])
  bad = _cli("search", "--emb", str(tmp_path), "--query", "x")
  assert bad.returncode != 0 and bad.stderr.strip() == (
      f"error: {tmp_path}/manifest.json is missing: {tmp_path} is not an export (python -m dgia_jax.tools.export)")


def test_report_html_shows_existing_images_and_the_png_has_its_size(exported, tmp_path):
  out = str(tmp_path / "report")
  found = report.write_report(gallery.load(exported[0]), out, num_queries=4, k=3)
  assert found["rows"].shape == (4, 3)
  page = open(os.path.join(out, report.HTML_FILE)).read()
  sources = re.findall(r'<img class="(hit|miss)" src="([^"]+)"', page)
  assert len(sources) == 12 and page.count("<div class=\"query\">") == 4
  assert [c == "hit" for c, _ in sources] == found["hit"].ravel().tolist()
  for _, src in sources:
    assert os.path.isfile(os.path.join(out, src)), src
  width, height = report.figure_size(4, 3)
  with Image.open(os.path.join(out, report.PNG_FILE)) as png:
    assert png.size == (round(width * report.DPI), round(height * report.DPI))


def _figures(result: dict) -> dict:
  return {k: result[k] for k in ("t2i", "i2t")}


def test_evaluate_run_gives_the_trainers_figures(run):
  with open(os.path.join(run, rundir.RESULTS_FILE)) as f:
    results = json.load(f)
  latest = inference.evaluate_run(run)
  assert {k: latest[k] for k in ("dataset", "split", "best", "step", "images", "captions", "identities")} == {
      "dataset": "synthetic_persons", "split": "test", "best": False, "step": results["steps"], "images": 16,
      "captions": 32, "identities": 8}
  assert _figures(latest) == _figures(results["final"])
  assert _figures(inference.evaluate_run(run, best=True)) == results["best_val"]["test"]
  assert rundir.RunDir(run).evaluation_file("synthetic_persons", "test", latest["step"], False) == os.path.join(
      run, "evaluations", f"synthetic_persons-test-step{latest['step']}.json")


def test_the_best_checkpoint_is_what_evaluate_export_and_search_read(run, exported, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(run, copy)
  config, _, model, params, step = inference.load_trained(copy)
  halved = jax.tree.map(lambda p: 0.5 * p, params)
  best = checkpointing.Checkpointer(os.path.join(copy, rundir.BEST_DIR), 1, 1, async_save=False)
  best.save(step + 1, {"params": halved}, force=True)
  best.close()
  _, _, _, loaded, loaded_step = inference.load_trained(copy, best=True)
  assert loaded_step == step + 1
  jax.tree.map(np.testing.assert_array_equal, loaded, halved)

  _, splits = datasets.load(config.data, ("test",))
  mesh = parallel.make_mesh()
  expected = inference.evaluate_split(inference.make_encoders(model, mesh), halved, splits["test"], mesh,
                                  config.eval.batch_size)
  result = inference.evaluate_run(copy, best=True)
  assert result["best"] and result["step"] == step + 1 and _figures(result) == expected


  manifest = gallery.export_split(copy, "test", str(tmp_path / "emb"), best=True)
  assert manifest["best"] and manifest["step"] == step + 1
  emb, latest = gallery.load(str(tmp_path / "emb")), gallery.load(exported[0])
  assert not np.allclose(np.concatenate(emb.texts), np.concatenate(latest.texts), atol=1e-3)
  captions = [r["caption"] for r in emb.text_index[:3]]  # search embeds queries with the export's checkpoint
  _, rows = gallery.search_texts(emb, captions, k=1)
  best_run = inference.load_trained(copy, best=True)
  np.testing.assert_allclose(inference.TextEncoder(best_run).embed(captions)[0], np.concatenate(emb.texts)[:3], atol=1e-6)
  expected = gallery.exact_search(inference.TextEncoder(best_run).embed(captions)[0], emb.images, 1)[1]
  np.testing.assert_array_equal(rows, expected)


def test_evaluate_run_on_another_benchmark_reads_it_as_the_run_reads_captions_and_images(run, tmp_path):
  root = str(tmp_path / "RSTPReid")
  test_annos = [a for a in benchmark_fixtures.write_fixture(root, "rstpreid") if a["split"] == "test"]
  result = inference.evaluate_run(run, dataset="rstpreid", manual_dir=root)
  assert (result["dataset"], result["images"], result["captions"], result["identities"]) == (
      "rstpreid", len(test_annos), sum(len(a["captions"]) for a in test_annos), benchmark_fixtures.SPLIT_IDS["test"])

  config, tokenizer, model, params, _ = inference.load_trained(run)
  cfg = datasets.cross_domain(config.data, "rstpreid", root, inference.run_tokenizer_path(run))
  assert (cfg.image_size, cfg.context_length, cfg.data_dir) == (
      config.data.image_size, config.data.context_length, config.data.data_dir)
  _, splits = datasets.load(cfg, ("test",))
  test = splits["test"]
  assert test.pair_caption == [c for a in test_annos for c in a["captions"]]
  np.testing.assert_array_equal(test.tokens, tokenizer.encode(test.pair_caption))
  assert test.load_image(0).shape == (*config.data.image_size, 3)
  mesh = parallel.make_mesh()
  assert _figures(result) == inference.evaluate_split(inference.make_encoders(model, mesh), params, test, mesh,
                                                  config.eval.batch_size)


def test_evaluate_run_errors_name_what_is_wrong(run, tmp_path):
  known = "reads a benchmark (cuhk_pedes, icfg_pedes, rstpreid), got 'market1501'"
  with pytest.raises(ValueError, match=re.escape(known)):
    inference.evaluate_run(run, dataset="market1501")
  with pytest.raises(FileNotFoundError, match=re.escape(f"manual_dir {tmp_path}/none is not a folder")):
    inference.evaluate_run(run, dataset="cuhk_pedes", manual_dir=str(tmp_path / "none"))
  with pytest.raises(ValueError, match="manual_dir is for another data set"):
    inference.evaluate_run(run, manual_dir=str(tmp_path))
  copy = str(tmp_path / "run")
  shutil.copytree(run, copy, ignore=shutil.ignore_patterns(rundir.BEST_DIR))
  with pytest.raises(FileNotFoundError, match=f"{re.escape(copy)} has no best/ folder: the run evaluated no val"):
    inference.evaluate_run(copy, best=True)


def test_evaluate_run_command_prints_and_writes_the_figures(run):
  proc = _cli("evaluate", "--workdir", run, "--best")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = inference.evaluate_run(run, best=True)
  out = rundir.RunDir(run).evaluation_file(result["dataset"], result["split"], result["step"], True)
  with open(out) as f:
    written = json.load(f)
  assert _figures(written) == _figures(result) and written["best"] and written["step"] == result["step"]
  assert f"text→image  {reporting.format_metrics(result['t2i'])}" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == f"written to {out}"
  bad = _cli("evaluate", "--workdir", run, "--dataset", "market1501")
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: cross-domain evaluation reads a benchmark")


def test_inference_programs_run_without_loading_the_trainer(run, exported, tmp_path):
  """export, search, report and evaluate, each run in a fresh process, never load a training module."""
  programs = {
      "export": ["--workdir", run, "--out", str(tmp_path / "emb")],
      "search": ["--emb", exported[0], "--query", "a man in red trousers", "-k", "2"],
      "report": ["--emb", exported[0], "--out", str(tmp_path / "report"), "--num_queries", "2", "-k", "2"],
      "evaluate": ["--workdir", run, "--out", str(tmp_path / "figures.json")],
  }
  for name, args in programs.items():
    out, loaded = test_structure.run_listing_training_modules(f"dgia_jax.tools.{name}", *args)
    assert "EXIT 0" in out, out[-3000:]
    assert loaded == [], f"tools.{name} loaded {loaded}"


_EXPORT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # every shard of the tiny export is larger
sys.argv = ["export", "--workdir", WORKDIR, "--out", OUT, "--shard_rows", "10", "--compilation_cache_dir="]
runpy.run_module("dgia_jax.tools.export", run_name="__main__", alter_sys=True)
"""


def test_a_failed_export_write_is_named_and_the_previous_export_stays(run, exported, tmp_path):
  copy = str(tmp_path / "emb")
  shutil.copytree(exported[0], copy)
  before = {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy)}
  code = _EXPORT_UNDER_A_FILE_SIZE_LIMIT.replace("WORKDIR", repr(run)).replace("OUT", repr(copy))
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": helpers.ROOT})
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: could not write {copy}: File too large; what was there before is intact")
  assert {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy)} == before
  gallery.load(copy)  # every shard's sha256 still matches its manifest


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


def test_export_of_own_images_lists_the_unreadable_and_embeds_only_what_changed(run, tmp_path):
  folder, out = tmp_path / "crops", str(tmp_path / "emb_mine")
  files = _own_images(folder)
  first = gallery.export_images(run, str(folder), out, shard_rows=3)
  assert first["source"] == "images" and first["counts"] == {"images": 4, "texts": 0}
  assert (first["embedded"], first["reused"]) == (4, 0)
  assert [u["path"] for u in first["unreadable"]] == ["street/broken.png"] and "cannot decode" in first["unreadable"][0]["error"]
  emb = gallery.load(out)
  assert [r["path"] for r in emb.image_index] == ["D.JPG", "c.webp", "street/a.jpg", "street/cam2/b.png"]
  assert all("person_id" not in r for r in emb.image_index)
  config, _, model, params, _ = inference.load_trained(run)
  mesh = parallel.make_mesh()
  decoded = np.stack([pipeline.decode_image(files["c.webp"], tuple(config.data.image_size), config.data.resize)])
  np.testing.assert_array_equal(  # the eval transforms and the image tower, as the evaluator's
      np.concatenate(emb.images)[1], inference.encode_images(inference.make_encoders(model, mesh), params, decoded,
                                                             mesh, config.eval.batch_size)[0])

  proc = _cli("export", "--workdir", run, "--images", str(folder), "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "exported 4 images of" in proc.stdout and "(0 embedded now, 4 unchanged since the last export)" in proc.stdout
  assert "unreadable, not exported: street/broken.png: cannot decode street/broken.png" in proc.stdout

  Image.new("RGB", (30, 60), (1, 2, 3)).save(folder / "street" / "e.jpg")  # the folder gained a file
  (folder / "c.webp").unlink()  # and lost one
  again = gallery.export_images(run, str(folder), out, shard_rows=3)
  assert (again["embedded"], again["reused"], again["counts"]["images"]) == (1, 3, 4)
  later = gallery.load(out)
  assert [r["path"] for r in later.image_index] == ["D.JPG", "street/a.jpg", "street/cam2/b.png", "street/e.jpg"]
  before = dict(zip([r["path"] for r in emb.image_index], np.concatenate(emb.images)))
  for r, f in zip(later.image_index, np.concatenate(later.images)):
    if r["path"] in before:
      np.testing.assert_array_equal(f, before[r["path"]])  # kept as they were, not re-embedded
  scores, rows = gallery.search_texts(later, ["a man in a red coat"], k=2)
  assert rows.shape == (1, 2) and set(rows[0]) <= set(range(4))


def test_export_of_own_images_errors_name_the_folder(run, tmp_path):
  with pytest.raises(errors.MissingPathError, match=f"--images {tmp_path}/none is not a folder"):
    gallery.export_images(run, str(tmp_path / "none"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.BadInputError, match="holds no image files"):
    gallery.export_images(run, str(tmp_path / "empty"), str(tmp_path / "out"))


def test_export_of_own_images_lists_links_that_dangle_loop_or_leave_the_folder_and_goes_on(run, tmp_path):
  folder = tmp_path / "crops"
  _own_images(folder)
  outside = tmp_path / "outside.jpg"
  Image.new("RGB", (20, 40), (9, 9, 9)).save(outside)
  os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
  os.symlink(folder / "loop.jpg", folder / "loop.jpg")
  os.symlink(outside, folder / "out.jpg")
  os.symlink(folder / "street" / "a.jpg", folder / "inside.jpg")  # a link inside the folder is an image
  os.symlink(tmp_path, folder / "up")  # a link to a folder is not followed
  m = gallery.export_images(run, str(folder), str(tmp_path / "emb"))
  unreadable = {u["path"]: u["error"] for u in m["unreadable"]}
  assert unreadable.pop("street/broken.png").startswith("cannot decode street/broken.png")
  assert unreadable == {"dangling.jpg": "No such file or directory", "loop.jpg": "Too many levels of symbolic links",
                        "out.jpg": "a link to a file outside the folder", "up": "a link to a folder, not followed"}
  rows = {r["path"]: r for r in gallery.load(str(tmp_path / "emb")).image_index}
  assert sorted(rows) == ["D.JPG", "c.webp", "inside.jpg", "street/a.jpg", "street/cam2/b.png"]
  assert rows["inside.jpg"]["resolved"] == "street/a.jpg" and rows["inside.jpg"]["sha256"] == rows["street/a.jpg"]["sha256"]
