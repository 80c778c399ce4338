"""TFDS builder for collections of automatically captioned person crops (LUPerson-MLLM, SYNTH-PEDES,
WebPerson-5M style), read as they are distributed: images with captions, no person ids, no splits.

What `source` is tells how it is read (`locate`):

- a folder holding `manifest.jsonl` (or that file): one JSON object a line, with the image path
  (`image`, `image_path`, `file_path` or `img_path`: the first present) and `caption` (a string)
  and/or `captions` (a list of strings);
- a folder holding `manifest.csv` (or that file): a header with an image path column (as above) and
  `caption`; the rows of one path are its captions, in order;
- a `.tar`, `.tar.gz` or `.tgz` file: an archive of such a folder, its manifest at the archive's root
  or in its one top folder;
- a folder of `*.tar` files, or a glob: WebDataset shards. Consecutive members sharing a key (the
  name up to its base name's first dot) make a sample: one image (`.jpg`, `.jpeg`, `.png`, `.webp`),
  captions in `.txt` (each non-empty line is one) and/or `.json` (`caption` and/or `captions`).

Manifest paths are relative to the manifest's folder and stay inside it (no absolute path, no `..`, no
link out of it; `allow_outside` permits them; in an archive a path must name a file member). Other
members and keys are not read; a manifest record's own ids are not either.

Everything is read as a stream, one record at a time, and the number of records is not known
before the end. What is kept whole: the normalized paths seen (to name duplicates); a CSV manifest's
rows, grouped by path (a dict of path -> captions; several rows of one image may lie far apart); an
archive's manifest and member names (its members come in their own order: its images are read in
a second pass over the archive, in member order, and written in that order). A WebDataset shard is
read member by member (`tarfile` mode "r|*", nothing extracted), one sample held at a time; its keys
are remembered until the shard ends (a key may only recur within its own shard).

Every record is checked as `data_prep.benchmarks` checks: a path (present, inside, no earlier
record's), its image (there, within `images.open_checked`'s size limit, decoded by PIL), at least
one caption and no empty one. The checks run as the examples are generated, so a source is read
once (an archive twice). Strict builders (the default) write nothing after the first bad record, read on, and raise
one `SourceInvalid` listing the problems as `record <n> (<path or key>): <what>` before TFDS commits
anything; lenient ones skip bad records, print how many, and list them. Either way every bad record
is in `<data_dir>/<name>_<config>_problems.jsonl` (written whole once the source is read).

The examples have the benchmarks' schema (`features.person_text_features()`): the image file's bytes
as they are, the captions, `person_id` = `NO_PERSON_ID` (-1: no id, for every example), `image_id` =
the record's index among the source's records (bad ones counted, so skipping shifts nothing), and
`path` = the manifest's path or `<shard>/<key>`. One split, `train`: the collections have none
(evaluation reads a benchmark's split). Records are numbered from 0 in the source's order: a JSONL
manifest's non-blank lines, a CSV manifest's images as they first appear, the samples of every shard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator

import tensorflow_datasets as tfds

from data_prep import features, images
from data_prep.benchmarks import MISSING_IMAGE
from data_prep.errors import SourceInvalid, SourceMissing

NO_PERSON_ID = -1  # every example's person_id: the collections name no person
SPLIT = "train"
MANIFESTS = ("manifest.jsonl", "manifest.csv")
PATH_KEYS = ("image", "image_path", "file_path", "img_path")  # the first one a record has is read
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a WebDataset sample's image
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_MAX_LISTED = 100  # problems spelled out in a strict error; the file holds them all
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # WebDataset: key = up to the base name's first dot
_SHARD_DAMAGE = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclasses.dataclass
class Sample:
  """One record: an image and its captions, read, its image maybe not yet."""

  index: int  # position among the source's records, bad ones too: the example's image_id
  path: str  # the manifest's path, or `<shard>/<key>`; "?" if the record names none
  where: str  # where it lies, for the problems file: "manifest.jsonl line 7", "shard-00001.tar"
  captions: list = dataclasses.field(default_factory=list)
  image: bytes | str | None = None  # the image file's bytes, or the file to read them from
  problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Source:
  """A located source: `kind` "manifest" (`path` the manifest file), "archive" (`path`) or "shards"."""

  kind: str
  path: str
  shards: tuple[str, ...] = ()


def _is_archive(path: str) -> bool:
  return path.lower().endswith(ARCHIVE_EXTENSIONS)


def locate(source: str) -> Source:
  """What `source` is (see the module's table); a clear error if it is none of them."""
  if glob.has_magic(source):
    shards = tuple(sorted(p for p in glob.glob(source) if os.path.isfile(p)))
    if not shards:
      raise SourceMissing(f"no file matches {source}: expected WebDataset shards")
    return Source("shards", source, shards)
  if os.path.isdir(source):
    found = [os.path.join(source, m) for m in MANIFESTS if os.path.isfile(os.path.join(source, m))]
    if len(found) > 1:
      raise SourceInvalid(f"{source} holds both {' and '.join(MANIFESTS)}: keep one")
    if found:
      return Source("manifest", found[0])
    shards = tuple(sorted(p for p in glob.glob(os.path.join(source, "*")) if os.path.isfile(p) and _is_archive(p)))
    if not shards:
      raise SourceMissing(f"{source} holds no {' or '.join(MANIFESTS)} and no *.tar WebDataset shards")
    return Source("shards", source, shards)
  if os.path.isfile(source):
    if _is_archive(source):
      return Source("archive", source)
    if source.lower().endswith((".jsonl", ".csv")):
      return Source("manifest", source)
    raise SourceInvalid(f"{source} is not a manifest (.jsonl, .csv), an archive ({', '.join(ARCHIVE_EXTENSIONS)}), "
                        "a folder or a glob of WebDataset shards")
  raise SourceMissing(f"captioned crops source {source} does not exist")


def json_captions(obj: dict) -> tuple[list, list[str]]:
  """(captions, problems) of an object's `caption` (a string) and/or `captions` (a list of strings)."""
  if "caption" not in obj and "captions" not in obj:
    return [], ["no captions: expected a key 'caption' or 'captions'"]
  captions = [obj["caption"]] if "caption" in obj else []
  problems = []
  if "captions" in obj:
    if isinstance(obj["captions"], list):
      captions += obj["captions"]
    else:
      problems.append(f"captions is a {type(obj['captions']).__name__}, not a list")
  if not captions and not problems:
    problems.append("empty caption list")
  problems += [f"caption {j} is empty or not a string" for j, c in enumerate(captions)
               if not isinstance(c, str) or not c.strip()]
  return captions, problems


def manifest_record(obj, index: int, where: str) -> Sample:
  """The Sample of one manifest object (its image not read); its problems if its fields are wrong."""
  if not isinstance(obj, dict):
    return Sample(index, "?", where, problems=[f"is a JSON {type(obj).__name__}, not an object"])
  sample = Sample(index, "?", where)
  key = next((k for k in PATH_KEYS if k in obj), None)
  if key is None:
    sample.problems.append(f"no image path: expected a key {' or '.join(map(repr, PATH_KEYS))}")
  elif isinstance(obj[key], str) and obj[key].strip():
    sample.path = obj[key]
  else:
    sample.problems.append(f"{key} {obj[key]!r} is not a path")
  sample.captions, problems = json_captions(obj)
  sample.problems += problems
  return sample


def read_jsonl(lines: Iterable[bytes], name: str) -> Iterator[Sample]:
  """One Sample per non-blank line of a JSONL manifest (`lines`: its raw lines, e.g. its binary file), read
  lazily, one line at a time; images not read. A line that is not JSON is a bad record."""
  index = 0
  for line_no, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    where = f"{name} line {line_no}"
    try:
      obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
      yield Sample(index, "?", where, problems=[f"line {line_no} is not valid JSON: {e}"])
    else:
      yield manifest_record(obj, index, where)
    index += 1


def read_csv(f: Iterable[str], name: str) -> Iterator[Sample]:
  """One Sample per image of a CSV manifest (`f`: its text, e.g. a file opened with newline=""): the rows of
  one path are its captions, in file order; images in the order they first appear. Grouping needs
  every row, so all are read (a dict of path -> captions) before the first Sample; a row without a
  path is a record of its own."""
  reader = csv.reader(f)
  try:
    header = [h.strip() for h in next(reader)]
    path_col = next((header.index(k) for k in PATH_KEYS if k in header), None)
    if path_col is None or "caption" not in header:
      raise SourceInvalid(f"{name}: header {header} needs an image path column ({' or '.join(PATH_KEYS)}) and "
                          "'caption'")
    caption_col = header.index("caption")
    groups: dict = {}  # path (or (line,) for a row without one) -> Sample
    for row in reader:
      if not any(cell.strip() for cell in row):
        continue
      line = reader.line_num
      path = row[path_col] if len(row) > path_col else ""
      key = path if path.strip() else (line,)
      if key not in groups:
        groups[key] = Sample(len(groups), path if path.strip() else "?", f"{name} line {line}")
        if not path.strip():
          groups[key].problems.append(f"line {line} has no image path")
      elif groups[key].where.count(",") < 9:
        groups[key].where += f", {line}"
      sample = groups[key]
      if len(row) <= caption_col or not row[caption_col].strip():
        sample.problems.append(f"caption {len(sample.captions)} (line {line}) is empty")
      sample.captions.append(row[caption_col] if len(row) > caption_col else "")
  except StopIteration:
    raise SourceInvalid(f"{name} is empty: expected a header with an image path column and 'caption'") from None
  except csv.Error as e:
    raise SourceInvalid(f"{name} line {reader.line_num} is not CSV: {e}") from e
  except UnicodeDecodeError as e:
    raise SourceInvalid(f"{name} after line {reader.line_num} is not UTF-8 text: {e}") from e
  yield from groups.values()


def _read_manifest(f, name: str) -> Iterator[Sample]:
  """The records of manifest `name` in binary file `f`, read lazily (a CSV's rows are grouped first)."""
  if name.lower().endswith(".csv"):
    return read_csv(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), name)
  return read_jsonl(f, name)


