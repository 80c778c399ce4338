"""Exports embeddings for search (layout: `dgia_jax.gallery`): a split of the run's data set, or a
folder of your own images.

  python -m dgia_jax.tools.export --workdir runs/default --split test --out emb/ \
      [--step N | --best] [--shard_rows 65536] [--format safetensors]
  python -m dgia_jax.tools.export --workdir runs/default --images /path/to/crops --out emb_mine/

`--images` embeds every JPEG, PNG and WebP file under the folder (recursively, sorted paths)
with the run's eval transforms; files it cannot read are listed and counted. Run again after the
folder changed and only new or changed files are embedded.
"""

from absl import flags
from ml_collections import config_flags

from dgia_jax import cli
from dgia_jax.gallery import exports

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Instead of --workdir: a field checkpoint (IRRA's or DGCMIA's "
                                  "best.pth).")
_CONFIG = config_flags.DEFINE_config_file("config", cli.FIELD_CHECKPOINT_CONFIG, "With --checkpoint: the config "
                                          "describing its model, input and tokenizer (data.tokenizer: CLIP's BPE).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the run's data set to embed (unless --images).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of your own images to embed instead of a split.")
_OUT = flags.DEFINE_string("out", None, "Directory the embeddings and their index are written to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
_BEST = flags.DEFINE_bool("best", False, "Embed with the best-on-validation parameters the run kept (workdir/best).")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65536, "Rows per embedding shard.", lower_bound=1)
_FORMAT = flags.DEFINE_enum("format", "npy", exports.FORMATS, "File format of the shards.")
flags.mark_flags_as_required(["out"])


def main(argv):
  cli.start(argv)
  model = cli.model_of_flags(_WORKDIR.value, _CHECKPOINT.value, _CONFIG.value)
  if _IMAGES.value:
    m = exports.export_images(model, _IMAGES.value, _OUT.value, _STEP.value, _SHARD_ROWS.value,
                              _FORMAT.value, _BEST.value)
    what = (f"{m['counts']['images']} images of {m['images_dir']} ({m['embedded']} embedded now, {m['reused']} "
            f"unchanged since the last export)")
  else:
    m = exports.export_split(model, _SPLIT.value, _OUT.value, _STEP.value, _SHARD_ROWS.value,
                             _FORMAT.value, _BEST.value)
    what = f"{m['counts']['images']} images and {m['counts']['texts']} captions of split '{m['split']}'"
  shards = len(m["shards"]["images"]) + len(m["shards"]["texts"])
  print(f"exported {what} (step {m['step']}{', best on validation' if m['best'] else ''}, dim {m['dim']}) to "
        f"{_OUT.value}: {shards} {m['format']} shards")
  for item in m.get("unreadable", []):
    print(f"unreadable, not exported: {item['path']}: {item['error']}")
  if m.get("unreadable"):
    print(f"{len(m['unreadable'])} files could not be read (listed in {_OUT.value}/manifest.json)")


if __name__ == "__main__":
  cli.run(main)
