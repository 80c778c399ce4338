"""Loading a full-size CLIP ViT-B/16 checkpoint: parity with transformers, and the cache.

Writes a randomly initialised `transformers.CLIPModel` with OpenAI ViT-B/16 shapes (biases
and LayerNorms perturbed too) as a Hugging Face folder, loads it with
`checkpoint_io.load_clip`, and measures in the same process:

- max abs error of our image/text features against `get_image_features` /
  `get_text_features` (PyTorch, CPU, fp32) at 224×224, and at 384×128 with the 14×14 grid
  resized to 24×8 (the reference gets the same bilinear resize from torch);
- bfloat16 compute against float32 (L2-normalised features: max abs error, min cosine);
- seconds to convert (hash, read, map, write the cache) and to load from the cache.

Prints one JSON line.

  python -m benchmarks.clip_checkpoint [--batch 2]
"""

import argparse
import json
import tempfile
import time

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util

from dgia_jax.common import host_memory
from dgia_jax.models import checkpoint_io, clip, presets

VOCAB, EOT, CONTEXT = 49408, 49407, 77


def reference_model() -> transformers.CLIPModel:
  p = presets.vit_b16()
  v, t = p.vision, p.text
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=t.width, intermediate_size=4 * t.width,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=CONTEXT,
                       hidden_act="quick_gelu", bos_token_id=EOT - 1, eos_token_id=EOT, pad_token_id=EOT),
      vision_config=dict(hidden_size=v.width, intermediate_size=4 * v.width, num_hidden_layers=v.layers,
                         num_attention_heads=v.heads, image_size=224, patch_size=v.patch_size, hidden_act="quick_gelu"),
      projection_dim=p.embed_dim)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # biases start at 0 and LayerNorm scales at 1: move them
        p.add_(0.05 * torch.randn_like(p))
  return model


def model_config(image_size, dtype="float32") -> clip.CLIPConfig:
  p = presets.vit_b16()
  p.dtype = dtype
  return clip.config_from_dict(p, image_size, VOCAB + 1, EOT, CONTEXT)  # + the appended mask token


def ours(cfg, params, images, tokens):
  model = clip.CLIP(cfg)
  img = model.apply({"params": params}, jnp.asarray(images), method=lambda m, x: m.visual(x))
  txt = model.apply({"params": params}, jnp.asarray(tokens), method=lambda m, t: m.text(t))
  return np.asarray(img, np.float32), np.asarray(txt, np.float32)


def reference(model, images, tokens, interpolate=False):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                                   interpolate_pos_encoding=interpolate).pooler_output
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output
  return img.numpy(), txt.numpy()


def max_err(a, b) -> float:
  return float(np.abs(a - b).max())


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  tokens = np.zeros((args.batch, CONTEXT), np.int32)
  for i in range(args.batch):
    n = int(rng.integers(5, CONTEXT - 2))
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = EOT - 1, rng.integers(1, EOT - 1, n), EOT
  out = {"batch": args.batch}
  model = reference_model()
  with tempfile.TemporaryDirectory() as tmp:
    folder, cache = f"{tmp}/clip", f"{tmp}/cache"
    model.save_pretrained(folder)
    cfg = model_config((224, 224))
    t = time.perf_counter()
    params = checkpoint_io.load_clip(folder, cfg, appended_tokens=1, cache_dir=cache)[0]
    out["convert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cached = checkpoint_io.load_clip(folder, cfg, appended_tokens=1, cache_dir=cache)[0]
    out["cached_load_s"] = time.perf_counter() - t
    out["cache_speedup"] = out["convert_s"] / out["cached_load_s"]
    flat_cached = traverse_util.flatten_dict(cached)
    out["cache_identical"] = all(np.array_equal(v, flat_cached[k]) for k, v in traverse_util.flatten_dict(params).items())

    images = rng.normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
    ref = reference(model, images, tokens)
    fp32 = ours(cfg, params, images, tokens)
    out["fp32_224_image_max_abs_err"], out["fp32_224_text_max_abs_err"] = map(max_err, fp32, ref)
    out["feature_max_abs"] = float(max(np.abs(r).max() for r in ref))

    normalised = [clip.CLIP(model_config((224, 224), d)).apply({"params": params}, jnp.asarray(images),
                                                               jnp.asarray(tokens)) for d in ("float32", "bfloat16")]
    for name, a, b in zip(("image", "text"), *normalised):
      out[f"bf16_{name}_max_abs_err"] = float(jnp.abs(a - b).max())
      out[f"bf16_{name}_min_cosine"] = float(jnp.min(jnp.sum(a * b, axis=-1)))

    wide = model_config((384, 128))
    params = checkpoint_io.load_clip(folder, wide, appended_tokens=1, cache_dir=cache)[0]
    emb = model.vision_model.embeddings
    pos = emb.position_embedding.weight.detach()
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(24, 8), mode="bilinear", align_corners=False)
    resized = torch.cat([pos[:1], resized.permute(0, 2, 3, 1).reshape(24 * 8, -1)])[None]
    emb.interpolate_pos_encoding = lambda embeddings, height, width: resized
    images = rng.normal(size=(args.batch, 384, 128, 3)).astype(np.float32)
    out["fp32_384x128_image_max_abs_err"] = max_err(ours(wide, params, images, tokens)[0],
                                                    reference(model, images, tokens, interpolate=True)[0])
  print(json.dumps(out))


if __name__ == "__main__":
  main()
