"""Opens the data set a config names: builder, tokenizer and splits."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data_prep import benchmarks, captioned_crops, synthetic_persons
from dgia_jax.common import errors
from dgia_jax.data.pipeline import Split, hold_out_identities, open_split
from dgia_jax.data.tokenizer import Tokenizer, train_bpe

SYNTHETIC_TOKENIZER_FILE = "tokenizer.json"  # beside the synthetic set's data


def _synthetic_builder(data_cfg) -> tfds.core.DatasetBuilder:
  cfg = synthetic_persons.SyntheticPersonsConfig.from_sizes(image_size=tuple(data_cfg.image_size),
                                                            **data_cfg.synthetic.to_dict())
  return synthetic_persons.SyntheticPersons(config=cfg, data_dir=data_cfg.data_dir, file_format="array_record")


def _prepare_synthetic(builder, data_cfg) -> None:
  del data_cfg
  os.makedirs(builder.data_dir_root, exist_ok=True)
  builder.download_and_prepare()


def _benchmark_builder(data_cfg) -> tfds.core.DatasetBuilder:
  return benchmarks.make_builder(data_cfg.name, data_cfg.data_dir, strict=data_cfg.strict,
                                 allow_outside=data_cfg.get("allow_paths_outside", False))


def _prepare_benchmark(builder, data_cfg) -> None:
  benchmarks.prepare(builder, data_cfg.manual_dir)


def _captioned_crops_builder(data_cfg) -> tfds.core.DatasetBuilder:
  return captioned_crops.make_builder(data_cfg.get("manual_dir", ""), data_cfg.data_dir, strict=data_cfg.get("strict", True),
                                      allow_outside=data_cfg.get("allow_paths_outside", False))


def _prepare_captioned_crops(builder, data_cfg) -> None:
  del data_cfg
  captioned_crops.prepare(builder)


# config.data.name -> (builder of config.data, how to prepare it).
_REGISTRY = {"synthetic_persons": (_synthetic_builder, _prepare_synthetic),
             **{name: (_benchmark_builder, _prepare_benchmark) for name in benchmarks.BUILDERS},
             "captioned_crops": (_captioned_crops_builder, _prepare_captioned_crops)}


def _make_builder(data_cfg) -> tfds.core.DatasetBuilder:
  if data_cfg.name not in _REGISTRY:
    raise errors.ConfigError(f"unknown data set data.name='{data_cfg.name}'; known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[data_cfg.name][0](data_cfg)


def check_prepared(data_cfg, builder: tfds.core.DatasetBuilder | None = None) -> None:
  """Raises MissingPathError naming `data.data_dir` if `config.data` is not prepared; writes nothing."""
  builder = builder or _make_builder(data_cfg)
  if not builder.is_prepared():
    raise errors.MissingPathError(f"data set {builder.info.full_name} is not prepared under {data_cfg.data_dir}; "
                                  "run with --config.data.prepare=True")


def get_builder(data_cfg, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `config.data`, prepared if `prepare` and missing."""
  builder = _make_builder(data_cfg)
  if not prepare:
    check_prepared(data_cfg, builder)
  elif not builder.is_prepared():
    _REGISTRY[data_cfg.name][1](builder, data_cfg)
  if data_cfg.name == "synthetic_persons":
    _train_synthetic_tokenizer(builder)
  return builder


def _train_synthetic_tokenizer(builder: synthetic_persons.SyntheticPersons) -> None:
  """A BPE tokenizer trained on the synthetic set's train captions, saved beside the data (once)."""
  path = os.path.join(builder.data_dir, SYNTHETIC_TOKENIZER_FILE)
  if os.path.exists(path):
    return
  source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  texts = [c.decode() for i in range(len(source)) for c in source[i]["captions"]]
  tmp = path + ".tmp"
  train_bpe(texts, builder.builder_config.tokenizer_vocab_size).save(tmp)
  os.replace(tmp, path)