def outside_problem(path: str, folder: str | None = None) -> str | None:
  """`data_prep.benchmarks.path_problem`'s rule for a manifest path: absolute, a `..` step, or (given the
  `folder` it lies in) a link out of it, is a problem; None if it stays inside."""
  if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
    return f"path {path!r} leaves the manifest's folder (absolute or '..'); data.allow_paths_outside=True permits it"
  if folder is not None:
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(os.path.join(folder, path))]) != root:
      return f"path {path!r} links out of the manifest's folder; data.allow_paths_outside=True permits it"
  return None


def manifest_samples(manifest: str, allow_outside: bool = False) -> Iterator[Sample]:
  """The records of a manifest file, in order, lazily, each naming its image file (not read yet): paths
  checked (inside the manifest's folder unless `allow_outside`, no earlier record's)."""
  folder, name = os.path.dirname(manifest), os.path.basename(manifest)
  first: dict[str, int] = {}  # normalized path -> the record that has it
  with open(manifest, "rb") as f:
    for sample in _read_manifest(f, name):
      if sample.path != "?":
        key = os.path.normpath(sample.path)
        if key in first:
          sample.problems.append(f"duplicate path: record {first[key]} has it too")
        else:
          first[key] = sample.index
        problem = None if allow_outside else outside_problem(sample.path, folder)
        if problem:
          sample.problems.append(problem)
        if not sample.problems:
          sample.image = os.path.join(folder, sample.path)
      yield sample


