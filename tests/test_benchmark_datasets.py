"""CUHK-PEDES, ICFG-PEDES and RSTPReid builders on tiny fixtures in each original layout."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import benchmarks
from dgia_jax.data import datasets, pipeline
from tests import clip_checkpoints, helpers
from tests.benchmark_fixtures import SPLIT_IDS, VIEWS, write_annotations, write_fixture


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
  folder = str(tmp_path_factory.mktemp("clip"))
  clip_checkpoints.write_clip_tokenizer(folder)
  return folder


def _data_config(name: str, data_dir: str, manual_dir: str, tokenizer: str):
  c = helpers.load_config(name).data
  # The tiny CLIP folder's own pipeline: the field's (the benchmarks' default, tests/test_tokenizer.py)
  # needs CLIP's whole BPE file.
  c.update(dict(data_dir=data_dir, manual_dir=manual_dir, tokenizer=tokenizer, image_size=(12, 6),
                context_length=16, num_threads=1, text_pipeline="hf"))
  if c.holdout_val_ids:
    c.holdout_val_ids = 1
  return c


@pytest.mark.parametrize("name,json_name", [("cuhk_pedes", None), ("icfg_pedes", "ICFG-PEDES.json"),
                                            ("icfg_pedes", "ICFG_PEDES.json"), ("rstpreid", None)])
def test_builds_every_record_of_the_original_layout(tmp_path, clip_folder, name, json_name):
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  annos = write_fixture(root, name, json_name)
  layout = benchmarks.BUILDERS[name].LAYOUT
  cfg = _data_config(name, data_dir, root, clip_folder)
  builder = datasets.get_builder(cfg, prepare=True)

  assert glob.glob(os.path.join(builder.data_dir, "*.array_record*"))
  assert set(builder.info.splits) == set(layout.splits)
  for split in layout.splits:
    expected = [a for a in annos if a["split"] == split]
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    got = [source[i] for i in range(len(source))]
    assert [g["path"].decode() for g in got] == [a[layout.path_key] for a in expected]  # file order
    assert [[c.decode() for c in g["captions"]] for g in got] == [a["captions"] for a in expected]
    assert [int(g["person_id"]) for g in got] == [a["id"] for a in expected]  # original ids, 1-based on CUHK
    assert [int(g["image_id"]) for g in got] == list(range(len(expected)))
    for g, a in zip(got, expected):  # the file's bytes, as they are
      with open(os.path.join(root, "imgs", a[layout.path_key]), "rb") as f:
        assert g["image"] == f.read()
  assert benchmarks.split_summary(builder) == {
      s: {"images": SPLIT_IDS[s] * VIEWS, "captions": sum(len(a["captions"]) for a in annos if a["split"] == s),
          "ids": SPLIT_IDS[s]} for s in layout.splits}

  # The eval protocol: every test caption is a query, every test image is in the gallery.
  tokenizer, splits = datasets.load(cfg, ("train", "val", "test"))
  test = splits["test"]
  test_annos = [a for a in annos if a["split"] == "test"]
  assert test.pair_caption == [c for a in test_annos for c in a["captions"]]
  assert test.pair_person_ids.tolist() == [a["id"] for a in test_annos for _ in a["captions"]]
  assert test.image_paths == [a[layout.path_key] for a in test_annos]
  queries = list(pipeline.row_batches(test.tokens, "tokens", 4))
  assert sum(int(b["valid"].sum()) for b in queries) == len(test.pair_caption)
  np.testing.assert_array_equal(np.concatenate([b["tokens"][b["valid"]] for b in queries]),
                                tokenizer.encode(test.pair_caption))
  gallery = [img for b in pipeline.eval_image_batches(test, 4, num_threads=1) for img in b["image"][b["valid"]]]
  assert len(gallery) == len(test_annos)
  for img, a in zip(gallery, test_annos):  # fixture images already have the configured size
    np.testing.assert_array_equal(img, np.asarray(Image.open(os.path.join(root, "imgs", a[layout.path_key]))))
  # Model selection: the data set's val split, or identities held out of train (ICFG-PEDES).
  val_ids = set(splits["val"].person_ids.tolist())
  if name == "icfg_pedes":
    assert len(val_ids) == 1 and not val_ids & set(splits["train"].person_ids.tolist())
    assert splits["train"].num_images + splits["val"].num_images == SPLIT_IDS["train"] * VIEWS
  else:
    assert val_ids == {a["id"] for a in annos if a["split"] == "val"}


def _strict_error(tmp_path, name: str, mutate) -> str:
  """The strict build's error after `mutate(annos, root)` spoils the fixture; checks nothing was written."""
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  annos = write_fixture(root, name)
  mutate(annos, root)
  write_annotations(root, name, annos)
  builder = benchmarks.make_builder(name, data_dir)
  with pytest.raises(ValueError) as err:
    benchmarks.prepare(builder, root)
  assert not builder.is_prepared()
  assert not glob.glob(os.path.join(data_dir, "**", "*.array_record*"), recursive=True)
  return str(err.value)


