"""Exports a trained run's image and caption embeddings of one split (layout: `dgia_jax.gallery`).

  python -m dgia_jax.tools.export --workdir runs/default --split test --out emb/ \
      [--step N | --best] [--shard_rows 65536] [--format safetensors]
"""

from absl import flags

from dgia_jax import cli, gallery

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the run's data set to embed.")
_OUT = flags.DEFINE_string("out", None, "Directory the embeddings and their index are written to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Embed with the best-on-validation parameters the run kept (workdir/best).")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65536, "Rows per embedding shard.")
_FORMAT = flags.DEFINE_enum("format", "npy", gallery.FORMATS, "File format of the shards.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  cli.start(argv)
  m = gallery.export_split(_WORKDIR.value, _SPLIT.value, _OUT.value, _STEP.value, _SHARD_ROWS.value,
                           _FORMAT.value, _BEST.value)
  shards = len(m["shards"]["images"]) + len(m["shards"]["texts"])
  print(f"exported {m['counts']['images']} images and {m['counts']['texts']} captions of split '{m['split']}' "
        f"(step {m['step']}{', best on validation' if m['best'] else ''}, dim {m['dim']}) to {_OUT.value}: "
        f"{shards} {m['format']} shards")


if __name__ == "__main__":
  cli.run(main, user_errors=(FileNotFoundError, ValueError))