def _member_name(member: tarfile.TarInfo) -> str:
  return posixpath.normpath(member.name)


def _stream_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
  """`tar`'s members as it reads them, none kept (a stream's TarFile would keep every one)."""
  while (member := tar.next()) is not None:
    tar.members = []
    yield member


def _damaged(archive: str, e: Exception) -> SourceInvalid:
  return SourceInvalid(f"{archive} is not a readable tar archive ({type(e).__name__}: {e})")


def archive_samples(archive: str, allow_outside: bool = False) -> Iterator[Sample]:
  """The records of the manifest in `archive`, lazily, each with its image's bytes (not checked yet).

  Two passes over the archive as a stream: the first reads the manifest (at the root or in the one
  top folder) and the member names, the second the images the good records name, in member order;
  bad records come first. A path must name a file member (`..` out of the manifest's folder only
  with `allow_outside`; never a link).
  """
  manifest, records, files, links = None, [], set(), set()
  try:
    with tarfile.open(archive, "r|*") as tar:
      for member in _stream_members(tar):
        name = _member_name(member)
        if member.issym() or member.islnk():
          links.add(name)
        elif member.isfile():
          files.add(name)
          if posixpath.basename(name) in MANIFESTS and name.count("/") <= 1:
            if manifest is not None:
              raise SourceInvalid(f"{archive} holds two manifests, {manifest} and {name}: keep one")
            manifest = name
            records = list(_read_manifest(tar.extractfile(member), f"{os.path.basename(archive)}:{name}"))
  except _SHARD_DAMAGE as e:
    raise _damaged(archive, e) from e
  if manifest is None:
    raise SourceMissing(f"{archive} holds no {' or '.join(MANIFESTS)} at its root or in its top folder")
  prefix = posixpath.dirname(manifest)
  first: dict[str, int] = {}
  wanted: dict[str, Sample] = {}  # member name -> the good record that names it
  for sample in records:
    if sample.path != "?":
      name = posixpath.normpath(posixpath.join(prefix, sample.path))
      if name in first:
        sample.problems.append(f"duplicate path: record {first[name]} has it too")
      else:
        first[name] = sample.index
      problem = None if allow_outside else outside_problem(sample.path)
      if problem:
        sample.problems.append(problem)
      elif name in links:
        sample.problems.append(f"{name} is a link in {archive}, not a file")
      elif name not in files:
        sample.problems.append(f"{MISSING_IMAGE}: {name} in {archive}")
      if not sample.problems:
        wanted[name] = sample
        continue
    yield sample
  del records, files, links
  try:
    with tarfile.open(archive, "r|*") as tar:
      for member in _stream_members(tar):
        sample = wanted.pop(_member_name(member), None) if member.isfile() else None
        if sample is not None:
          sample.image = tar.extractfile(member).read()
          yield sample
  except _SHARD_DAMAGE as e:
    raise _damaged(archive, e) from e
  for sample in wanted.values():  # the archive changed between the passes
    sample.problems.append(f"{MISSING_IMAGE}: gone from {archive} on its second read")
    yield sample


