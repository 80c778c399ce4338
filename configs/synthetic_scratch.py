"""The full method trained from scratch on the embedded synthetic set: the main job before it had a
pre-training stage, kept to reproduce docs/RESULTS.md's from-scratch study and as the tests' base.

Without a pretrained feature space the agreement relations start late and strict (epoch 7,
thresholds 0.8); measured, they still help less than on a pre-trained model (docs/RESULTS.md).

  python -m dgia_jax.main --config configs/synthetic_scratch.py --workdir runs/synthetic_scratch
"""

import os

from dgia_jax.common import config_files

base = config_files.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base.synthetic_persons(base.get_config())
  c.name = "synthetic_scratch"
  return c