def test_missing_image_file(tmp_path):
  def mutate(annos, root):
    os.remove(os.path.join(root, "imgs", annos[4]["file_path"]))

  msg = _strict_error(tmp_path, "cuhk_pedes", mutate)
  assert "record 4 (CUHK03/4_1.png): image file not found: " in msg and "1 of 14 records" in msg


def test_corrupt_and_truncated_images(tmp_path):
  def mutate(annos, root):
    with open(os.path.join(root, "imgs", annos[2]["img_path"]), "wb") as f:
      f.write(b"not an image")
    path = os.path.join(root, "imgs", annos[5]["img_path"])
    Image.new("RGB", (64, 128), (10, 200, 30)).save(path, quality=95)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])

  msg = _strict_error(tmp_path, "rstpreid", mutate)
  assert "record 2 (0005_c5_0000.jpg): cannot read image " in msg
  assert "record 5 (0005_c6_0001.jpg): cannot read image " in msg and "truncated" in msg


def test_record_missing_a_key(tmp_path):
  def mutate(annos, root):
    del annos[3]["id"], annos[6]["img_path"]

  msg = _strict_error(tmp_path, "rstpreid", mutate)
  assert "record 3 (0000_c6_0001.jpg): missing key 'id'" in msg
  assert "record 6 (?): missing key 'img_path'" in msg


def test_empty_captions(tmp_path):
  def mutate(annos, root):
    annos[1]["captions"] = []
    annos[7]["captions"][0] = "  "

  msg = _strict_error(tmp_path, "cuhk_pedes", mutate)
  assert "record 1 (cam_a/004_0.jpg): empty caption list" in msg
  assert "record 7 (cam_a/005_0.jpg): caption 0 is empty or not a string" in msg


def test_unknown_split_name(tmp_path):
  def mutate(annos, root):
    annos[3]["split"] = "val"  # ICFG-PEDES has none (IRRA would silently make it one)

  msg = _strict_error(tmp_path, "icfg_pedes", mutate)
  assert "record 3 (test/0003/0003_001_05_0303morning_0011_1.jpg): unknown split 'val'; " \
         "expected one of ['train', 'test']" in msg


def test_duplicate_paths(tmp_path):
  def mutate(annos, root):
    annos[9] = dict(annos[9], file_path=annos[2]["file_path"])

  msg = _strict_error(tmp_path, "cuhk_pedes", mutate)
  assert "record 9 (cam_a/006_0.jpg): duplicate path: record 2 has it too" in msg


def test_missing_annotation_file_names_the_accepted_names(tmp_path):
  os.makedirs(tmp_path / "orig" / "imgs")
  builder = benchmarks.make_builder("icfg_pedes", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="expected ICFG-PEDES.json or ICFG_PEDES.json"):
    benchmarks.prepare(builder, str(tmp_path / "orig"))