def _shard_sample(index: int, shard: str, key: str, parts: dict, problems: list[str]) -> Sample:
  """The Sample of one WebDataset sample: `parts` maps its extensions to their bytes."""
  sample = Sample(index, f"{shard}/{key}", shard, problems=problems)
  found = [ext for ext in parts if ext in IMAGE_EXTENSIONS]
  if not found:
    problems.append(f"no image: expected a member {key}.{', .'.join(IMAGE_EXTENSIONS)}")
  elif len(found) > 1:
    problems.append(f"several images: {', '.join(f'{key}.{ext}' for ext in found)}")
  else:
    sample.image = parts[found[0]]
  caption_problems = []
  if "txt" in parts:
    try:
      sample.captions += [line.strip() for line in parts["txt"].decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
      caption_problems.append(f"{key}.txt is not UTF-8 text: {e}")
  if "json" in parts:
    try:
      obj = json.loads(parts["json"])
    except (ValueError, RecursionError) as e:
      caption_problems.append(f"{key}.json is not valid JSON: {e}")
    else:
      if not isinstance(obj, dict):
        caption_problems.append(f"{key}.json holds a JSON {type(obj).__name__}, not an object")
      elif "caption" in obj or "captions" in obj:  # else metadata only: the captions are in .txt
        captions, more = json_captions(obj)
        sample.captions += captions
        caption_problems += more
  if not sample.captions and not caption_problems:
    held = " and ".join(f"{key}.{ext}" for ext in ("txt", "json") if ext in parts)
    caption_problems.append(f"no captions in {held}" if held else
                            f"no captions: expected a member {key}.txt or {key}.json")
  problems += caption_problems
  return sample


def read_shard(fileobj, shard: str, first_index: int = 0) -> Iterator[Sample]:
  """The samples of one WebDataset shard, lazily: `fileobj` (binary, maybe gzipped) is read once as a
  stream, member by member, and only one sample is held. Consecutive members sharing a key make a
  sample; a key that recurs after others is a duplicate. A damaged shard ends with a bad record
  naming the damage (the sample it hit, or the shard)."""
  index, first, key, parts, problems = first_index, {}, None, {}, []
  try:
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
      for member in _stream_members(tar):
        if member.isdir():
          continue
        match = _KEY_EXT.match(_member_name(member))
        if not match:
          continue  # no extension: not part of a sample
        if match.group(1) != key:
          if key is not None:
            yield _shard_sample(index, shard, key, parts, problems)
            index += 1
          key, parts, problems = match.group(1), {}, []
          if key in first:
            problems.append(f"duplicate key: record {first[key]} has it too")
          else:
            first[key] = index
        ext, base = match.group(2).lower(), posixpath.basename(member.name)
        if ext not in IMAGE_EXTENSIONS + ("txt", "json"):
          continue
        if ext in parts:
          problems.append(f"{base} comes twice")
        elif not member.isfile():
          problems.append(f"{base} is a link in {shard}, not a file")
          parts[ext] = b""
        else:
          parts[ext] = tar.extractfile(member).read()
  except _SHARD_DAMAGE as e:
    where = shard if key is None else f"{shard}/{key}"
    yield Sample(index, where, shard, problems=problems + [f"{shard} is damaged ({type(e).__name__}: {e}); the rest of "
                                                           "it is not read"])
    return
  if key is not None:
    yield _shard_sample(index, shard, key, parts, problems)


def shard_names(shards: tuple[str, ...]) -> list[str]:
  """Each shard's name in examples' paths: its path from the folder all of them lie in."""
  root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards])
  return [os.path.relpath(os.path.abspath(s), root).replace(os.sep, "/") for s in shards]


