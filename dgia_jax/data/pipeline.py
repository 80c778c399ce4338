"""Input pipeline: TFDS array_record data read TF-free, batched with grain.

A data set holds one record per image with all its captions. Training iterates over
*pairs* (image, caption): pair `p` is row `p` of the memory banks. The pair table
(record, tokens) is built once when a split is opened; grain workers then only decode
images.

Training order is a pure function of (seed, step): epoch `e` visits the pairs in
`permutation(seed, e)`, the global batch of step `s` is a contiguous slice of it, and each
process loads its own contiguous part of every global batch. So a run's global batches are
the same whatever the number of processes, and resuming at step `s` continues exactly.

Person ids are kept on the `Split` for evaluation and measurement only; the training
batches never carry them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import images
from dgia_jax.common import errors
from dgia_jax.data.tokenizer import Tokenizer

_READ_CHUNK = 512
RESIZE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _without_stream(message: str) -> str:
  """PIL's message with the in-memory stream it names (`<_io.BytesIO object at 0x...>`) left out."""
  return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", message)


def decode_image(data: bytes, image_size: tuple[int, int], resize: str = "bicubic", name: str = "image") -> np.ndarray:
  """An encoded image (JPEG, PNG, WebP, ...) as uint8 [H, W, 3] at `image_size` (H, W): the eval
  transform every image goes through, a data set's or a user's own. BadInputError naming `name` (its
  file) if PIL cannot decode it or it is larger than `data_prep.images.MAX_PIXELS` (checked before
  decoding)."""
  try:
    img = images.open_checked(io.BytesIO(data)).convert("RGB")
  except images.TooLarge as e:
    raise errors.BadInputError(f"{name} {e}") from e
  except Exception as e:  # PIL raises several types for corrupt data
    raise errors.BadInputError(f"cannot decode {name}: {_without_stream(str(e))}") from e
  h, w = image_size
  if img.size != (w, h):
    img = img.resize((w, h), RESIZE_FILTERS[resize])
  return np.asarray(img, np.uint8)


@dataclasses.dataclass
class Split:
  """One split of a person–text data set.

  Attributes:
    name: split name, used in error messages.
    source: random-access TFDS data source with undecoded image bytes.
    source_records: int64 [R], the source record of each of this split's R images (a split
      may be a subset of its source, e.g. identities held out for validation).
    image_size: (H, W) images are resized to.
    resize: the filter (`RESIZE_FILTERS`): "bilinear" is torchvision's default, as the
      reference code resizes; PIL antialiases when it shrinks either way.
    pair_record: int64 [P], record (0..R-1) of each (image, caption) pair.
    pair_caption: the P caption strings.
    tokens: int32 [P, L], the encoded captions.
    image_paths: the R image paths, by record.
    person_ids: int64 [R], by record. Hidden: evaluation, measurement and `oracle` only.
    source_split: the data set's split `source` reads (the train split, for identities held out of it).
  """

  name: str
  source: object
  source_records: np.ndarray
  image_size: tuple[int, int]
  pair_record: np.ndarray
  pair_caption: list[str]
  tokens: np.ndarray
  image_paths: list[str]
  person_ids: np.ndarray
  resize: str = "bicubic"
  source_split: str = ""

  @property
  def num_pairs(self) -> int:
    return len(self.pair_record)

  @property
  def num_images(self) -> int:
    return len(self.image_paths)

  @property
  def has_ids(self) -> bool:
    """Whether the images have person ids (a collection of captioned crops has none: -1)."""
    return bool((self.person_ids >= 0).all())

  @property
  def pair_person_ids(self) -> np.ndarray:
    """int64 [P]: person id of each pair (hidden; measurement only)."""
    return self.person_ids[self.pair_record]

  def image_bytes(self, record: int) -> bytes:
    """The stored file bytes of record `record`'s image, as the data set's files had them."""
    return self.source[int(self.source_records[record])]["image"]

  def load_image(self, record: int) -> np.ndarray:
    """Decodes record `record`'s image to uint8 [H, W, 3], resized to `image_size` with `resize`."""
    where = f"{self.name} record {int(self.source_records[record])} ({self.image_paths[record]})"
    return decode_image(self.image_bytes(record), self.image_size, self.resize, name=where)

  def subset(self, keep: np.ndarray, name: str) -> "Split":
    """The split restricted to records where `keep` [R] (bool) holds, with all their pairs."""
    new_record = np.cumsum(keep) - 1
    pairs = keep[self.pair_record]
    return Split(name=name, source=self.source, source_records=self.source_records[keep],
                 image_size=self.image_size, pair_record=new_record[self.pair_record[pairs]],
                 pair_caption=[c for c, k in zip(self.pair_caption, pairs) if k], tokens=self.tokens[pairs],
                 image_paths=[p for p, k in zip(self.image_paths, keep) if k], person_ids=self.person_ids[keep],
                 resize=self.resize, source_split=self.source_split)


