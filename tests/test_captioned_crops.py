"""Captioned person crops (no ids, no splits): manifest folders, their archives and WebDataset shards."""

import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import captioned_crops
from data_prep.errors import SourceInvalid, SourceMissing
from dgia_jax.common import config_files
from dgia_jax.data import datasets
from dgia_jax.training import config_domains, train
from tests import benchmark_fixtures, helpers


def _png_of(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _image(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (6, 12)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format=fmt)
  return buf.getvalue()


# path -> bytes; the manifest lists them out of file order (an archive holds them in sorted order).
IMAGES = {"b/3.png": _image((1, 2, 3)), "a/0.jpg": _image((200, 10, 10), "JPEG"), "a/1.png": _image((10, 200, 10)),
          "b/2.webp": _image((10, 10, 200), "WEBP")}
RECORDS = [{"image": "b/3.png", "caption": "a man in a red coat"},
           {"image_path": "a/0.jpg", "captions": ["a woman with a bag", "she wears blue jeans"]},
           {"file_path": "a/1.png", "caption": "a child running", "captions": ["small, in green"], "id": 7},
           {"img_path": "b/2.webp", "captions": ["a cyclist"]}]
EXPECTED = [("b/3.png", ["a man in a red coat"]), ("a/0.jpg", ["a woman with a bag", "she wears blue jeans"]),
            ("a/1.png", ["a child running", "small, in green"]), ("b/2.webp", ["a cyclist"])]


def _write_files(root: str, files: dict) -> None:
  for path, data in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    with open(os.path.join(root, path), "wb") as f:
      f.write(data)


def write_jsonl(root: str, records: list) -> None:
  lines = [json.dumps(r) for r in records]
  with open(os.path.join(root, "manifest.jsonl"), "w") as f:
    f.write("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is no record


def jsonl_folder(root: str, records: list = RECORDS) -> str:
  _write_files(root, IMAGES)
  write_jsonl(root, records)
  return root


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: list) -> None:
  """A WebDataset shard: `samples` are lists of (member name, bytes), written in order."""
  with tarfile.open(path, "w") as tar:
    for members in samples:
      for name, data in members:
        _tar_member(tar, name, data)


SHARDS = {
    "shard-00000.tar": [[("000000.jpg", IMAGES["a/0.jpg"]), ("000000.txt", b"a man in black\n\n  carries a bag \n")],
                        [("000001.png", IMAGES["a/1.png"]), ("000001.json", b'{"caption": "a girl", "width": 6}')]],
    "shard-00001.tar": [[("000002.jpg", IMAGES["a/0.jpg"]), ("000002.txt", b"an old man"),
                         ("000002.json", b'{"width": 6, "height": 12}')],  # metadata only: captions from .txt
                        [("000003.webp", IMAGES["b/2.webp"]), ("000003.cls", b"3"),
                         ("000003.json", b'{"captions": ["a cyclist", "on a red bike"]}')]],
}
SHARD_EXPECTED = [("shard-00000.tar/000000", ["a man in black", "carries a bag"], IMAGES["a/0.jpg"]),
                  ("shard-00000.tar/000001", ["a girl"], IMAGES["a/1.png"]),
                  ("shard-00001.tar/000002", ["an old man"], IMAGES["a/0.jpg"]),
                  ("shard-00001.tar/000003", ["a cyclist", "on a red bike"], IMAGES["b/2.webp"])]


def shard_folder(root: str, shards: dict = SHARDS) -> str:
  os.makedirs(root, exist_ok=True)
  for name, samples in shards.items():
    write_shard(os.path.join(root, name), samples)
  return root


def _read(builder) -> list[dict]:
  source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  return [{"image": e["image"], "captions": [c.decode() for c in e["captions"]], "person_id": int(e["person_id"]),
           "image_id": int(e["image_id"]), "path": e["path"].decode()} for e in (source[i] for i in range(len(source)))]


def _build(source: str, data_dir: str, **kwargs):
  builder = captioned_crops.make_builder(source, data_dir, num_threads=2, **kwargs)
  captioned_crops.prepare(builder)
  assert builder.is_prepared() and list(builder.info.splits) == ["train"]
  assert glob.glob(os.path.join(builder.data_dir, "*.array_record*"))
  return builder


def test_jsonl_folder(tmp_path):
  root = jsonl_folder(str(tmp_path / "crops"))
  got = _read(_build(root, str(tmp_path / "tfds")))
  assert [(g["path"], g["captions"]) for g in got] == EXPECTED  # manifest order
  assert [g["image_id"] for g in got] == [0, 1, 2, 3] and {g["person_id"] for g in got} == {-1}
  assert [g["image"] for g in got] == [IMAGES[p] for p, _ in EXPECTED]  # the files' bytes, as they are


def test_csv_folder_groups_the_rows_of_an_image(tmp_path, capsys):
  root = str(tmp_path / "crops")
  _write_files(root, IMAGES)
  with open(os.path.join(root, "manifest.csv"), "w") as f:
    f.write('image,caption,score\na/1.png,"a child, running",0.9\nb/3.png,a man,0.8\n\n'
            'a/1.png,"she says ""hi""",0.7\n')
  got = _read(_build(root, str(tmp_path / "tfds")))
  assert [(g["path"], g["captions"], g["image_id"]) for g in got] == [
      ("a/1.png", ["a child, running", 'she says "hi"'], 0), ("b/3.png", ["a man"], 1)]
  assert [g["image"] for g in got] == [IMAGES["a/1.png"], IMAGES["b/3.png"]]
  assert "2 images, 3 captions from " in capsys.readouterr().out


def test_archive_of_a_manifest_folder(tmp_path):
  root = jsonl_folder(str(tmp_path / "crops"))
  archive = str(tmp_path / "crops.tar.gz")
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root, arcname="crops")  # members sorted: the images before the manifest
  got = _read(_build(archive, str(tmp_path / "tfds")))
  by_id = {g["image_id"]: g for g in got}
  assert [g["path"] for g in got] == sorted(IMAGES)  # the archive's member order
  assert [(by_id[i]["path"], by_id[i]["captions"]) for i in range(4)] == EXPECTED  # image_id: the manifest's order
  assert all(g["image"] == IMAGES[g["path"]] and g["person_id"] == -1 for g in got)


