"""TFDS builders for the three text-to-person benchmarks, read from their original files.

Each benchmark is distributed as one JSON annotation file (a list of records, one per
image) next to an `imgs/` folder; a record's path is relative to `imgs/`. The keys are the
ones IRRA's loaders read (`datasets/{cuhkpedes,icfgpedes,rstpreid}.py`):

| builder      | annotation file                       | path key    | splits          |
| ------------ | ------------------------------------- | ----------- | --------------- |
| `cuhk_pedes` | `reid_raw.json`, `CUHK-PEDES.json` or `caption_all.json` | `file_path` | train, val, test |
| `icfg_pedes` | `ICFG-PEDES.json` (or `ICFG_PEDES.json`) | `file_path` | train, test  |
| `rstpreid`   | `data_captions.json`                  | `img_path`  | train, val, test |

Every record also has `split`, `captions` (a list of strings) and `id` (the person; CUHK-PEDES
counts from 1). Other keys (`processed_tokens`) are not read. CUHK-PEDES also comes as its
first release's `caption_all.json`, whose records carry no split: then the standard one is
applied by person id (1–11,003 train, 11,004–12,003 val, 12,004–13,003 test, as IRRA's loader
documents), and the build says so. The builders write one example
per image (`features.person_text_features()`), the original person id kept, the image file's
bytes stored as they are. Records are written in file order (TFDS shuffling is off), and
`image_id` is a record's index among its split's records in the file.

Every record is checked before anything is written: the keys, the split name, a non-empty
list of non-empty captions, an integer id, a path no earlier record has, and an image file
that exists and that PIL decodes. Strict builders (the default) raise one error listing every
problem as `record <index> (<path>): <what>`; lenient ones skip the bad records, print how
many, and list them in `<data_dir>/<name>_problems.jsonl`. Missing image files are grouped by
their top folder under `imgs/`, the usual cause being a folder that was never extracted.

What a build holds is compared with the published statistics (`Layout.published`); a difference
is printed as a warning, with its known cause where there is one (the older RSTPReid release;
missing image folders).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os

import tensorflow_datasets as tfds

from data_prep import features, images
from data_prep.errors import SourceInvalid, SourceMissing

IMAGE_DIR = "imgs"
MISSING_IMAGE = "image file not found"
_MAX_LISTED = 100  # problems spelled out in a strict error; the file holds them all


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a benchmark's original files keep what.

  Attributes:
    annotation_files: accepted names of the JSON file; the first that exists is read.
    path_key: the record key holding the image path, relative to `imgs/`.
    splits: the split names records may carry.
  """

  annotation_files: tuple[str, ...]
  path_key: str
  splits: tuple[str, ...]
  # (split, first id, last id): the standard split applied when no record carries one.
  id_splits: tuple[tuple[str, int, int], ...] = ()
  # The published size of each split: {"images": .., "ids": .., "captions": ..} (what is known).
  published: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

  def required_keys(self, split_inferred: bool = False) -> tuple[str, ...]:
    return ("captions", "id", self.path_key) + (() if split_inferred else ("split",))


@dataclasses.dataclass(frozen=True)
class Record:
  """One valid annotation record: an image with all its captions."""

  index: int  # position in the annotation file
  split: str
  path: str  # as written in the file, relative to imgs/
  captions: tuple[str, ...]
  person_id: int
  image_id: int  # index among the split's records in the file


@dataclasses.dataclass(frozen=True)
class Problem:
  """Something wrong with annotation record `index`."""

  index: int
  path: str
  what: str

  def __str__(self) -> str:
    return f"record {self.index} ({self.path}): {self.what}"


def annotation_file(manual_dir: str, layout: Layout) -> str:
  """Path of the layout's annotation file in `manual_dir`; a clear error if there is none."""
  if not os.path.isdir(manual_dir):
    raise SourceMissing(f"manual_dir {manual_dir} is not a folder")
  for name in layout.annotation_files:
    if os.path.isfile(os.path.join(manual_dir, name)):
      return os.path.join(manual_dir, name)
  raise SourceMissing(f"{manual_dir} holds no annotation file: expected {' or '.join(layout.annotation_files)}")