def test_lenient_command_skips_lists_and_summarises(tmp_path):
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  annos = write_fixture(root, "cuhk_pedes")
  os.remove(os.path.join(root, "imgs", annos[0]["file_path"]))
  with open(os.path.join(root, "imgs", annos[1]["file_path"]), "wb") as f:
    f.write(b"broken")
  del annos[2]["captions"]
  annos[3]["captions"] = []
  annos[4]["split"] = "query"
  annos[13] = dict(annos[13], file_path=annos[10]["file_path"])
  write_annotations(root, "cuhk_pedes", annos)
  bad = [0, 1, 2, 3, 4, 13]

  proc = helpers.run_module("dgia_jax.tools.prepare", "--dataset=cuhk_pedes", f"--manual_dir={root}",
                            f"--data_dir={data_dir}", "--nostrict")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped 6 of 14 records with problems" in proc.stdout
  with open(os.path.join(data_dir, "cuhk_pedes_problems.jsonl")) as f:
    listed = [json.loads(line) for line in f]
  assert [r["record"] for r in listed] == bad
  assert listed[4]["problems"] == ["unknown split 'query'; expected one of ['train', 'val', 'test']"]

  kept = [a for i, a in enumerate(annos) if i not in bad]
  table = proc.stdout.splitlines()[-4:]
  assert table[0].split() == ["split", "images", "captions", "ids"]
  for row in table[1:]:
    split, images, captions, ids = row.split()
    in_split = [a for a in kept if a["split"] == split]
    assert [int(images), int(captions), int(ids)] == [len(in_split), sum(len(a["captions"]) for a in in_split),
                                                      len({a["id"] for a in in_split})]
  # image_id counts skipped records too, so it never shifts with what was skipped.
  builder = benchmarks.make_builder("cuhk_pedes", data_dir)
  source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  train_indices = [i for i, a in enumerate(annos) if a.get("split") == "train"]
  kept_train = [i for i in train_indices if i not in bad]
  assert [int(source[r]["image_id"]) for r in range(len(source))] == [train_indices.index(i) for i in kept_train]


def _without_splits(annos: list[dict]) -> list[dict]:
  """The records as CUHK-PEDES' caption_all.json has them: no split, ids in the standard ranges."""
  first_id = {"train": 1, "val": 11004, "test": 12004}
  old_ids = {s: sorted({a["id"] for a in annos if a["split"] == s}) for s in first_id}
  new_id = {(s, pid): first_id[s] + i for s, pids in old_ids.items() for i, pid in enumerate(pids)}
  return [{k: v for k, v in dict(a, id=new_id[a["split"], a["id"]]).items() if k != "split"} for a in annos]


@pytest.mark.parametrize("json_name", ["caption_all.json", "CUHK-PEDES.json"])
def test_caption_all_without_a_split_gets_the_standard_split_by_person_id(tmp_path, clip_folder, capsys, json_name):
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  annos = write_fixture(root, "cuhk_pedes")
  os.remove(os.path.join(root, "reid_raw.json"))
  write_annotations(root, "cuhk_pedes", _without_splits(annos), json_name)
  builder = datasets.get_builder(_data_config("cuhk_pedes", data_dir, root, clip_folder), prepare=True)
  out = capsys.readouterr().out
  assert (f"cuhk_pedes: {root}/{json_name} has no split field; applied the standard split by person id "
          "(train 1–11,003, val 11,004–12,003, test 12,004–13,003)") in out
  for split in ("train", "val", "test"):
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    assert [s["path"].decode() for s in (source[i] for i in range(len(source)))] == [
        a["file_path"] for a in annos if a["split"] == split]


def test_caption_all_with_ids_outside_the_standard_split_asks_for_a_split_field(tmp_path):
  root = str(tmp_path / "orig")
  records = _without_splits(write_fixture(root, "cuhk_pedes"))
  records[3]["id"] = 20001
  write_annotations(root, "cuhk_pedes", records, "caption_all.json")
  os.remove(os.path.join(root, "reid_raw.json"))
  with pytest.raises(benchmarks.SourceInvalid, match=r"caption_all.json has no split field and 1 records have ids "
                                                     r"outside the standard split .*record 3: id 20001.*add a 'split'"):
    benchmarks.scan(root, benchmarks.CuhkPedes.LAYOUT)