def shard_samples(shards: tuple[str, ...]) -> Iterator[Sample]:
  """The samples of every shard, in shard order, lazily; indices run on across shards."""
  index = 0
  for path, name in zip(shards, shard_names(shards)):
    with open(path, "rb") as f:
      for sample in read_shard(f, name, index):
        index = sample.index + 1
        yield sample


def samples(source: str, allow_outside: bool = False) -> Iterator[Sample]:
  """Every record of `source` (`locate`), lazily, in the order written (an archive's: bad records first, then
  its member order); images not checked (`check_image`)."""
  where = locate(source)
  if where.kind == "manifest":
    return manifest_samples(where.path, allow_outside)
  if where.kind == "archive":
    return archive_samples(where.path, allow_outside)
  return shard_samples(where.shards)


def image_bytes_problem(data: bytes, name: str) -> str | None:
  """Why image bytes are unusable (over the size limit, or PIL cannot decode them); None if fine."""
  try:
    with images.open_checked(io.BytesIO(data)) as img:
      img.load()
  except images.TooLarge as e:
    return f"image {name} {e}"
  except Exception as e:  # PIL raises several types for corrupt data
    return f"cannot read image {name}: {e}"
  return None


def check_image(sample: Sample) -> Sample:
  """`sample` (if it has no problem yet) with its image's bytes read from its file and checked."""
  if sample.problems or sample.image is None:
    return sample
  name = sample.image if isinstance(sample.image, str) else sample.path
  if isinstance(sample.image, str):
    if not os.path.isfile(sample.image):
      sample.problems.append(f"{MISSING_IMAGE}: {sample.image}")
      return sample
    try:
      with open(sample.image, "rb") as f:
        sample.image = f.read()
    except OSError as e:
      sample.problems.append(f"cannot read image {name}: {e}")
      return sample
  problem = image_bytes_problem(sample.image, name)
  if problem:
    sample.problems.append(problem)
  return sample


def checked(records: Iterator[Sample], num_threads: int = 8, ahead: int = 64) -> Iterator[Sample]:
  """`records` through `check_image` on `num_threads` threads (PIL decodes without the GIL), in order, lazily:
  at most `ahead` records in flight."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    for sample in records:
      pending.append(pool.submit(check_image, sample))
      if len(pending) >= ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class ProblemLog:
  """A build's bad records, written as they come to `path`.tmp, which replaces `path` when the source is read
  (`finish`); the first `_MAX_LISTED` problems kept for the strict error."""

  def __init__(self, path: str):
    self.path, self.records, self.bad, self.count, self.listed = path, 0, 0, 0, []
    self._file = None

  def add(self, sample: Sample) -> None:
    if self._file is None:
      os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
      self._file = open(self.path + ".tmp", "w", encoding="utf-8")
    self._file.write(json.dumps({"record": sample.index, "path": sample.path, "where": sample.where,
                                 "problems": sample.problems}) + "\n")
    self.bad += 1
    self.count += len(sample.problems)
    room = _MAX_LISTED - len(self.listed)
    self.listed += [f"record {sample.index} ({sample.path}): {p}" for p in sample.problems][:room]

  def finish(self) -> None:
    """The problems file in place (all of them), or an earlier build's removed if there are none."""
    if self._file is not None:
      self._file.close()
      os.replace(self.path + ".tmp", self.path)
    elif os.path.exists(self.path):
      os.remove(self.path)

  def abandon(self) -> None:
    if self._file is not None:
      self._file.close()
      os.remove(self.path + ".tmp")