def test_webdataset_shards(tmp_path):
  root = shard_folder(str(tmp_path / "shards"))
  for source in (root, os.path.join(root, "shard-*.tar")):  # a folder or a glob: the same data set
    builder = _build(source, str(tmp_path / "tfds"))
    got = _read(builder)
    assert [(g["path"], g["captions"], g["image"]) for g in got] == SHARD_EXPECTED
    assert [g["image_id"] for g in got] == [0, 1, 2, 3] and {g["person_id"] for g in got} == {-1}
  assert len(glob.glob(str(tmp_path / "tfds" / "captioned_crops" / "*"))) == 2  # one builder config per source


def test_sources_get_distinct_stable_names(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b.tar.gz")
  name = captioned_crops.CaptionedCropsConfig.from_source
  assert name(a).name == name(a + "/").name == name(str(tmp_path / "x" / ".." / "a")).name
  assert name(a).name.startswith("a_") and name(b).name.startswith("b_") and name(a).name != name(str(tmp_path / "c"))
  assert name(str(tmp_path / "shards" / "*.tar")).name.startswith("shards_")
  builder = captioned_crops.make_builder(a, str(tmp_path / "tfds"))
  assert builder.problems_file == str(tmp_path / "tfds" / f"captioned_crops_{name(a).name}_problems.jsonl")


def _spoil_manifest(root: str, case: str) -> str:
  """The fixture spoilt as `case` says; the problem expected in the error."""
  records = [dict(r) for r in RECORDS]
  if case == "dotdot":
    _write_files(os.path.dirname(root), {"outside.png": _image((5, 5, 5))})
    records[0]["image"] = "../outside.png"
    expected = "record 0 (../outside.png): path '../outside.png' leaves the manifest's folder (absolute or '..')"
  elif case == "missing":
    os.remove(os.path.join(root, "a/0.jpg"))
    expected = f"record 1 (a/0.jpg): image file not found: {root}/a/0.jpg"
  elif case == "undecodable":
    _write_files(root, {"a/1.png": b"not an image"})
    expected = f"record 2 (a/1.png): cannot read image {root}/a/1.png: "
  elif case == "empty caption":
    records[3]["captions"] = ["a cyclist", "  "]
    expected = "record 3 (b/2.webp): caption 1 is empty or not a string"
  else:  # duplicate
    records.append({"image": "./a/0.jpg", "caption": "again"})
    expected = "record 4 (./a/0.jpg): duplicate path: record 1 has it too"
  write_jsonl(root, records)
  return expected


def _spoil_shards(root: str, case: str) -> str:
  shards = {name: [list(s) for s in samples] for name, samples in SHARDS.items()}
  if case == "no image":
    shards["shard-00000.tar"][1] = [("000001.txt", b"a girl")]
    expected = "record 1 (shard-00000.tar/000001): no image: expected a member 000001.jpg, .jpeg, .png, .webp"
  else:  # no captions
    shards["shard-00001.tar"][1] = [("000003.webp", IMAGES["b/2.webp"]), ("000003.json", b'{"width": 6}')]
    expected = "record 3 (shard-00001.tar/000003): no captions in 000003.json"
  shard_folder(root, shards)
  return expected


@pytest.mark.parametrize("case", ["dotdot", "missing", "undecodable", "empty caption", "duplicate", "no image",
                                  "no captions"])
def test_strict_build_names_the_bad_record_and_writes_nothing(tmp_path, case):
  root, data_dir = str(tmp_path / "crops"), str(tmp_path / "tfds")
  if case in ("no image", "no captions"):
    expected = _spoil_shards(root, case)
  else:
    expected = _spoil_manifest(jsonl_folder(root), case)
  builder = captioned_crops.make_builder(root, data_dir, num_threads=2)
  with pytest.raises(SourceInvalid) as err:
    captioned_crops.prepare(builder)
  msg = str(err.value)
  assert expected in msg and f"all listed in {builder.problems_file}" in msg
  assert "1 problems in 1 of " in msg, msg
  assert not builder.is_prepared()
  assert not glob.glob(os.path.join(data_dir, "**", "*.array_record*"), recursive=True)
  with open(builder.problems_file) as f:
    (listed,) = [json.loads(line) for line in f]
  assert len(listed["problems"]) == 1 and listed["problems"][0].startswith(expected.split("): ", 1)[1])


def test_lenient_build_skips_counts_and_lists_the_bad_records(tmp_path, capsys):
  root, data_dir = jsonl_folder(str(tmp_path / "crops")), str(tmp_path / "tfds")
  records = [dict(r) for r in RECORDS] + [dict(RECORDS[0], image=p) for p in ("c/4.png", "c/5.png", "c/6.png")]
  _write_files(root, {"c/4.png": _image((4, 4, 4)), "c/5.png": b"broken", "c/6.png": _image((6, 6, 6))})
  records[0]["image"] = "../x.png"
  records[2]["captions"] = []
  del records[2]["caption"]
  records[6]["captions"] = ["fine", ""]
  records.append({"image": "c/4.png", "caption": "twice"})
  records.append(["not", "an", "object"])
  write_jsonl(root, records)
  builder = _build(root, data_dir, strict=False)
  out = capsys.readouterr().out
  assert f"skipped 6 of 9 records with problems; listed in {builder.problems_file}" in out
  with open(builder.problems_file) as f:
    listed = [json.loads(line) for line in f]
  assert [(r["record"], r["path"]) for r in listed] == [(0, "../x.png"), (2, "a/1.png"), (5, "c/5.png"),
                                                        (6, "c/6.png"), (7, "c/4.png"), (8, "?")]
  assert listed[1]["problems"] == ["empty caption list"] and listed[2]["problems"][0].startswith("cannot read image")
  assert listed[3]["problems"] == ["caption 2 is empty or not a string"]
  assert listed[4] == {"record": 7, "path": "c/4.png", "where": "manifest.jsonl line 9",
                       "problems": ["duplicate path: record 4 has it too"]}
  assert listed[5]["problems"] == ["is a JSON list, not an object"]
  got = _read(builder)
  assert [(g["image_id"], g["path"]) for g in got] == [(1, "a/0.jpg"), (3, "b/2.webp"), (4, "c/4.png")]
  assert not os.path.exists(builder.problems_file + ".tmp")


def test_lenient_shards_skip_damage_and_bad_samples(tmp_path, capsys):
  root = shard_folder(str(tmp_path / "shards"))
  write_shard(os.path.join(root, "shard-00000.tar"), [[("000000.txt", b"no image")], [("000001.png", b"x")],
                                                      [("000000.jpg", IMAGES["a/0.jpg"]), ("000000.txt", b"dup")]])
  damaged = os.path.join(root, "shard-00001.tar")
  with tarfile.open(damaged) as tar:
    webp = tar.getmember("000003.webp")
  with open(damaged, "r+b") as f:
    f.truncate(webp.offset_data + webp.size // 2)  # cut in the second sample's image
  builder = _build(root, str(tmp_path / "tfds"), strict=False)
  assert "skipped 4 of 5 records with problems" in capsys.readouterr().out
  with open(builder.problems_file) as f:
    listed = [(r["record"], r["path"], r["problems"]) for r in map(json.loads, f)]
  assert [r[:2] for r in listed] == [(0, "shard-00000.tar/000000"), (1, "shard-00000.tar/000001"),
                                     (2, "shard-00000.tar/000000"), (4, "shard-00001.tar/000003")]
  assert listed[0][2] == ["no image: expected a member 000000.jpg, .jpeg, .png, .webp"]
  assert listed[1][2] == ["no captions: expected a member 000001.txt or 000001.json"]
  assert listed[2][2] == ["duplicate key: record 0 has it too"]
  assert listed[3][2] == ["shard-00001.tar is damaged (ReadError: unexpected end of data); the rest of it is not read"]
  assert [(g["path"], g["image_id"], g["captions"]) for g in _read(builder)] == [
      ("shard-00001.tar/000002", 3, ["an old man"])]


def test_paths_outside_the_manifest_folder_are_allowed_only_when_asked(tmp_path):
  root = jsonl_folder(str(tmp_path / "crops"))
  _write_files(str(tmp_path), {"secret.png": _image((9, 9, 9))})
  os.symlink(tmp_path / "secret.png", os.path.join(root, "a", "link.png"))
  write_jsonl(root, [{"image": "a/link.png", "caption": "x"}, {"image": str(tmp_path / "secret.png"), "caption": "y"}])
  problems = [s.problems for s in captioned_crops.checked(captioned_crops.samples(root), 1)]
  allowed_by = "data.allow_paths_outside=True permits it"
  assert problems == [[f"path 'a/link.png' links out of the manifest's folder; {allowed_by}"],
                      [f"path '{tmp_path}/secret.png' leaves the manifest's folder (absolute or '..'); {allowed_by}"]]
  allowed = list(captioned_crops.checked(captioned_crops.samples(root, allow_outside=True), 1))
  assert [s.problems for s in allowed] == [[], []] and allowed[0].image == _image((9, 9, 9))


class _FailingLines:
  """A binary file's lines that fail after `n`: what a lazy reader must not reach early."""

  def __init__(self, n: int):
    self.n, self.read = n, 0

  def __iter__(self):
    for i in range(10**9):
      if i == self.n:
        raise OSError(f"read past line {self.n}")
      self.read += 1
      yield json.dumps({"image": f"{i}.png", "caption": f"person {i}"}).encode() + b"\n"


def test_manifest_is_read_as_a_stream():
  lines = _FailingLines(3)
  reader = captioned_crops.read_jsonl(lines, "manifest.jsonl")
  assert iter(reader) is reader and lines.read == 0
  first = next(reader)
  assert (first.index, first.path, first.captions) == (0, "0.png", ["person 0"]) and lines.read == 1
  assert [s.path for s in (next(reader), next(reader))] == ["1.png", "2.png"]
  with pytest.raises(OSError, match="read past line 3"):
    next(reader)


class _CountingFile(io.BytesIO):
  def __init__(self, data: bytes):
    super().__init__(data)
    self.most = 0

  def read(self, size=-1):
    out = super().read(size)
    self.most = max(self.most, self.tell())
    return out


def test_shard_is_read_as_a_stream_one_sample_at_a_time(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (4, 100, 100, 3), np.uint8)  # 30 KB a PNG: over a read block
  big = [_png_of(a) for a in noise]
  write_shard(str(tmp_path / "s.tar"), [[(f"{i:06d}.bmp", b""), (f"{i:06d}.png", big[i]), (f"{i:06d}.txt", b"x")]
                                        for i in range(4)])
  with open(tmp_path / "s.tar", "rb") as f:
    stream = _CountingFile(f.read())
  reader = captioned_crops.read_shard(stream, "s.tar", first_index=10)
  assert iter(reader) is reader and stream.most == 0
  first = next(reader)
  assert (first.index, first.path, first.image, first.captions) == (10, "s.tar/000000", big[0], ["x"])
  assert stream.most < len(stream.getvalue()) / 2  # the first sample and the next header, not the shard
  assert [(s.index, s.path) for s in reader] == [(11, "s.tar/000001"), (12, "s.tar/000002"), (13, "s.tar/000003")]


def test_sources_that_are_none_are_named(tmp_path):
  with pytest.raises(SourceMissing, match="does not exist"):
    captioned_crops.locate(str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(SourceMissing, match="holds no manifest.jsonl or manifest.csv and no"):
    captioned_crops.locate(str(tmp_path / "empty"))
  (tmp_path / "empty" / "manifest.jsonl").write_text("")
  (tmp_path / "empty" / "manifest.csv").write_text("")
  with pytest.raises(SourceInvalid, match="holds both manifest.jsonl and manifest.csv"):
    captioned_crops.locate(str(tmp_path / "empty"))
  (tmp_path / "empty" / "manifest.jsonl").unlink()
  (tmp_path / "empty" / "manifest.csv").write_text("path,text\nx.png,y\n")
  with pytest.raises(SourceInvalid, match=r"manifest.csv: header \['path', 'text'\] needs an image path column"):
    list(captioned_crops.samples(str(tmp_path / "empty")))
  with tarfile.open(tmp_path / "no_manifest.tar", "w") as tar:
    _tar_member(tar, "crops/a.png", IMAGES["a/1.png"])
  with pytest.raises(SourceMissing, match="no_manifest.tar holds no manifest.jsonl or manifest.csv at its root"):
    list(captioned_crops.samples(str(tmp_path / "no_manifest.tar")))
  (tmp_path / "damaged.tar.gz").write_bytes(b"\x1f\x8b not gzip")
  with pytest.raises(SourceInvalid, match="damaged.tar.gz is not a readable tar archive"):
    list(captioned_crops.samples(str(tmp_path / "damaged.tar.gz")))


def test_csv_rows_without_a_path_or_a_caption_are_bad_records():
  text = 'caption,image_path\nfine,x.png\n,y.png\nlonely,\nagain,x.png\n"two\nlines",y.png\n'
  got = [(s.index, s.path, s.where, s.captions, s.problems)
         for s in captioned_crops.read_csv(io.StringIO(text, newline=""), "m.csv")]
  assert got == [(0, "x.png", "m.csv line 2, 5", ["fine", "again"], []),
                 (1, "y.png", "m.csv line 3, 7", ["", "two\nlines"], ["caption 0 (line 3) is empty"]),
                 (2, "?", "m.csv line 4", ["lonely"], ["line 4 has no image path"])]


def test_the_crops_config_is_valid_and_keeps_the_benchmark_rule_elsewhere():
  crops = config_files.load_config(os.path.join(helpers.ROOT, "configs", "captioned_crops.py"))
  config_domains.check(crops)
  assert crops.relations.rule == "mutual_topk" and crops.evals.val.type == crops.evals.test.type == "cross_domain"
  assert helpers.load_config("cuhk_pedes").relations.rule == "threshold"  # the paper's rule stays the default


@pytest.mark.slow
def test_a_run_on_crops_without_ids_selects_and_reports_on_a_benchmark(tmp_path, data_dir, capfd):
  """Training on a collection without ids: relations counted but not scored (the log says why), no
  clustering quality, the best epoch chosen on CUHK-PEDES's val split and the run reported on its test."""
  config = helpers.tiny_config(data_dir)
  tokenizer = datasets.tokenizer_path(config.data)  # the synthetic set's: it knows these words
  rng = np.random.default_rng(0)
  colours = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200), "black": (10, 10, 10)}
  records, files = [], {}
  for i in range(48):
    colour = list(colours)[i % 4]
    noise = rng.integers(0, 40, (32, 16, 3))
    files[f"crops/{i}.png"] = _png_of(np.clip(np.array(colours[colour]) + noise, 0, 255).astype(np.uint8))
    records.append({"image": f"crops/{i}.png", "captions": [f"a person in a {colour} shirt", f"{colour} clothes"]})
  root = str(tmp_path / "collection")
  _write_files(root, files)
  write_jsonl(root, records)
  cuhk = str(tmp_path / "CUHK-PEDES")
  benchmark_fixtures.write_fixture(cuhk, "cuhk_pedes")
  del config.data["synthetic"]
  config.data.update(dict(name="captioned_crops", manual_dir=root, tokenizer=tokenizer, holdout_val_ids=0,
                          data_dir=str(tmp_path / "tfds")))
  config.evals.val = dict(type="cross_domain", dataset="cuhk_pedes", manual_dir=cuhk, split="val", every="epoch")
  config.evals.test = dict(type="cross_domain", dataset="cuhk_pedes", manual_dir=cuhk, split="test", every="epoch")
  config.relations.update(dict(rule="mutual_topk", start_epoch=1))
  config.relations.clusters.update(dict(enabled=True, start_epoch=2, min_samples=2))  # joins the relations from epoch 2
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  relations = helpers.records(workdir, "relations")
  assert [r["epoch"] for r in relations] == [1, 2] and relations[0]["lrc_relations_per_batch_row"] <= 2  # mutual top-2
  assert not [k for r in helpers.records(workdir, "train") + relations for k in r if k.endswith(("precision", "recall"))]
  clusters = helpers.records(workdir, "clusters")
  assert clusters and all("ari" not in r and r["num_clusters"] >= 0 for r in clusters)
  assert "the data set has no ids: precision and recall cannot be measured" in capfd.readouterr().out
  assert [r["split"] for r in results["evaluations"] if r["epoch"] == 1] == ["val", "test"]
  assert results["best_val"]["selection"].startswith("best val epoch") and results["final"]["split"] == "test"
