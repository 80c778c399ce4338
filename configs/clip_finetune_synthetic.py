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

from dgia_jax import cli
from dgia_jax.models import presets


def get_config():
  c = cli.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  c.name = "clip_finetune_synthetic"
  c.data.image_size = (384, 128)
  c.data.context_length = 77  # CLIP's
  c.model = presets.vit_b16()
  c.model.init_from = ""  # required: --config.model.init_from=/path/to/clip
  # METHOD.md's schedule for pretrained CLIP: Adam at 1e-5, 5 warm-up epochs from 1e-6,
  # cosine, 40 epochs, batch 64; relations from epoch 1 and the global loss from epoch 2
  # (a pretrained feature space is spread out from the start); padding 10 at 384×128.
  c.train.update(dict(lr=1e-5, warmup_epochs=5.0, warmup_factor=0.1, epochs=40, batch_size=64))
  c.relations.start_epoch, c.gsrc.start_epoch = 1, 2
  c.relations.image_threshold = c.relations.text_threshold = 0.7  # the paper's, for a pretrained space
  c.iasc.pad = 10
  return c