def read_annotations(path: str) -> list:
  """The JSON list of records in `path`."""
  try:
    with open(path, encoding="utf-8") as f:
      annos = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise SourceInvalid(f"{path} is not valid JSON: {e}") from e
  except RecursionError as e:
    raise SourceInvalid(f"{path} is not an annotation file: its JSON is nested too deeply to be records") from e
  if not isinstance(annos, list):
    raise SourceInvalid(f"{path} must hold a JSON list of records, found {type(annos).__name__}")
  return annos


MAX_PERSON_ID = 2**63 - 1  # ids are stored as int64


def _person_id(value) -> int | None:
  """A record's id as a non-negative 64-bit integer (an int, or a string of ASCII digits), else None."""
  if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 19:
    value = int(value)
  if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PERSON_ID:
    return value
  return None


def record_problems(anno, layout: Layout, split_inferred: bool = False) -> list[str]:
  """What is wrong with one record's fields (image file not checked); [] when nothing."""
  if not isinstance(anno, dict):
    return [f"is a JSON {type(anno).__name__}, not an object"]
  problems = [f"missing key '{k}'" for k in layout.required_keys(split_inferred) if k not in anno]
  if "split" in anno and anno["split"] not in layout.splits:
    problems.append(f"unknown split {anno['split']!r}; expected one of {list(layout.splits)}")
  if "captions" in anno:
    captions = anno["captions"]
    if not isinstance(captions, list):
      problems.append(f"captions is a {type(captions).__name__}, not a list")
    elif not captions:
      problems.append("empty caption list")
    else:
      problems += [f"caption {j} is empty or not a string" for j, c in enumerate(captions)
                   if not isinstance(c, str) or not c.strip()]
  if "id" in anno and _person_id(anno["id"]) is None:
    problems.append(f"id {anno['id']!r} is not an integer in [0, 2^63)")
  if layout.path_key in anno and (not isinstance(anno[layout.path_key], str) or not anno[layout.path_key]):
    problems.append(f"{layout.path_key} {anno[layout.path_key]!r} is not a path")
  return problems


def path_problem(image_dir: str, path: str, allow_outside: bool) -> str | None:
  """Why a record's image path may not be read: an absolute path or a `..` step, or a link out of
  `image_dir` (unless `allow_outside`); None if it stays inside."""
  if allow_outside:
    return None
  if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
    return f"path {path!r} leaves {IMAGE_DIR}/ (absolute or '..'); data.allow_paths_outside=True permits it"
  root = os.path.realpath(image_dir)
  if os.path.commonpath([root, os.path.realpath(os.path.join(image_dir, path))]) != root:
    return f"path {path!r} links out of {IMAGE_DIR}/; data.allow_paths_outside=True permits it"
  return None


def image_problem(path: str) -> str | None:
  """Why the image file at `path` is unusable (missing, too large, or PIL cannot decode it); None if fine."""
  if not os.path.isfile(path):
    return f"{MISSING_IMAGE}: {path}"
  try:
    with images.open_checked(path) as img:
      img.load()
  except images.TooLarge as e:
    return f"image {path} {e}"
  except Exception as e:  # PIL raises several types for corrupt data
    return f"cannot read image {path}: {e}"
  return None


def _split_of(person_id, layout: Layout) -> str | None:
  pid = _person_id(person_id)
  return next((split for split, lo, hi in layout.id_splits if pid is not None and lo <= pid <= hi), None)


