"""Train step throughput: our jitted JAX step vs the PyTorch way, same shapes, same batch.

Both sides run one ITC + Adam step on the same CLIP two-tower: ours is the trainer's own
jitted step (`train.make_train_step` with only the ITC loss on); the reference is
`transformers.CLIPModel` (PyTorch, CPU, fp32 — the fp16 the field uses does not exist on
CPU) with `torch.optim.Adam`, as IRRA-style code runs it. Two sizes:

- `small`: the CPU preset at the synthetic images (96×32, 48 text tokens), batch 64;
- `vit_b16`: OpenAI CLIP ViT-B/16 shapes at 384×128 with 77 tokens (the pretrained 14×14
  position grid interpolated to 24×8 on the PyTorch side, as the field does), batch 8 on CPU.

Prints one JSON line with steps/s for each side and the JAX/PyTorch ratio per size.

  python -m benchmarks.train_step [--sizes small,vit_b16] [--steps 5]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from benchmarks import timing
from dgia_jax import cli, parallel, train
from dgia_jax.models import presets

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

SIZES = {
    # name: (preset, image size, context length, vocab size, batch)
    "small": (presets.small, (96, 32), 48, 256, 64),
    "vit_b16": (presets.vit_b16, (384, 128), 77, 49408, 8),
}


def jax_step_rate(preset, image_size, context, vocab, batch, steps, images, tokens) -> float:
  config = cli.load_config(DEFAULT_CONFIG)
  config.model = preset()
  config.data.image_size = image_size
  config.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  mesh = parallel.make_mesh()

  class Tok:  # the facts the model needs from a tokenizer
    vocab_size, eot_id, context_length, mask_id = vocab, vocab - 1, context, vocab - 2

  model = train.build_model(config, Tok)
  tx, schedule = train.make_optimizer(config.train, steps_per_epoch=100)
  state = train.init_state(model, tx, 0, 0, mesh)
  step = train.make_train_step(model, tx, schedule, config, 100, Tok.mask_id, state, mesh)
  arrays = parallel.to_global({"image": images, "tokens": tokens, "index": np.arange(batch, dtype=np.int32)}, mesh)
  seconds, _ = timing.seconds_per_step(step, state, arrays, jnp.zeros((batch,), jnp.int32), steps)
  return 1.0 / seconds


def torch_step_rate(preset, image_size, context, vocab, batch, steps, images, tokens) -> float:
  p = preset()
  grid = int(round((image_size[0] * image_size[1]) ** 0.5 / p.vision.patch_size))
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=p.text.width, intermediate_size=4 * p.text.width,
                       num_hidden_layers=p.text.layers, num_attention_heads=p.text.heads,
                       max_position_embeddings=context, hidden_act="quick_gelu", bos_token_id=vocab - 3,
                       eos_token_id=vocab - 1, pad_token_id=0),
      vision_config=dict(hidden_size=p.vision.width, intermediate_size=4 * p.vision.width,
                         num_hidden_layers=p.vision.layers, num_attention_heads=p.vision.heads,
                         image_size=grid * p.vision.patch_size, patch_size=p.vision.patch_size,
                         hidden_act="quick_gelu"),
      projection_dim=p.embed_dim)
  model = transformers.CLIPModel(cfg).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-8)
  pixels = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
  ids = torch.from_numpy(tokens.astype(np.int64))
  labels = torch.arange(batch)

  def one():
    img = F.normalize(model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output)
    txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output)
    logits = img @ txt.T / 0.02
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()

  for _ in range(2):
    one()
  start = time.perf_counter()
  for _ in range(steps):
    one()
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="small,vit_b16")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  out = {"benchmark": "train_step", "device": jax.devices()[0].device_kind, "torch_threads": torch.get_num_threads(),
         "target_ratio": 1.2}
  for name in args.sizes.split(","):
    preset, image_size, context, vocab, batch = SIZES[name]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, *image_size, 3), dtype=np.uint8)
    tokens = np.zeros((batch, context), np.int32)
    lengths = rng.integers(context // 3, context - 1, size=batch)
    for i, n in enumerate(lengths):
      tokens[i, 0], tokens[i, 1:n], tokens[i, n] = vocab - 3, rng.integers(1, vocab - 3, size=n - 1), vocab - 1
    ours = jax_step_rate(preset, image_size, context, vocab, batch, args.steps, images, tokens)
    ref = torch_step_rate(preset, image_size, context, vocab, batch, args.steps, images, tokens)
    out[name] = {"batch": batch, "image_size": image_size, "context": context,
                 "jax_steps_per_s": round(ours, 4), "torch_steps_per_s": round(ref, 4),
                 "jax_over_torch": round(ours / ref, 3)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
