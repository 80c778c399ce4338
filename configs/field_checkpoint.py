"""The model of the field's released checkpoints (IRRA's and DGCMIA's `best.pth`): CLIP ViT-B/16 at
384×128 with its trained 24×8 position grid, 77 tokens, the field's text pipeline (ftfy, the mask
token at id 49405: `data.text_pipeline="irra"`), images resized bilinearly — configs/cuhk_pedes.py's
model and input. Programs read a released checkpoint with it, no dgia-jax run needed:

  python -m dgia_jax.tools.evaluate --checkpoint /path/best.pth --dataset cuhk_pedes --manual_dir /path/CUHK-PEDES \\
      --config.data.tokenizer=/path/to/bpe_simple_vocab_16e6.txt.gz
  python -m dgia_jax.tools.export --checkpoint /path/best.pth --images /path/to/crops --out emb/ \\
      --config.data.tokenizer=/path/to/clip-vit-base-patch16

`data.tokenizer` is CLIP's BPE: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the field's code ships it in
its `data/`) or a Hugging Face CLIP folder (`merges.txt` or `tokenizer.json`). A checkpoint whose shapes
differ (another grid, width or depth) is refused, naming each disagreement and its flag.
"""

import os

from dgia_jax.common import config_files


def get_config():
  c = config_files.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuhk_pedes.py"))
  c.name = "field_checkpoint"
  return c
