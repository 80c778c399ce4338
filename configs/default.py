"""The main job: the method fine-tuning a pretrained two-tower, as the paper fine-tunes CLIP, on CPU.

  python -m dgia_jax.main --config configs/default.py --workdir runs/default

Stage 1 (`model.init_config`, kept and reused when `runs/synthetic_pretrain` has finished):
ITC-only pre-training on the default synthetic set (`configs/synthetic_pretrain.py`), the
stand-in for CLIP's pre-training. Stage 2 (this config): the full method — in-batch relations
(LRC), the consistency of information-asymmetric pairs (IASC-CL) and global relations (GSRC-FR) —
on a disjoint synthetic build (seed 1: 120 identities × 10 views, none of them seen in stage 1),
whose tokenizer and model come from stage 1. The ablation study (`docs/RESULTS.md`) varies this
config's switches.

Where the authors' code differs (docs/REPRODUCING.md), this config keeps our settings: measured on
it over 3 seeds, none of the code's switches gained beyond the seed spread, and its recipe lost
2.4 R1 / 2.6 mAP, mostly through the relation SDM's ε 1e-6 (−3.9 R1; docs/RESULTS.md).
"""

import os

from dgia_jax.common import config_files

_HERE = os.path.dirname(os.path.abspath(__file__))
base = config_files.load_config_module(os.path.join(_HERE, "base.py"))


def get_config():
  c = base.synthetic_persons(base.get_config(), num_ids=(120, 50, 100), views_per_id=10, seed=1)
  c.name = "default"
  c.model.init_from = "runs/synthetic_pretrain"
  c.model.init_config = os.path.join(_HERE, "synthetic_pretrain.py")
  # The paper's fine-tuning shape at CPU scale: relations from the first epoch with its thresholds,
  # the global loss from the second, a short schedule at a lower rate than training from scratch.
  c.relations.start_epoch, c.gsrc.start_epoch = 1, 2
  c.relations.image_threshold = c.relations.text_threshold = 0.7
  c.train.update(dict(epochs=5, lr=1e-4, warmup_epochs=0.5))
  return c
