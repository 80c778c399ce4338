"""Evaluating a field checkpoint at CUHK-PEDES test size: ours against PyTorch, in one process.

A random CLIP ViT-B/16 written as the field's `best.pth` (float16 towers, the trained 24×8 grid),
3,074 images at 384×128 (synthetic pixels) and 6,156 captions (the field's text pipeline) of 1,000
identities, every caption a query over every image (text→image):

- ours: the checkpoint read (`rebuild.load_field_checkpoint`), images and captions encoded with the
  jitted towers in batches of `--batch`, Rank-1/5/10, mAP and mINP by `metrics.retrieval_metrics`;
- reference: the same weights in `transformers.CLIPModel` (PyTorch, float32, `torch.no_grad`, the
  trained grid added as the field's ViT adds it), normalised features, the similarity matrix, and
  IRRA's ranking (a whole-row argsort, cumulative matches, mAP, mINP), as its `Evaluator` does.

Both run in this process, ours first, each timed from the checkpoint file to the figures (ours'
compilation included). Prints one JSON line: seconds of each and their ratio, the largest feature and
figure differences. `--scale` runs a fraction of the sizes (a quick check; the figures in
docs/BENCHMARKS.md are at scale 1).

  python -m benchmarks.field_checkpoint [--scale 1.0] [--batch 64]
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time

import numpy as np
import torch
import transformers

from benchmarks.eval_metrics import argsort_reference
from dgia_jax.common import config_files, host_memory, parallel
from dgia_jax.data import field_text
from dgia_jax.evaluation import metrics
from dgia_jax.inference import encoding, rebuild
from dgia_jax.models import checkpoint_io

IDS, IMAGES, CAPTIONS, HEIGHT, WIDTH = 1000, 3074, 6156, 384, 128
_FP16 = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
         "c_fc.bias", "c_proj.weight", "c_proj.bias")


def random_field_checkpoint(path: str) -> transformers.CLIPModel:
  """A random ViT-B/16 at 384×128 written as the field's best.pth; returns the PyTorch model holding
  the same (float16-rounded) weights, its position table set aside for `reference_image_features`."""
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=512, intermediate_size=2048,
                       num_attention_heads=8, num_hidden_layers=12, hidden_act="quick_gelu", eos_token_id=49407),
      vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12, hidden_act="quick_gelu"), projection_dim=512)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # the values the field stores in float16 (`convert_weights`), on both sides
    for name, p in model.named_parameters():
      if any(part in name for part in ("_proj.", "fc1.", "fc2.", "patch_embedding", "projection")):
        p.copy_(p.half().float())
  state = {}
  sd = model.state_dict()
  for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
    for i in range(12):
      h, o = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
      for part in ("weight", "bias"):
        state[f"{o}attn.in_proj_{part}"] = torch.cat([sd[f"{h}self_attn.{n}_proj.{part}"] for n in "qkv"])
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
          state[f"{o}{ours}.{part}"] = sd[f"{h}{theirs}.{part}"]
  for part in ("weight", "bias"):
    state[f"visual.ln_pre.{part}"] = sd[f"vision_model.pre_layrnorm.{part}"]
    state[f"visual.ln_post.{part}"] = sd[f"vision_model.post_layernorm.{part}"]
    state[f"ln_final.{part}"] = sd[f"text_model.final_layer_norm.{part}"]
  state["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
  state["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
  state["visual.positional_embedding"] = torch.randn(1 + (HEIGHT // 16) * (WIDTH // 16), 768) * 0.02
  state["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
  state["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  state["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  state["text_projection"] = sd["text_projection.weight"].T.contiguous()
  for name in state:
    if name.endswith(_FP16) or name in ("text_projection", "visual.proj"):
      state[name] = state[name].half()
  torch.save({"model": {checkpoint_io.FIELD_PREFIX + k: v for k, v in state.items()}, "epoch": 1}, path)
  model.field_positions = state["visual.positional_embedding"].float()
  return model


def reference_image_features(model: transformers.CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
  """The field's ViT on [B, 3, 384, 128]: patches, class token, the trained grid, transformers' layers."""
  vm = model.vision_model
  patches = vm.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
  x = torch.cat([vm.embeddings.class_embedding.expand(len(pixels), 1, -1), patches], 1) + model.field_positions[None]
  x = vm.encoder(inputs_embeds=vm.pre_layrnorm(x)).last_hidden_state
  return model.visual_projection(vm.post_layernorm(x[:, 0]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  host_memory.retain_freed_memory()
  spec = importlib.util.find_spec("clip")
  bpe = os.path.join(spec.submodule_search_locations[0], field_text.OPENAI_BPE_FILE)
  num_images, num_captions = int(IMAGES * args.scale), int(CAPTIONS * args.scale)
  rng = np.random.default_rng(0)
  g_pids = np.concatenate([np.arange(min(IDS, num_images)), rng.integers(0, min(IDS, num_images),
                                                                        max(num_images - IDS, 0))])
  q_pids = g_pids[rng.permutation(np.resize(np.arange(num_images), num_captions))]  # ~2 captions an image
  images = rng.integers(0, 256, (num_images, HEIGHT, WIDTH, 3), dtype=np.uint8)
  words = "man woman red blue black white coat shirt bag backpack shoes trousers jeans hat long short hair".split()
  captions = [" ".join(rng.choice(words, rng.integers(8, 30))) for _ in range(num_captions)]

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "best.pth")
    model = random_field_checkpoint(path)
    config = config_files.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                                   "field_checkpoint.py"))
    config.data.tokenizer, config.model.init_cache_dir = bpe, os.path.join(tmp, "cache")

    start = time.perf_counter()
    run = rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(path, config))
    mesh = parallel.make_mesh()
    encoders = encoding.make_encoders(run.model, mesh)
    tokens = run.tokenizer.encode(captions)
    img = encoding.encode_images(encoders, run.params, images, mesh, args.batch)
    txt = encoding.encode_tokens(encoders, run.params, tokens, mesh, args.batch)
    ours = metrics.retrieval_metrics(txt, img, q_pids, g_pids)
    ours_seconds = time.perf_counter() - start

    start = time.perf_counter()
    torch.load(path, weights_only=True)  # the reference reads the file too
    with torch.no_grad():
      ref_img = torch.cat([reference_image_features(model, torch.from_numpy(np.asarray(
          (images[i:i + args.batch] / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073]))
          / np.array([0.26862954, 0.26130258, 0.27577711]), np.float32)).permute(0, 3, 1, 2))
          for i in range(0, num_images, args.batch)])
      ref_txt = torch.cat([model.get_text_features(input_ids=torch.from_numpy(tokens[i:i + args.batch]).long()).pooler_output
                           for i in range(0, num_captions, args.batch)])
      ref_img = torch.nn.functional.normalize(ref_img, dim=1)
      ref_txt = torch.nn.functional.normalize(ref_txt, dim=1)
      sim = (ref_txt @ ref_img.T).numpy()
    reference = argsort_reference(sim, q_pids, g_pids)
    reference_seconds = time.perf_counter() - start

  print(json.dumps({
      "benchmark": "field_checkpoint", "images": num_images, "captions": num_captions, "image_size": [HEIGHT, WIDTH],
      "ours_seconds": round(ours_seconds, 1), "pytorch_seconds": round(reference_seconds, 1),
      "speedup": round(reference_seconds / ours_seconds, 3), "target_speedup": 1.0,
      "max_image_feature_difference": float(np.abs(img - ref_img.numpy()).max()),
      "max_text_feature_difference": float(np.abs(txt - ref_txt.numpy()).max()),
      "max_figure_difference": float(max(abs(ours[k] - reference[k]) for k in ours)),
      "t2i": {k: round(v, 3) for k, v in ours.items()}}))


if __name__ == "__main__":
  main()