def infer_splits(annos: list, layout: Layout, path: str) -> list:
  """The records with the standard split by person id (`Layout.id_splits`), for a file whose
  records carry none; an error asks for a split field if an id lies outside every range."""
  outside = [(i, a.get("id")) for i, a in enumerate(annos)
             if isinstance(a, dict) and _person_id(a.get("id")) is not None and _split_of(a["id"], layout) is None]
  if outside:
    ranges = ", ".join(f"{split} {lo:,}–{hi:,}" for split, lo, hi in layout.id_splits)
    examples = ", ".join(f"record {i}: id {pid}" for i, pid in outside[:3])
    raise SourceInvalid(f"{path} has no split field and {len(outside)} records have ids outside the standard split "
                        f"by person id ({ranges}), e.g. {examples}: add a 'split' field "
                        f"({', '.join(map(repr, layout.splits))}) to every record")
  return [dict(a, split=_split_of(a.get("id"), layout)) if isinstance(a, dict) and _split_of(a.get("id"), layout)
          else a for a in annos]


def scan(manual_dir: str, layout: Layout, num_threads: int = 8,
         allow_outside: bool = False) -> tuple[list[Record], list[Problem], bool]:
  """(valid records, problems, whether the splits were inferred from person ids) of the benchmark
  in `manual_dir`, in file order.

  A record with any problem is not among the valid ones; a path is a duplicate when an earlier
  record has the same one (the earlier record is kept); a path that leaves `imgs/` is a problem
  unless `allow_outside`.
  """
  path = annotation_file(manual_dir, layout)
  annos = read_annotations(path)
  image_dir = os.path.join(manual_dir, IMAGE_DIR)
  if not os.path.isdir(image_dir):
    raise SourceMissing(f"{manual_dir} has no {IMAGE_DIR}/ folder of images")
  inferred = bool(layout.id_splits) and not any(isinstance(a, dict) and "split" in a for a in annos)
  if inferred:
    annos = infer_splits(annos, layout, path)
  paths = [a.get(layout.path_key) if isinstance(a, dict) else None for a in annos]
  paths = [p if isinstance(p, str) and p else "?" for p in paths]
  problems = {i: record_problems(a, layout, inferred) for i, a in enumerate(annos)}
  first_of: dict[str, int] = {}
  for i, p in enumerate(paths):
    if p == "?":
      continue
    key = os.path.normpath(p)
    if key in first_of:
      problems[i].append(f"duplicate path: record {first_of[key]} has it too")
    else:
      first_of[key] = i
  for i, p in enumerate(paths):
    problem = None if p == "?" else path_problem(image_dir, p, allow_outside)
    if problem:
      problems[i].append(problem)
  checked = [i for i, p in enumerate(paths) if p != "?" and not problems[i]]
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # PIL decodes without the GIL
    for i, problem in zip(checked, pool.map(image_problem, [os.path.join(image_dir, paths[i]) for i in checked])):
      if problem:
        problems[i].append(problem)

  records, seen = [], dict.fromkeys(layout.splits, 0)  # records of each split so far, bad ones too
  for i, anno in enumerate(annos):
    split = anno.get("split") if isinstance(anno, dict) else None
    if not isinstance(split, str) or split not in seen:
      continue  # a problem already
    if not problems[i]:
      records.append(Record(index=i, split=split, path=paths[i], captions=tuple(anno["captions"]),
                            person_id=_person_id(anno["id"]), image_id=seen[split]))
    seen[split] += 1
  return records, [Problem(i, paths[i], what) for i in problems for what in problems[i]], inferred


def write_problems(path: str, problems: list[Problem]) -> None:
  """One JSON line per bad record: its index, path and every problem."""
  by_record: dict[int, list[Problem]] = {}
  for p in problems:
    by_record.setdefault(p.index, []).append(p)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:  # whole or not at all
    for index, ps in by_record.items():
      f.write(json.dumps({"record": index, "path": ps[0].path, "problems": [p.what for p in ps]}) + "\n")
  os.replace(path + ".tmp", path)


def missing_folders(problems: list[Problem]) -> str:
  """Where missing image files lie, by their top folder under imgs/ (most first), or ""."""
  folders = collections.Counter(p.path.split("/")[0] if "/" in p.path else "." for p in problems
                                if p.what.startswith(MISSING_IMAGE))
  if not folders:
    return ""
  listed = ", ".join(f"{IMAGE_DIR}/{f}/ ({n})" for f, n in folders.most_common(5))
  return (f"{sum(folders.values())} image files are missing, under {listed}: a folder that was not extracted or "
          f"copied? (anosorae/IRRA#49)")


