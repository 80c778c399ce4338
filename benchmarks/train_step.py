"""Train step throughput: our jitted JAX step vs the PyTorch way, same shapes, same batch.

Both sides run one ITC + Adam step on the same CLIP two-tower: ours is the trainer's own
jitted step (`build.training` with only the ITC loss on); the reference is
`transformers.CLIPModel` (PyTorch, CPU, fp32 — the fp16 the field uses does not exist on
CPU) with `torch.optim.Adam`, as IRRA-style code runs it. Two sizes:

- `small`: the CPU preset at the synthetic images (96×32, 48 text tokens), batch 64;
- `vit_b16`: OpenAI CLIP ViT-B/16 shapes at 384×128 with 77 tokens (the pretrained 14×14
  position grid interpolated to 24×8 on the PyTorch side, as the field does), batch 8 on CPU.

Timing alternates the sides over `--rounds` rounds (median reported, every round listed), so
a slow spell of a shared machine does not favour either. Prints one JSON line, per size:
steps/s of each side and their ratio; the FLOPs each side executes per step (XLA's cost
analysis of our compiled step; torch's `FlopCounterMode` for the reference; ours are fewer
because the last block only computes the feature row, `clip.Transformer`) and the GFLOP/s
that makes; and the machine's matmul rate at the widest matmul of the image tower through
XLA and through torch, the ceiling both sides work against. With --parts, the same rounds also
time the forward pass (loss only) and forward + backward (no optimizer) of each side, to show
where the step's ratio comes from. With --layers L1,L2 both towers are built L1 and L2 layers
deep (all four steps timed in the same rounds) and the step split into what one layer costs
and what does not repeat with depth, per side.

  python -m benchmarks.train_step [--sizes small,vit_b16] [--steps 5] [--rounds 3] [--parts] [--layers 1,3]
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
from torch.utils import flop_counter

from benchmarks import timing
from dgia_jax.common import config_files, host_memory, parallel
from dgia_jax.models import presets
from dgia_jax.training import build

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

SIZES = {
    # name: (preset, image size, context length, vocab size, batch)
    "small": (presets.small, (96, 32), 48, 256, 64),
    "vit_b16": (presets.vit_b16, (384, 128), 77, 49408, 8),
}


def _timer(run):
  """time(n) -> mean seconds of `run()` over n calls, after one untimed call."""
  def time_calls(n: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(n):
      run()
    return (time.perf_counter() - start) / n
  return time_calls


def jax_step(preset, image_size, context, vocab, batch, images, tokens):
  """({part: time(n) -> seconds per call}, GFLOPs per step from XLA's cost analysis of the step).

  Parts: "step" (the trainer's step), "forward" (the loss), "forward_backward" (its gradient).
  """
  config = config_files.load_config(DEFAULT_CONFIG)
  config.model = preset()
  config.data.image_size = image_size
  config.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  mesh = parallel.make_mesh()

  class Tok:  # the facts the model needs from a tokenizer
    vocab_size, eot_id, context_length, mask_id = vocab, vocab - 1, context, vocab - 2

  built = build.training(config, Tok, 100, 0, mesh)
  step, state = built.step, built.state
  arrays = parallel.to_global({"image": images, "tokens": tokens, "index": np.arange(batch, dtype=np.int32)}, mesh)
  pair_pids = jnp.zeros((batch,), jnp.int32)
  step, flops = timing.compile_step(step, state, arrays, pair_pids)
  gflops = flops / 1e9

  def time_steps(n: int) -> float:
    nonlocal state  # the parts below read the live state's parameters (each round donates the old one)
    seconds, state = timing.seconds_per_step(step, state, arrays, pair_pids, n)
    return seconds

  def loss(params):
    return built.objective(params, arrays, jnp.int32(0), pair_pids=pair_pids)[0]

  # The parts read the parameters of the live state (the step donates the old one).
  forward, forward_backward = jax.jit(loss), jax.jit(jax.grad(loss))
  return {"step": time_steps, "forward": _timer(lambda: jax.block_until_ready(forward(state.params))),
          "forward_backward": _timer(lambda: jax.block_until_ready(forward_backward(state.params)))}, gflops


def torch_step(preset, image_size, context, vocab, batch, images, tokens):
  """({part: time(n) -> seconds per call}, GFLOPs per step counted by torch's FlopCounterMode)."""
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

  def loss():
    img = F.normalize(model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output)
    txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output)
    logits = img @ txt.T / 0.02
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

  def forward():
    with torch.no_grad():
      loss()

  def forward_backward():
    opt.zero_grad()
    loss().backward()

  def one():
    forward_backward()
    opt.step()

  with flop_counter.FlopCounterMode(display=False) as counter:
    one()
  return {"step": _timer(one), "forward": _timer(forward), "forward_backward": _timer(forward_backward)}, \
      counter.get_total_flops() / 1e9


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> dict[str, float]:
  """The machine's float32 matmul rate [m, k] @ [k, n] in GFLOP/s, through XLA and through torch."""
  a, b = np.random.default_rng(0).normal(size=(2, max(m, k), max(k, n))).astype(np.float32)
  a, b = a[:m, :k].copy(), b[:k, :n].copy()
  xla_dot = jax.jit(jnp.dot)
  ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
  runs = {"xla": lambda: xla_dot(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
  return {name: 2 * m * k * n / _timer(run)(repeats) / 1e9 for name, run in runs.items()}


def with_layers(preset, layers: int | None):
  """`preset` with both towers `layers` deep (None: as the preset has them)."""
  def layered():
    p = preset()
    if layers is not None:
      p.vision.layers = p.text.layers = layers
    return p
  return layered


def build_size(name: str, layers: int | None) -> tuple[dict, dict]:
  """(the size's shapes, {side: ({part: time(n)}, GFLOPs per step)}) for one size at one depth."""
  preset, image_size, context, vocab, batch = SIZES[name]
  preset = with_layers(preset, layers)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(batch, *image_size, 3), dtype=np.uint8)
  tokens = np.zeros((batch, context), np.int32)
  lengths = rng.integers(context // 3, context - 1, size=batch)
  for i, n in enumerate(lengths):
    tokens[i, 0], tokens[i, 1:n], tokens[i, n] = vocab - 3, rng.integers(1, vocab - 3, size=n - 1), vocab - 1
  vision = preset().vision
  tokens_per_image = (image_size[0] // vision.patch_size) * (image_size[1] // vision.patch_size) + 1
  shapes = {"batch": batch, "image_size": image_size, "context": context, "layers": vision.layers,
            "widest_matmul": (batch * tokens_per_image, vision.width, 4 * vision.width)}
  return shapes, {"jax": jax_step(preset, image_size, context, vocab, batch, images, tokens),
                  "torch": torch_step(preset, image_size, context, vocab, batch, images, tokens)}


def figures(shapes: dict, sides: dict, seconds: dict, parts: list[str]) -> dict:
  """One size's figures from its rounds' `seconds[side, part]`: steps/s, FLOPs, matmul ceiling."""
  rate = {side: 1.0 / float(np.median(seconds[side, "step"])) for side in sides}
  fig = {k: v for k, v in shapes.items() if k != "widest_matmul"}
  for side, (_, gflops) in sides.items():
    fig.update({f"{side}_steps_per_s": round(rate[side], 4),
                f"{side}_steps_per_s_by_round": [round(1.0 / s, 4) for s in seconds[side, "step"]],
                f"{side}_gflops_per_step": round(gflops, 2), f"{side}_gflops_per_s": round(gflops * rate[side], 1)})
  # The widest matmul of the image tower, [B*T, W] @ [W, 4W]: what the machine's GEMMs reach.
  fig["matmul_gflops_per_s"] = {k: round(v, 1) for k, v in matmul_gflops(*shapes["widest_matmul"]).items()}
  fig["jax_over_torch"] = round(rate["jax"] / rate["torch"], 3)
  for part in parts[1:]:  # seconds per call (median) of each side, and the speed ratio
    median = {side: float(np.median(seconds[side, part])) for side in sides}
    fig[part] = {"jax_seconds": round(median["jax"], 4), "torch_seconds": round(median["torch"], 4),
                 "jax_over_torch": round(median["torch"] / median["jax"], 3)}
  return fig


def per_layer(shallow: dict, deep: dict) -> dict:
  """A step split, from its time at two depths, into one more layer of both towers and the rest.

  step(L) = rest + (L - 1) * layer: the rest is what does not repeat with depth (embeddings, the
  last block, which computes one row, the loss and the optimizer over those parameters).
  """
  out = {}
  for side in ("jax", "torch"):
    step = {fig["layers"]: 1.0 / fig[f"{side}_steps_per_s"] for fig in (shallow, deep)}
    layer = (step[deep["layers"]] - step[shallow["layers"]]) / (deep["layers"] - shallow["layers"])
    out[side] = {"seconds_per_layer": round(layer, 4),
                 "seconds_rest": round(step[shallow["layers"]] - (shallow["layers"] - 1) * layer, 4)}
  out["jax_over_torch"] = {part: round(out["torch"][part] / out["jax"][part], 3) for part in out["jax"]}
  return out


def main():
  host_memory.retain_freed_memory()  # before JAX's CPU threads start, as every program does
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="small,vit_b16")
  parser.add_argument("--steps", type=int, default=5, help="steps per timing round and side")
  parser.add_argument("--rounds", type=int, default=3, help="alternating JAX/PyTorch timing rounds")
  parser.add_argument("--parts", action="store_true", help="also time forward and forward + backward")
  parser.add_argument("--layers", default="", help="comma-separated depths of both towers (default: the preset's); "
                      "with two, also the step split into one layer's cost and the rest")
  args = parser.parse_args()
  parts = ["step", "forward", "forward_backward"] if args.parts else ["step"]
  depths = [int(n) for n in args.layers.split(",")] if args.layers else [None]
  out = {"benchmark": "train_step", "device": jax.devices()[0].device_kind, "torch_threads": torch.get_num_threads(),
         "target_ratio": 1.2, "rounds": args.rounds, "steps_per_round": args.steps}
  for name in args.sizes.split(","):
    built = {layers: build_size(name, layers) for layers in depths}
    # Rounds alternate the sides (and depths), so a slow spell of a shared machine hits all alike.
    seconds = {layers: {(side, part): [] for part in parts for side in sides} for layers, (_, sides) in built.items()}
    for _ in range(args.rounds):
      for layers, by_part in seconds.items():
        sides = built[layers][1]
        for (side, part), times in by_part.items():
          timers, _ = sides[side]
          times.append(timers[part](args.steps))
    figs = [figures(*built[layers], seconds[layers], parts) for layers in depths]
    for layers, fig in zip(depths, figs):
      out[name if layers is None else f"{name}@{layers}_layers"] = fig
    if len(figs) == 2:
      out[f"{name}_per_layer"] = per_layer(*figs)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
