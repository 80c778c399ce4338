"""Stand-in for CLIP pre-training on the embedded synthetic set: ITC only, from scratch.

The method fine-tunes a pretrained CLIP whose feature space already relates pictures and
descriptions of one person; its relation thresholds presume that. On CPU we emulate it: this
run learns image–text matching on the default synthetic set (500 identities × 4 views), and
`configs/synthetic_finetune.py` starts every ablation row from its weights, on a disjoint set
of identities.

  python -m dgia_jax.main --config configs/synthetic_pretrain.py --workdir runs/synthetic_pretrain
"""

import os

from dgia_jax import cli


def get_config():
  c = cli.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  c.name = "synthetic_pretrain"
  c.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  return c