def statistics(records: list[Record]) -> dict[str, dict[str, int]]:
  """Per split: its images, captions and distinct person ids."""
  out: dict[str, dict[str, int]] = {}
  for split in dict.fromkeys(r.split for r in records):
    kept = [r for r in records if r.split == split]
    out[split] = {"images": len(kept), "captions": sum(len(r.captions) for r in kept),
                  "ids": len({r.person_id for r in kept})}
  return out


def published_differences(layout: Layout, name: str, summary: dict[str, dict[str, int]],
                          missing: str = "") -> list[str]:
  """Warnings, one per split whose size differs from the published one, then the known cause:
  the older RSTPReid release, or missing image files (`missing`, from `missing_folders`)."""
  warnings = []
  for split, published in layout.published:
    got = summary.get(split, {})
    differ = [f"{got.get(key, 0):,} {key} (published: {value:,})" for key, value in published if got.get(key) != value]
    if differ:
      warnings.append(f"{name} split '{split}' holds " + ", ".join(differ))
  if not warnings:
    return []
  ids = tuple(summary.get(split, {}).get("ids") for split in layout.splits)
  if name == "rstpreid" and ids == (3901, 100, 100):
    warnings.append("these are the identities of the older RSTPReid release (3,901 / 100 / 100 instead of "
                    "3,701 / 200 / 200; NjtechCVLab/RSTPReid-Dataset#2): figures on it do not compare with the "
                    "field's")
  if missing:
    warnings.append(missing)
  return warnings


def checked_records(manual_dir: str, layout: Layout, name: str, strict: bool, problems_file: str,
                    allow_outside: bool = False) -> list[Record]:
  """The valid records; problems raise (strict) or are skipped, counted and listed in `problems_file`.
  Image paths must stay inside `imgs/` unless `allow_outside`.

  Prints whether the splits were inferred from person ids, and how the records differ from the
  published statistics.
  """
  records, problems, inferred = scan(manual_dir, layout, allow_outside=allow_outside)
  missing = missing_folders(problems)
  if problems:
    write_problems(problems_file, problems)
    bad = len({p.index for p in problems})
    if strict:
      listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
      more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
      hint = f"\n{missing}" if missing else ""
      raise SourceInvalid(f"{name}: {len(problems)} problems in {bad} of {len(records) + bad} records of {manual_dir} "
                          f"(all listed in {problems_file}; --nostrict skips them):\n{listed}{more}{hint}")
    print(f"{name}: skipped {bad} of {len(records) + bad} records with problems; listed in {problems_file}")
  elif os.path.exists(problems_file):
    os.remove(problems_file)  # left by an earlier failed build
  if inferred:
    ranges = ", ".join(f"{split} {lo:,}–{hi:,}" for split, lo, hi in layout.id_splits)
    print(f"{name}: {annotation_file(manual_dir, layout)} has no split field; applied the standard split by "
          f"person id ({ranges})")
  for split in layout.splits:
    if not any(r.split == split for r in records):
      raise SourceInvalid(f"{name}: split '{split}' has no valid records in {manual_dir}")
  for warning in published_differences(layout, name, statistics(records), missing):
    print(f"warning: {warning}")
  return records


