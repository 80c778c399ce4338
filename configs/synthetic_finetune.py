"""The method fine-tuned from the synthetic pre-training run, as the paper fine-tunes CLIP.

Every row of the ablation (`docs/RESULTS.md`) uses this config:

  python -m dgia_jax.main --config configs/synthetic_pretrain.py --workdir runs/synthetic_pretrain
  python -m dgia_jax.tools.ablate --config configs/synthetic_finetune.py --workdir runs/ablation --seeds 3

The target set is a different synthetic build (seed 1: identities disjoint from the
pre-training set's) with fewer identities and more views each, so that a batch row has
same-person partners to find; the model and tokenizer come from the pre-training run.
"""

import os

from dgia_jax import cli


def get_config():
  c = cli.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  c.name = "synthetic_finetune"
  c.data.synthetic.update(dict(num_ids=(120, 50, 100), views_per_id=10, seed=1))
  c.model.init_from = "runs/synthetic_pretrain"
  # The paper's fine-tuning shape at CPU scale: relations from the first epoch, the global
  # loss from the second, a short schedule at a lower rate than training from scratch.
  c.relations.start_epoch, c.gsrc.start_epoch = 1, 2
  c.relations.image_threshold = c.relations.text_threshold = 0.7
  c.train.update(dict(epochs=5, lr=1e-4, warmup_epochs=0.5))
  return c