def test_published_statistics_are_compared_and_known_causes_named(tmp_path, clip_folder, capsys):
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  write_fixture(root, "rstpreid")
  datasets.get_builder(_data_config("rstpreid", data_dir, root, clip_folder), prepare=True)
  out = capsys.readouterr().out
  assert "warning: rstpreid split 'train' holds 6 images (published: 18,505), 3 ids (published: 3,701)" in out
  layout = benchmarks.Rstpreid.LAYOUT
  older = {"train": {"images": 19505, "ids": 3901}, "val": {"images": 500, "ids": 100},
           "test": {"images": 500, "ids": 100}}
  warnings = benchmarks.published_differences(layout, "rstpreid", older)
  assert len(warnings) == 4 and "the older RSTPReid release (3,901 / 100 / 100" in warnings[-1]
  exact = {s: dict(values) for s, values in layout.published}
  assert benchmarks.published_differences(layout, "rstpreid", exact) == []


def test_published_statistics_name_missing_image_folders(tmp_path, clip_folder, capsys):
  root, data_dir = str(tmp_path / "orig"), str(tmp_path / "tfds")
  annos = write_fixture(root, "cuhk_pedes")
  shutil.rmtree(os.path.join(root, "imgs", "CUHK03"))  # a folder not extracted (anosorae/IRRA#49)
  missing = sum(a["file_path"].startswith("CUHK03/") for a in annos)
  with pytest.raises(benchmarks.SourceInvalid, match=rf"{missing} image files are missing, under imgs/CUHK03/ "
                                                     rf"\({missing}\): a folder that was not extracted"):
    datasets.get_builder(_data_config("cuhk_pedes", data_dir, root, clip_folder), prepare=True)
  cfg = _data_config("cuhk_pedes", data_dir, root, clip_folder)
  cfg.strict = False
  datasets.get_builder(cfg, prepare=True)
  assert f"warning: {missing} image files are missing, under imgs/CUHK03/" in capsys.readouterr().out


def test_image_paths_must_stay_inside_imgs_unless_allowed(tmp_path):
  outside = tmp_path / "secret.png"
  Image.new("RGB", (6, 12), (1, 2, 3)).save(outside)

  def mutate(annos, root):
    annos[0]["file_path"] = "../../secret.png"
    annos[1]["file_path"] = str(outside)  # absolute
    os.symlink(outside, os.path.join(root, "imgs", "CUHK03", "link.png"))
    annos[2]["file_path"] = "CUHK03/link.png"  # a link out of imgs/

  msg = _strict_error(tmp_path, "cuhk_pedes", mutate)
  assert "record 0 (../../secret.png): path '../../secret.png' leaves imgs/ (absolute or '..')" in msg
  assert f"record 1 ({outside}): path '{outside}' leaves imgs/" in msg
  assert "record 2 (CUHK03/link.png): path 'CUHK03/link.png' links out of imgs/" in msg
  assert "3 problems in 3 of 14 records" in msg
  records, problems, _ = benchmarks.scan(str(tmp_path / "orig"), benchmarks.CuhkPedes.LAYOUT, allow_outside=True)
  assert len(records) == 14 and not problems  # the flag lets them point anywhere


def test_an_image_over_the_size_limit_and_ids_outside_int64_are_bad_records(tmp_path):
  def mutate(annos, root):
    Image.new("1", (10_000, 10_000)).save(os.path.join(root, "imgs", annos[3]["img_path"]), format="PNG")
    annos[4]["id"] = 10**30
    annos[5]["id"] = -4
    annos[6]["id"] = "٣"  # an Arabic-Indic digit: not an id

  msg = _strict_error(tmp_path, "rstpreid", mutate)
  assert "is 10000x10000 pixels, outside the limit (89,478,485 pixels" in msg
  assert "id 1000000000000000000000000000000 is not an integer in [0, 2^63)" in msg
  assert "id -4 is not an integer in [0, 2^63)" in msg and "id '٣' is not an integer" in msg


def test_annotations_nested_too_deeply_are_named(tmp_path):
  root = tmp_path / "orig"
  write_fixture(str(root), "rstpreid")
  (root / "data_captions.json").write_text("[" * 100_000 + "]" * 100_000)
  builder = benchmarks.make_builder("rstpreid", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="nested too deeply"):
    benchmarks.prepare(builder, str(root))
