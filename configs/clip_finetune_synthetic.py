"""Fine-tune OpenAI CLIP ViT-B/16 on the embedded synthetic set at the field's 384×128 input.

The checkpoint and its tokenizer come from a local folder (nothing is downloaded):

  python -m dgia_jax.main --config configs/clip_finetune_synthetic.py --workdir runs/clip_synth \\
      --config.model.init_from=/path/to/clip-vit-base-patch16 \\
      --config.data.tokenizer=/path/to/clip-vit-base-patch16

`init_from` may also be OpenAI's `ViT-B-16.pt` (then `data.tokenizer` names a folder with
CLIP's `tokenizer.json` or `vocab.json` + `merges.txt`). The 14×14 position grid is resized
to 24×8 at load time; the tokenizer appends a mask token, so the text tower has 49,409
token rows (`dgia_jax/models/checkpoint_io.py`). On an accelerator add
`--config.model.dtype=bfloat16` (float32 parameters, bfloat16 activations).
"""

import os

from dgia_jax.common import config_files

base = config_files.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base.clip_vit_b16(base.synthetic_persons(base.get_config()))
  c.name = "clip_finetune_synthetic"
  return c
