"""Model shape presets for `config.model`."""

import ml_collections


def _model(embed_dim: int, vision: dict, text: dict) -> ml_collections.ConfigDict:
  """`init_from`: a CLIP checkpoint (`checkpoint_io`) or a dgia-jax training workdir (its latest
  checkpoint, and its tokenizer unless `data.tokenizer` is set) to start from ("" = random init);
  `init_config`: with a workdir `init_from`, the config file that trains it, run first when that
  run has no results yet (a pre-training stage, kept and reused);
  `init_cache_dir`: where its converted parameters are cached ("" = ~/.cache/dgia_jax/converted);
  `remat`: recompute each residual block in the backward pass instead of keeping its activations
  (jax.checkpoint's default policy: only the block's input is saved; `clip.CLIPConfig.remat`);
  `attention`: "xla", or "cudnn" for cuDNN's fused attention on GPUs (needs dtype bfloat16)."""
  return ml_collections.ConfigDict(dict(
      embed_dim=embed_dim, vision=vision, text=text, activation="quick_gelu", dtype="float32", remat=False,
      attention="xla", init_from="", init_config="", init_cache_dir=""))


def vit_b16() -> ml_collections.ConfigDict:
  """OpenAI CLIP ViT-B/16: 12×768 image tower (patch 16), 12×512 text tower (8 heads), D = 512."""
  return _model(512, dict(patch_size=16, width=768, layers=12, heads=12), dict(width=512, layers=12, heads=8))


def small() -> ml_collections.ConfigDict:
  """A CPU-sized two-tower: 4×128 image tower (patch 8), 4×128 text tower, D = 128."""
  return _model(128, dict(patch_size=8, width=128, layers=4, heads=4), dict(width=128, layers=4, heads=4))