@dataclasses.dataclass(kw_only=True)
class CaptionedCropsConfig(tfds.core.BuilderConfig):
  """The source read; built by `from_source`, whose name tells sources apart in one data_dir."""

  source: str = ""

  @classmethod
  def from_source(cls, source: str) -> "CaptionedCropsConfig":
    """The config of `source` (made absolute, links resolved): named `<its base name>_<hash of the path>`."""
    full = os.path.realpath(os.path.expanduser(source))
    plain = [p for p in full.split(os.sep) if p and not glob.has_magic(p)]
    base = plain[-1] if plain else "root"
    for ext in ARCHIVE_EXTENSIONS + (".jsonl", ".csv"):
      base = base[:-len(ext)] if base.lower().endswith(ext) else base
    slug = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:40] or "source"
    digest = hashlib.sha256(full.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return cls(name=f"{slug}_{digest}", source=full, description=f"Captioned person crops from {full}.")


class CaptionedCrops(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A collection of captioned person crops (no ids, no splits) read from `builder_config.source`."""

  name = "captioned_crops"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = []  # the source always comes from a config built by `CaptionedCropsConfig.from_source`

  def __init__(self, *, strict: bool = True, allow_outside: bool = False, num_threads: int = 8, **kwargs):
    """`strict`: any bad record fails the build; otherwise bad records are skipped and listed.
    `allow_outside`: manifest paths may leave the manifest's folder. `num_threads` check images."""
    self.strict, self.allow_outside, self.num_threads = strict, allow_outside, num_threads
    super().__init__(**kwargs)

  @property
  def problems_file(self) -> str:
    return os.path.join(os.fspath(self.data_dir_root), f"{self.name}_{self.builder_config.name}_problems.jsonl")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features.person_text_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    locate(self.builder_config.source)  # a clear error before anything is generated
    return {SPLIT: self._generate_examples(self.builder_config.source)}

  def _generate_examples(self, source: str):
    """The good records as examples, lazily; the problems handled (raised, or printed) after the last."""
    name = f"{self.name}/{self.builder_config.name}"
    log, images_kept, captions_kept = ProblemLog(self.problems_file), 0, 0
    try:
      for sample in checked(samples(source, self.allow_outside), self.num_threads):
        log.records += 1
        if sample.problems:
          log.add(sample)
        elif not (self.strict and log.bad):  # strict: the build fails, nothing more is written
          images_kept, captions_kept = images_kept + 1, captions_kept + len(sample.captions)
          yield sample.path, {
              "image": sample.image,  # the file's bytes, as they are
              "captions": list(sample.captions),
              "person_id": NO_PERSON_ID,
              "image_id": sample.index,
              "path": sample.path,
          }
    except BaseException:
      log.abandon()
      raise
    log.finish()
    if log.bad and self.strict:
      more = f"\n  ... and {log.count - _MAX_LISTED} more" if log.count > _MAX_LISTED else ""
      raise SourceInvalid(f"{name}: {log.count} problems in {log.bad} of {log.records} records of {source} (all "
                          f"listed in {log.path}; --nostrict skips them):\n" + "\n".join(f"  {p}" for p in log.listed)
                          + more)
    if not images_kept:
      raise SourceInvalid(f"{name}: no valid records in {source}" + (f" (listed in {log.path})" if log.bad else ""))
    if log.bad:
      print(f"{name}: skipped {log.bad} of {log.records} records with problems; listed in {log.path}")
    print(f"{name}: {images_kept:,} images, {captions_kept:,} captions from {source}")


def make_builder(source: str, data_dir: str, strict: bool = True, allow_outside: bool = False,
                 num_threads: int = 8) -> CaptionedCrops:
  """The (maybe unprepared) builder of the collection at `source` under `data_dir`."""
  if not source:
    raise SourceMissing("captioned crops need their source: a manifest folder or archive, or WebDataset shards "
                        "(set data.manual_dir)")
  return CaptionedCrops(config=CaptionedCropsConfig.from_source(source), data_dir=data_dir,
                        file_format="array_record", strict=strict, allow_outside=allow_outside,
                        num_threads=num_threads)


def prepare(builder: CaptionedCrops) -> None:
  """Builds `builder` from its source (located first: a clear error before TFDS starts)."""
  locate(builder.builder_config.source)
  os.makedirs(os.fspath(builder.data_dir_root), exist_ok=True)
  builder.download_and_prepare()