def hold_out_identities(split: Split, num_ids: int, seed: int, name: str) -> tuple[Split, Split]:
  """(split without them, split of them): every image and caption of `num_ids` random identities."""
  ids = np.unique(split.person_ids)
  if not 0 < num_ids < len(ids):
    raise errors.ConfigError(f"data.holdout_val_ids: cannot hold out {num_ids} of the {len(ids)} identities of split '{split.name}'")
  held = np.random.default_rng([seed, 7]).choice(ids, num_ids, replace=False)
  mask = np.isin(split.person_ids, held)
  return split.subset(~mask, split.name), split.subset(mask, name)


def open_split(builder: tfds.core.DatasetBuilder, split: str, tokenizer: Tokenizer,
               image_size: tuple[int, int], resize: str = "bicubic") -> Split:
  """Reads a prepared split's captions and ids, and tokenizes every caption once."""
  if resize not in RESIZE_FILTERS:
    raise errors.ConfigError(f"data.resize must be one of {sorted(RESIZE_FILTERS)}, got {resize!r}")
  if split not in builder.info.splits:
    raise errors.ConfigError(f"split '{split}' not in {builder.info.full_name}; it has {sorted(builder.info.splits)}")
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  pair_record, captions, paths, pids = [], [], [], []
  for start in range(0, len(source), _READ_CHUNK):
    for r, ex in enumerate(source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source))))), start):
      path = ex["path"].decode()
      caps = [c.decode() for c in ex["captions"]]
      if not caps:
        raise errors.BadInputError(f"{split} record {r} ({path}): no captions")
      for j, c in enumerate(caps):
        if not c.strip():
          raise errors.BadInputError(f"{split} record {r} ({path}): caption {j} is empty")
      paths.append(path)
      pids.append(int(ex["person_id"]))
      pair_record.extend([r] * len(caps))
      captions.extend(caps)
  if not paths:
    raise errors.BadInputError(f"split '{split}' of {builder.info.full_name} is empty")
  return Split(
      name=split,
      source=source,
      source_records=np.arange(len(paths), dtype=np.int64),
      image_size=tuple(image_size),
      pair_record=np.asarray(pair_record, np.int64),
      pair_caption=captions,
      tokens=tokenizer.encode(captions, f"{builder.info.full_name} split '{split}'"),
      image_paths=paths,
      person_ids=np.asarray(pids, np.int64),
      resize=resize,
      source_split=split,
  )


@dataclasses.dataclass(frozen=True)
class EpochOrder:
  """Which pair sits at row `row` of the global batch of step `step`."""

  num_pairs: int
  global_batch: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return self.num_pairs // self.global_batch

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

  def pair(self, step: int, row: int) -> int:
    epoch, within = divmod(step, self.steps_per_epoch)
    return int(self.permutation(epoch)[within * self.global_batch + row])


def train_batches(split: Split, order: EpochOrder, *, start_step: int, end_step: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 4,
                  prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of the global batches of steps [start_step, end_step).

  Yields dicts: `image` uint8 [b, H, W, 3], `tokens` int32 [b, L], `index` int32 [b] (the
  pair index, i.e. memory-bank row), with b = global_batch / process_count.
  """
  if order.global_batch % process_count:
    raise errors.ConfigError(f"train.batch_size={order.global_batch} is not divisible by {process_count} processes")
  local = order.global_batch // process_count

  def pair_of(example: int) -> int:
    step, row = divmod(example, local)
    return order.pair(step, process_index * local + row)

  def load(pair: int) -> dict[str, np.ndarray]:
    return {"image": split.load_image(split.pair_record[pair]), "tokens": split.tokens[pair],
            "index": np.int32(pair)}

  ds = (grain.MapDataset.range(start_step * local, end_step * local)
        .map(pair_of).map(load).batch(local, drop_remainder=True))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def _padded_rows(total: int, global_batch: int, process_index: int, process_count: int) -> list[np.ndarray]:
  """Row indices this process loads for each padded global batch; padding rows are -1."""
  local = global_batch // process_count
  num_batches = -(-total // global_batch)
  rows = np.arange(num_batches * global_batch).reshape(num_batches, process_count, local)[:, process_index]
  return [np.where(r < total, r, -1) for r in rows]


def eval_image_batches(split: Split, global_batch: int, process_index: int = 0, process_count: int = 1,
                       num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Every image of the split once, in record order, in padded global batches.

  Yields `image` uint8 [b, H, W, 3] and `valid` bool [b] (False on padding rows).
  """
  blank = np.zeros((*split.image_size, 3), np.uint8)

  def load(row: int) -> dict[str, np.ndarray]:
    return {"image": split.load_image(row) if row >= 0 else blank, "valid": np.bool_(row >= 0)}

  rows = np.concatenate(_padded_rows(split.num_images, global_batch, process_index, process_count))
  ds = grain.MapDataset.source(rows).map(load).batch(global_batch // process_count)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)))


def row_batches(values: np.ndarray, key: str, global_batch: int, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every row of `values` [N, ...] once, in order, in padded global batches: `key` [b, ...] and
  `valid` bool [b] (captions' tokens, free-text queries, a user's decoded images)."""
  for rows in _padded_rows(len(values), global_batch, process_index, process_count):
    yield {key: values[np.maximum(rows, 0)], "valid": rows >= 0}
