"""Builds a benchmark from its original files, or a collection of captioned crops (no ids, no splits:
a manifest folder or archive, or WebDataset shards), and prints its images, captions and ids per split.

  python -m dgia_jax.tools.prepare --dataset cuhk_pedes --manual_dir /path/CUHK-PEDES --data_dir data/tfds
  python -m dgia_jax.tools.prepare --dataset captioned_crops --manual_dir /path/to/shards --data_dir data/tfds

`--nostrict` skips bad records (counted, and listed in `<data_dir>/<dataset>_problems.jsonl`)
instead of failing on them. A data set already built under `--data_dir` is only summarised.
Either way a split that differs from the published statistics is named in a warning.
"""

from absl import flags

from data_prep import benchmarks, captioned_crops
from dgia_jax import cli

CROPS = "captioned_crops"
_DATASET = flags.DEFINE_enum("dataset", None, sorted(benchmarks.BUILDERS) + [CROPS], "Data set to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "A benchmark's original folder (annotation JSON and imgs/), or "
                                  "the captioned crops' manifest folder, archive or shards.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir to build into.")
_STRICT = flags.DEFINE_bool("strict", True, "Fail on any bad record (else skip bad records and list them).")
_ALLOW_OUTSIDE = flags.DEFINE_bool("allow_paths_outside", False, "Let image paths leave imgs/ (absolute paths, '..', "
                                   "links out of it); by default such a record is bad.")
flags.mark_flags_as_required(["dataset"])


def summary_table(summary: dict[str, dict[str, int]], with_ids: bool = True) -> str:
  """One row per split: `split images captions ids` (ids "none" for a collection without them)."""
  columns = ("images", "captions", "ids")
  lines = [f"{'split':<8}" + "".join(f"{c:>10}" for c in columns)]
  lines += [f"{split:<8}" + "".join(f"{s[c] if with_ids or c != 'ids' else 'none':>10}" for c in columns)
            for split, s in summary.items()]
  return "\n".join(lines)


def main(argv):
  cli.start(argv)
  crops = _DATASET.value == CROPS
  if crops:
    builder = captioned_crops.make_builder(_MANUAL_DIR.value or "", _DATA_DIR.value, strict=_STRICT.value,
                                           allow_outside=_ALLOW_OUTSIDE.value)
  else:
    builder = benchmarks.make_builder(_DATASET.value, _DATA_DIR.value, strict=_STRICT.value,
                                      allow_outside=_ALLOW_OUTSIDE.value)
  built_now = not builder.is_prepared()
  if built_now and crops:
    captioned_crops.prepare(builder)
  elif built_now:
    benchmarks.prepare(builder, _MANUAL_DIR.value)  # warns of differences to the published statistics
  summary = benchmarks.split_summary(builder)
  print(f"{builder.info.full_name} in {builder.data_dir}")
  print(summary_table(summary, with_ids=not crops))
  if not built_now and not crops:
    for warning in benchmarks.published_differences(builder.LAYOUT, builder.name, summary):
      print(f"warning: {warning}")


if __name__ == "__main__":
  cli.run(main)
