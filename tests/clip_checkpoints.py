"""Tiny CLIP checkpoints in the real formats, written by the reference libraries (test-only).

- `write_clip_tokenizer`: a CLIP-layout byte-level BPE (`vocab.json` + `merges.txt`: 256
  byte symbols, the same with `</w>`, a few merges, then `<|startoftext|>`, `<|endoftext|>`
  as the last two ids, as in CLIP's 49,408-token vocabulary), and the `tokenizer.json`
  `transformers.CLIPTokenizer` makes of it.
- `hf_clip`: a random `transformers.CLIPModel` (PyTorch) with every tensor drawn at random
  (no zero biases or unit LayerNorm scales that would hide a swapped or transposed tensor).
- `openai_state_dict`: the same weights under OpenAI's names (`clip/model.py`: fused
  `attn.in_proj_*`, `mlp.c_fc`/`c_proj`, `visual.proj` and `text_projection` as x @ W),
  written out here from the Hugging Face side, independently of the loader's mapping.
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from tokenizers import pre_tokenizers

MERGES = ["t h", "th e</w>", "r e", "re d</w>", "a n", "an d</w>", "m a", "ma n</w>", "c o", "co at</w>", "a t</w>"]
WIDTH, LAYERS, HEADS, PATCH, IMAGE, CONTEXT, EMBED = 128, 2, 2, 8, 32, 16, 64  # OpenAI heads are 64 wide


def write_clip_tokenizer(folder: str, *, tokenizer_json: bool = True) -> transformers.CLIPTokenizer:
  """CLIP-layout vocab.json + merges.txt in `folder` (and tokenizer.json if asked); returns HF's tokenizer."""
  os.makedirs(folder, exist_ok=True)
  symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  tok = transformers.CLIPTokenizer.from_pretrained(folder)
  if tokenizer_json:
    tok.save_pretrained(folder)
  return tok


def hf_clip(vocab_size: int, eos_token_id: int, seed: int = 0) -> transformers.CLIPModel:
  """A random CLIP (QuickGELU) of the tiny shapes above, in eval mode."""
  common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, hidden_act="quick_gelu")
  config = transformers.CLIPConfig(
      text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=CONTEXT, eos_token_id=eos_token_id,
                       bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id),
      vision_config=dict(common, image_size=IMAGE, patch_size=PATCH), projection_dim=EMBED)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05))
  return model


def openai_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """A Hugging Face CLIP state dict renamed to OpenAI's `clip/model.py` layout."""
  out = {"logit_scale": hf["logit_scale"]}
  for hf_tower, oa_tower in (("vision_model", "visual."), ("text_model", "")):
    for i in range(LAYERS):
      h, o = f"{hf_tower}.encoder.layers.{i}.", f"{oa_tower}transformer.resblocks.{i}."
      for part in ("weight", "bias"):
        out[f"{o}attn.in_proj_{part}"] = torch.cat([hf[f"{h}self_attn.{n}_proj.{part}"] for n in "qkv"])
        out[f"{o}attn.out_proj.{part}"] = hf[f"{h}self_attn.out_proj.{part}"]
        out[f"{o}ln_1.{part}"] = hf[f"{h}layer_norm1.{part}"]
        out[f"{o}ln_2.{part}"] = hf[f"{h}layer_norm2.{part}"]
        out[f"{o}mlp.c_fc.{part}"] = hf[f"{h}mlp.fc1.{part}"]
        out[f"{o}mlp.c_proj.{part}"] = hf[f"{h}mlp.fc2.{part}"]
  for part in ("weight", "bias"):
    out[f"visual.ln_pre.{part}"] = hf[f"vision_model.pre_layrnorm.{part}"]
    out[f"visual.ln_post.{part}"] = hf[f"vision_model.post_layernorm.{part}"]
    out[f"ln_final.{part}"] = hf[f"text_model.final_layer_norm.{part}"]
  out["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
  out["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
  out["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
  out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
  out["text_projection"] = hf["text_projection.weight"].T.contiguous()
  return out


def save_torchscript(state: dict[str, torch.Tensor], path: str) -> None:
  """`state` as a TorchScript archive, the container OpenAI's `ViT-B-16.pt` comes in."""
  root = torch.nn.Module()
  for name, tensor in state.items():
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_buffer(leaf, tensor)
  torch.jit.script(root).save(path)
