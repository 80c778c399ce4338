"""A trained model written in the field's formats, for the field's PyTorch code and for transformers.

  irra   `{"model": state_dict}` (torch.save) as IRRA's and DGCMIA's `Checkpointer` writes it: the CLIP
         towers under `base_model.` in OpenAI's layout, in the order and with the keys and shapes their
         `build_model` makes for the architecture (no MLM, classifier or memory-bank heads: those are
         not trained here), the trained position grid; float16 where their `convert_weights` makes it
         (Conv and Linear weights and biases, attention in_proj, both projections), float32 elsewhere —
         or float32 throughout (`fp16=False`).
  hf     a Hugging Face CLIP folder: config.json, model.safetensors (float32) and the run's tokenizer
         (tokenizer.json); square inputs only (Hugging Face's CLIP has a square position grid).

The mask token: a run with CLIP's own tokenizer appended a 49,409th embedding row for it. In `irra`
that row becomes row 49405, the field's mask id (the row of the last merge, which the field's
vocabulary drops), so the field's code masks with the trained mask embedding; in `hf` it is dropped
(Hugging Face's CLIP tokenizer has no mask token). A run on the field's text pipeline
(`data.text_pipeline="irra"`) has 49,408 rows, its mask at 49405 already: written as it is (in `hf`,
row 49405 is then the mask embedding where Hugging Face's vocabulary has the word "jekyll").
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dgia_jax.common import errors
from dgia_jax.data import field_text
from dgia_jax.inference.rebuild import TrainedRun
from dgia_jax.models import checkpoint_io
from dgia_jax.run import files

FORMATS = ("irra", "hf")
_FP16_SUFFIXES = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
                  "c_fc.bias", "c_proj.weight", "c_proj.bias")
_FP16_NAMES = ("text_projection", "visual.proj")


def field_key_order(vision_layers: int, text_layers: int) -> list[str]:
  """The keys of the CLIP towers in the order the field's model's state_dict lists them (without
  the `base_model.` prefix): text positions and projection, the image tower, the text blocks, the
  token embedding, the final LayerNorm."""
  def block(prefix: str, i: int) -> list[str]:
    return [f"{prefix}.{i}.{name}" for name in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
        "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
        "ln_2.bias")]

  return (["positional_embedding", "text_projection", "visual.class_embedding", "visual.positional_embedding",
           "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"]
          + [k for i in range(vision_layers) for k in block("visual.transformer.resblocks", i)]
          + ["visual.ln_post.weight", "visual.ln_post.bias"]
          + [k for i in range(text_layers) for k in block("transformer.resblocks", i)]
          + ["token_embedding.weight", "ln_final.weight", "ln_final.bias"])


def _is_fp16_in_the_field(name: str) -> bool:
  return name.endswith(_FP16_SUFFIXES) or name in _FP16_NAMES


def write_irra(run: TrainedRun, out: str, fp16: bool = True) -> dict:
  """`out` (a .pth file) as the field's `Checkpointer` writes one; returns {"keys", "fp16_tensors"}."""
  torch = errors.import_optional("torch", f"writing {out} in the field's format (a torch pickle)")

  cfg = run.model.cfg
  mask_row = field_text.MASK_ID if run.tokenizer.num_appended else None
  tensors = checkpoint_io.export_tensors(run.params, "openai", cfg, mask_row=mask_row)
  order = field_key_order(cfg.vision.layers, cfg.text.layers)
  assert set(order) == set(tensors), sorted(set(order) ^ set(tensors))
  state, half = {}, 0
  for name in order:
    value = torch.from_numpy(np.array(tensors[name], order="C"))  # a writable copy, 0-d kept
    if fp16 and _is_fp16_in_the_field(name):
      value, half = value.half(), half + 1
    state[checkpoint_io.FIELD_PREFIX + name] = value
  files.replace_whole(out, lambda tmp: torch.save({"model": state}, tmp))
  return {"keys": len(state), "fp16_tensors": half}


def write_hf(run: TrainedRun, out_dir: str, temperature: float) -> dict:
  """`out_dir` as a Hugging Face CLIP folder (whole or not at all) that `transformers.CLIPModel`
  loads; returns {"tensors", "config"}."""
  import safetensors.numpy

  cfg = run.model.cfg
  height, width = cfg.vision.image_size
  if height != width:
    raise errors.ConfigError(f"the hf format needs square inputs (Hugging Face's CLIP has a square position grid); "
                             f"this model reads {height}x{width}: use --format irra")
  eot = run.tokenizer.eot_id
  if eot == 2:
    raise errors.ConfigError("Hugging Face's CLIP reads the text feature at the highest token id when eos_token_id is "
                             "2, and this run's end-of-text token is id 2, not its highest: export a run with a CLIP "
                             "tokenizer to hf, or use --format irra")
  tensors = checkpoint_io.export_tensors(run.params, "hf", cfg, mask_row=None)
  vocab = tensors["text_model.embeddings.token_embedding.weight"].shape[0]
  tensors["logit_scale"] = np.asarray(math.log(1.0 / temperature), np.float32)
  config = {
      "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
      "logit_scale_init_value": math.log(1.0 / temperature), "torch_dtype": "float32",
      "text_config": {"hidden_size": cfg.text.width, "intermediate_size": 4 * cfg.text.width,
                      "num_attention_heads": cfg.text.heads, "num_hidden_layers": cfg.text.layers,
                      "max_position_embeddings": cfg.text.context_length, "vocab_size": vocab,
                      "hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "eos_token_id": eot,
                      "bos_token_id": run.tokenizer.sot_id, "pad_token_id": run.tokenizer.pad_id,
                      "projection_dim": cfg.embed_dim},
      "vision_config": {"hidden_size": cfg.vision.width, "intermediate_size": 4 * cfg.vision.width,
                        "num_attention_heads": cfg.vision.heads, "num_hidden_layers": cfg.vision.layers,
                        "image_size": height, "patch_size": cfg.vision.patch_size, "hidden_act": cfg.activation,
                        "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim, "num_channels": 3},
  }

  def write_into(staging: str) -> None:
    safetensors.numpy.save_file({k: np.require(v, np.float32, "C") for k, v in tensors.items()},  # 0-d stays 0-d
                                os.path.join(staging, "model.safetensors"))
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(config, f, indent=1)
    run.tokenizer.save(os.path.join(staging, "tokenizer.json"))

  files.make_dirs(out_dir, "--out")
  files.replace_folder_files(out_dir, write_into, {"model.safetensors", "config.json", "tokenizer.json"},
                             last="config.json")
  return {"tensors": len(tensors), "config": config}
