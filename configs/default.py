"""Default experiment: CPU-sized CLIP trained from scratch on the embedded synthetic set.

  python -m dgia_jax.main --config configs/default.py --workdir runs/default
"""

import os

import ml_collections

from dgia_jax import cli

base = cli.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = "default"
  c.data.name = "synthetic_persons"
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_ids=(500, 50, 100), views_per_id=4, captions_per_image=2, sibling_prob=0.5, mention_prob=0.6,
      seed=0, tokenizer_vocab_size=600))
  return c