def tokenizer_path(data_cfg, builder: tfds.core.DatasetBuilder | None = None) -> str:
  """`config.data.tokenizer` if set, else (synthetic set only) the tokenizer saved beside the data
  (`builder`'s, or the prepared set's). A set tokenizer needs no prepared data set."""
  if data_cfg.tokenizer:
    return data_cfg.tokenizer
  if data_cfg.name != "synthetic_persons":
    raise errors.ConfigError(f"data set '{data_cfg.name}' needs data.tokenizer: the CLIP checkpoint folder "
                     "(tokenizer.json, or vocab.json + merges.txt)")
  builder = builder or get_builder(data_cfg, prepare=False)
  return os.path.join(builder.data_dir, SYNTHETIC_TOKENIZER_FILE)


def get_tokenizer(data_cfg, builder: tfds.core.DatasetBuilder | None = None) -> Tokenizer:
  """The tokenizer `config.data` names, with its text pipeline (`data.text_pipeline`)."""
  return Tokenizer.from_file(tokenizer_path(data_cfg, builder), data_cfg.context_length,
                             data_cfg.get("text_pipeline", "hf"))


def cross_domain(data_cfg, name: str, manual_dir: str, tokenizer: str):
  """A trained run's `config.data` pointed at benchmark `name` (its original folder `manual_dir`),
  read with the run's `tokenizer`, image size and context length: cross-domain evaluation.

  The benchmark's own splits are read (no identities held out); it is built into the run's
  `data_dir` on first use.
  """
  if name not in benchmarks.BUILDERS:
    raise errors.ConfigError(f"cross-domain evaluation reads a benchmark ({', '.join(sorted(benchmarks.BUILDERS))}), "
                     f"got '{name}'")
  cfg = data_cfg.copy_and_resolve_references()
  cfg.unlock()  # a run's saved config comes locked
  if "synthetic" in cfg:
    del cfg["synthetic"]
  cfg.update(dict(name=name, manual_dir=manual_dir, tokenizer=tokenizer, holdout_val_ids=0,
                  strict=data_cfg.get("strict", True)))
  return cfg


def image_source(data_cfg, split: str):
  """Split `split` of the prepared data set `config.data` names, as a random-access TFDS source of
  undecoded examples (`source[i]["image"]`: the file's bytes; `["path"]`): images only, no caption
  read or tokenized (what a search service or report serves)."""
  builder = get_builder(data_cfg, prepare=False)
  if split not in builder.info.splits:
    raise errors.BadInputError(f"split '{split}' is not in {builder.info.full_name} under {data_cfg.data_dir}")
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def load(data_cfg, splits: tuple[str, ...]) -> tuple[Tokenizer, dict[str, Split]]:
  """Tokenizer and the named splits of the configured data set.

  With `data.holdout_val_ids = K > 0`, the split named `data.val_split` is not read from the
  data set: it is K identities held out of `data.train_split` (which loses them).
  """
  if data_cfg.name != "synthetic_persons":
    tokenizer_path(data_cfg)  # a missing data.tokenizer is named before any data set is built
  builder = get_builder(data_cfg, prepare=data_cfg.prepare)
  tokenizer = get_tokenizer(data_cfg, builder)
  holdout = data_cfg.holdout_val_ids and data_cfg.val_split in splits
  wanted = dict.fromkeys((*splits, data_cfg.train_split) if holdout else splits)
  resize = data_cfg.get("resize", "bicubic")  # runs saved before the option resized bicubic
  opened = {s: open_split(builder, s, tokenizer, tuple(data_cfg.image_size), resize)
            for s in wanted if not (holdout and s == data_cfg.val_split)}
  if holdout:
    opened[data_cfg.train_split], opened[data_cfg.val_split] = hold_out_identities(
        opened[data_cfg.train_split], data_cfg.holdout_val_ids, data_cfg.holdout_seed, data_cfg.val_split)
  return tokenizer, {s: opened[s] for s in splits}
