"""Stage 1 of the main job: a stand-in for CLIP pre-training on the embedded synthetic set, ITC only,
from scratch.

The method fine-tunes a pretrained CLIP whose feature space already relates pictures and
descriptions of one person; its relation thresholds presume that. On CPU we emulate it: this
run learns image–text matching on the default synthetic set (500 identities × 4 views), and
`configs/default.py` (stage 2) fine-tunes its weights with the full method on a disjoint set of
identities. `make train` runs it first when `runs/synthetic_pretrain` holds no finished run.

  python -m dgia_jax.main --config configs/synthetic_pretrain.py --workdir runs/synthetic_pretrain
"""

import os

from dgia_jax.common import config_files

base = config_files.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base.synthetic_persons(base.get_config())
  c.name = "synthetic_pretrain"
  c.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  return c