class PersonTextBenchmark(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A benchmark read from its original annotation JSON and `imgs/` folder (`manual_dir`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir is the benchmark's original folder: its annotation JSON and imgs/."
  LAYOUT: Layout

  def __init__(self, *, strict: bool = True, allow_outside: bool = False, **kwargs):
    """`strict`: any bad record fails the build; otherwise bad records are skipped and listed.
    `allow_outside`: image paths may leave `imgs/` (absolute, `..`, links out of it)."""
    self.strict, self.allow_outside = strict, allow_outside
    super().__init__(**kwargs)

  @property
  def problems_file(self) -> str:
    return os.path.join(os.fspath(self.data_dir_root), f"{self.name}_problems.jsonl")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features.person_text_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    records = checked_records(manual_dir, self.LAYOUT, self.name, self.strict, self.problems_file, self.allow_outside)
    return {split: self._generate_examples(manual_dir, [r for r in records if r.split == split])
            for split in self.LAYOUT.splits}

  def _generate_examples(self, manual_dir: str, records: list[Record]):
    for r in records:
      yield r.path, {
          "image": os.path.join(manual_dir, IMAGE_DIR, r.path),  # the file's bytes, as they are
          "captions": list(r.captions),
          "person_id": r.person_id,
          "image_id": r.image_id,
          "path": r.path,
      }


class CuhkPedes(PersonTextBenchmark):
  """CUHK-PEDES (Li et al., CVPR 2017): 40,206 images of 13,003 persons, about two captions each."""

  name = "cuhk_pedes"
  LAYOUT = Layout(
      annotation_files=("reid_raw.json", "CUHK-PEDES.json", "caption_all.json"), path_key="file_path",
      splits=("train", "val", "test"), id_splits=(("train", 1, 11003), ("val", 11004, 12003), ("test", 12004, 13003)),
      published=(("train", (("images", 34054), ("ids", 11003), ("captions", 68126))),
                 ("val", (("images", 3078), ("ids", 1000), ("captions", 6158))),
                 ("test", (("images", 3074), ("ids", 1000), ("captions", 6156)))))


class IcfgPedes(PersonTextBenchmark):
  """ICFG-PEDES (Ding et al., 2021): 54,522 images of 4,102 persons, one caption each; no val split."""

  name = "icfg_pedes"
  LAYOUT = Layout(annotation_files=("ICFG-PEDES.json", "ICFG_PEDES.json"), path_key="file_path",
                  splits=("train", "test"),
                  published=(("train", (("images", 34674), ("ids", 3102))), ("test", (("images", 19848), ("ids", 1000)))))


class Rstpreid(PersonTextBenchmark):
  """RSTPReid (Zhu et al., ACM MM 2021): 20,505 images of 4,101 persons, two captions each."""

  name = "rstpreid"
  LAYOUT = Layout(annotation_files=("data_captions.json",), path_key="img_path", splits=("train", "val", "test"),
                  published=(("train", (("images", 18505), ("ids", 3701))), ("val", (("images", 1000), ("ids", 200))),
                             ("test", (("images", 1000), ("ids", 200)))))


BUILDERS: dict[str, type[PersonTextBenchmark]] = {b.name: b for b in (CuhkPedes, IcfgPedes, Rstpreid)}


def make_builder(name: str, data_dir: str, strict: bool = True, allow_outside: bool = False) -> PersonTextBenchmark:
  """The (maybe unprepared) builder of benchmark `name` under `data_dir`."""
  if name not in BUILDERS:
    raise SourceInvalid(f"unknown benchmark '{name}'; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=data_dir, file_format="array_record", strict=strict, allow_outside=allow_outside)


def prepare(builder: PersonTextBenchmark, manual_dir: str) -> None:
  """Builds `builder` from the original files in `manual_dir` (checked first)."""
  if not manual_dir:
    raise SourceMissing(f"{builder.name} needs the folder of its original files: set data.manual_dir (or --manual_dir)")
  annotation_file(manual_dir, builder.LAYOUT)  # a clear error before TFDS looks at the folder
  os.makedirs(os.fspath(builder.data_dir_root), exist_ok=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def split_summary(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """Per split of a prepared builder: its images, captions and distinct person ids, read back."""
  summary = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    captions, ids = 0, set()
    for start in range(0, len(source), 1024):  # a chunk at a time: a collection may hold millions
      for example in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
        captions += len(example["captions"])
        ids.add(int(example["person_id"]))
    summary[split] = {"images": len(source), "captions": captions, "ids": len(ids)}
  return summary
