"""Pretrained CLIP weights from a local checkpoint into our Flax parameters, exactly.

Sources (nothing is downloaded):
  - a Hugging Face CLIP folder (`openai/clip-vit-base-patch16`): `config.json` with
    `model.safetensors` (read with `safetensors.numpy`; torch is not imported) or
    `pytorch_model.bin` (needs torch);
  - an OpenAI CLIP file (`ViT-B-16.pt`): a TorchScript archive as OpenAI ships it, or a
    plain state dict (needs torch);
  - a field checkpoint: the `best.pth` the IRRA family's code writes (IRRA, DGCMIA; needs torch), a
    torch pickle whose `model` entry is a state dict with the CLIP towers under `base_model.` in
    OpenAI's layout, float16 as `convert_weights` leaves them. Its position grid is the *trained*
    one (24×8 at 384×128) and is taken as it is, never resized; its vocabulary is the field's (49,408
    ids, the mask token at 49405 with its trained row: `data.text_pipeline="irra"`). Tensors of
    training-only heads (DGCMIA's memory banks, IRRA's MLM and cross-modal layers, a classifier) are
    listed and skipped (`FieldHeads`).

A config points at one with

  --config.model.init_from=/path/to/clip --config.data.tokenizer=/path/to/clip

(the tokenizer comes from the Hugging Face folder; for an OpenAI `.pt` point
`data.tokenizer` at a CLIP tokenizer folder). The trainer then starts from these weights
instead of a random init; a resumed run reads its own checkpoint instead.

The model is defined by the config, not by the checkpoint: the checkpoint's architecture
(widths, layers, heads, patch, embedding size, activation from `config.json`; from tensor
shapes for OpenAI files, with OpenAI's 64-wide heads) must agree with `config.model`,
`data.context_length` and the tokenizer, or loading is refused with every disagreement and
the flag that fixes it. So the run's saved config stays the one description of its model.
Then every tensor must land: missing, unexpected and mis-shaped tensors are all listed.

Two adaptations, as the field does:
  - image position embeddings are resized to the input's patch grid (224×224 → 384×128 at
    patch 16: 14×14 → 24×8) by bilinear interpolation with half-pixel centres and no
    antialiasing (torch's `F.interpolate(mode="bilinear", align_corners=False)`); the class
    token's position is kept;
  - token embedding rows for tokens the tokenizer appended to CLIP's vocabulary (the mask
    token, `Tokenizer.num_appended`) are added, set to the mean pretrained row.

Converted parameters are cached with orbax under `cache_dir/<key>` (default
`$XDG_CACHE_HOME/dgia_jax/converted`, else `~/.cache/dgia_jax/converted`); the key hashes
the source files' contents and the target shapes, so a changed checkpoint or model shape
converts afresh. Multi-process runs convert in every process and skip the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dgia_jax.common import config_files, errors
from dgia_jax.models import clip

_CACHE_FORMAT = 2  # bump when the conversion or the cache entry changes
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPENAI_HEAD_WIDTH = 64  # OpenAI CLIP's text and ViT towers use width // 64 heads
_OPENAI_IGNORED = {"logit_scale", "input_resolution", "context_length", "vocab_size"}


@dataclasses.dataclass(frozen=True)
class Source:
  """A located checkpoint: `layout` is "hf", "openai" or "field"; `config` is HF's config.json."""

  layout: str
  weights: str
  config: str | None = None


FIELD_PREFIX = "base_model."  # the CLIP towers inside a field checkpoint's model


@dataclasses.dataclass(frozen=True)
class FieldInfo:
  """What a field checkpoint holds besides the towers: the training-only tensors skipped, the
  stored logit scale (None: not stored; the field's code fixes it at 1/temperature), the epoch."""

  skipped: tuple[str, ...]
  logit_scale: float | None
  epoch: int | None

  def describe(self) -> str:
    scale = (f"stored logit scale {self.logit_scale:.4g} (temperature {1 / self.logit_scale:.4g})"
             if self.logit_scale else "no logit scale stored (the field's code fixes 1/temperature)")
    heads = sorted({name.split(".")[0] for name in self.skipped})
    return (f"epoch {self.epoch if self.epoch is not None else '?'}; {scale}; skipped {len(self.skipped)} tensors of "
            f"training-only heads ({', '.join(heads) or 'none'})")


def find_source(path: str) -> Source:
  """The checkpoint at `path`: a Hugging Face CLIP folder, or a PyTorch file (an OpenAI `.pt` or a
  field checkpoint: `read_checkpoint` tells them apart)."""
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{path}: no such CLIP checkpoint, field checkpoint or dgia-jax training workdir")
  if not os.path.isdir(path):
    if os.path.basename(path) in HF_WEIGHT_FILES:
      raise errors.ConfigError(f"{path}: pass the Hugging Face folder holding it (with its config.json), not the file")
    return Source("torch", path)
  config = os.path.join(path, "config.json")
  weights = [os.path.join(path, f) for f in HF_WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
  if not os.path.exists(config) or not weights:
    sharded = [f for f in os.listdir(path) if f.endswith(".index.json")]
    raise errors.MissingPathError(
        f"{path} is not a Hugging Face CLIP folder: it needs config.json and one of {', '.join(HF_WEIGHT_FILES)}"
        + (f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""))
  return Source("hf", weights[0], config)


def read_checkpoint(source: Source) -> tuple[str, dict[str, np.ndarray], FieldInfo | None]:
  """(layout: "hf", "openai" or "field"; every tower tensor, floating ones as float32 — OpenAI and the
  field ship float16, and float16 to float32 is exact; a field checkpoint's `FieldInfo`)."""
  if source.layout == "hf":
    if source.weights.endswith(".safetensors"):
      from safetensors.numpy import load_file

      return "hf", _float32(load_file(source.weights)), None
    return "hf", _state_tensors(_load_torch(source.weights), source.weights), None
  obj = _load_torch(source.weights)
  state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
  if not isinstance(state, dict) or not any(str(k).startswith(FIELD_PREFIX) for k in state):
    return "openai", _state_tensors(obj, source.weights), None
  tensors, skipped, scale = {}, [], None
  for name, value in _state_tensors(state, source.weights).items():
    if name in ("logit_scale", FIELD_PREFIX + "logit_scale"):  # the field's code keeps its scale unsaved
      scale = float(np.exp(value.reshape(-1)[0])) if name.startswith(FIELD_PREFIX) else float(value.reshape(-1)[0])
    elif name.startswith(FIELD_PREFIX):
      tensors[name[len(FIELD_PREFIX):]] = value
    else:
      skipped.append(name)
  epoch = obj.get("epoch") if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) else None
  return "field", tensors, FieldInfo(tuple(skipped), scale, epoch)


def _float32(tensors: dict) -> dict[str, np.ndarray]:
  return {k: v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in tensors.items()}


def _load_torch(path: str):
  """A PyTorch file's object: a TorchScript archive's state dict, or what `torch.load` reads (tensors
  and plain values only). BadInputError names a file that is neither."""
  torch = errors.import_optional("torch", f"reading {path} (only .safetensors checkpoints are read without it)")
  try:
    if _is_torchscript(path):  # OpenAI's release files
      with warnings.catch_warnings():  # TorchScript is deprecated, but these files are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)
  except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as e:
    raise errors.BadInputError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from e


def _state_tensors(obj, path: str) -> dict[str, np.ndarray]:
  """A state dict's tensors as numpy (floating ones float32); BadInputError if it is not one."""
  torch = errors.import_optional("torch", f"reading {path}")

  if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise errors.BadInputError(f"{path} is not a CLIP state dict (a mapping of names to tensors)")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def _is_torchscript(path: str) -> bool:
  """A TorchScript archive is a zip holding `constants.pkl`; `torch.save` zips do not."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") for n in z.namelist())


# ---------------------------------------------------------------------------------------
# Architecture: what the checkpoint is, against what the config asks for
# ---------------------------------------------------------------------------------------

def _count_layers(tensors: dict, prefix: str, suffix: str) -> int:
  return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix) and k.endswith(suffix)})


def _require(tensors: dict, keys: tuple[str, ...], what: str) -> None:
  missing = [k for k in keys if k not in tensors]
  if missing:
    raise errors.BadInputError(f"not {what}: it lacks {', '.join(missing)}")


def describe(source: Source, layout: str, tensors: dict[str, np.ndarray]) -> dict:
  """The checkpoint's architecture, as config keys (`model.vision.width`, ...) and `vocab_size`/`eot_id`
  (and, for a field checkpoint, its trained position grid's `grid_positions`).

  Shapes come from the tensors; heads, activation and LayerNorm epsilon from `config.json`
  (OpenAI files and the field's: 64-wide heads, QuickGELU). `eot_id` is the token the text feature
  is read at: HF's `eos_token_id`, or the last vocabulary id where HF/OpenAI take the argmax of the
  ids (`eos_token_id` 2 or absent; OpenAI, the field).
  """
  if layout in ("openai", "field"):
    _require(tensors, ("visual.conv1.weight", "visual.proj", "visual.positional_embedding", "text_projection",
                       "token_embedding.weight", "positional_embedding", "ln_final.weight"),
             f"an OpenAI CLIP ViT state dict ({source.weights})")
    conv, vocab = tensors["visual.conv1.weight"], tensors["token_embedding.weight"].shape[0]
    vision_width, text_width = conv.shape[0], tensors["ln_final.weight"].shape[0]
    grid = {"grid_positions": tensors["visual.positional_embedding"].shape[0] - 1} if layout == "field" else {}
    return {**grid,
        "model.embed_dim": tensors["text_projection"].shape[1],
        "model.vision.patch_size": conv.shape[-1],
        "model.vision.width": vision_width,
        "model.vision.layers": _count_layers(tensors, "visual.transformer.resblocks.", ".attn.in_proj_weight"),
        "model.vision.heads": vision_width // _OPENAI_HEAD_WIDTH,
        "model.text.width": text_width,
        "model.text.layers": _count_layers(tensors, "transformer.resblocks.", ".attn.in_proj_weight"),
        "model.text.heads": text_width // _OPENAI_HEAD_WIDTH,
        "model.activation": "quick_gelu",
        "data.context_length": tensors["positional_embedding"].shape[0],
        "vocab_size": vocab,
        "eot_id": vocab - 1,
    }
  with open(source.config) as f:
    config = json.load(f)
  _require(tensors, ("vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
                     "text_model.embeddings.position_embedding.weight", "text_projection.weight"),
           f"a Hugging Face CLIP checkpoint ({source.weights})")
  # Older hub configs keep overrides in `*_config_dict`; transformers merges them the same way.
  text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
  vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
  conv = tensors["vision_model.embeddings.patch_embedding.weight"]
  vocab, text_width = tensors["text_model.embeddings.token_embedding.weight"].shape
  acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
  eps = {vision.get("layer_norm_eps", 1e-5), text.get("layer_norm_eps", 1e-5)}
  if len(acts) > 1 or eps != {1e-5}:
    raise errors.BadInputError(f"{source.config}: hidden_act {sorted(acts)}, layer_norm_eps {sorted(eps)}; "
                     "this CLIP uses one activation for both towers and LayerNorm epsilon 1e-5")
  for name, tower in (("vision_config", vision), ("text_config", text)):
    if "num_attention_heads" not in tower:
      raise errors.BadInputError(f"{source.config}: {name} lacks num_attention_heads")
  eos = text.get("eos_token_id", 2)
  return {
      "model.embed_dim": tensors["text_projection.weight"].shape[0],
      "model.vision.patch_size": conv.shape[-1],
      "model.vision.width": conv.shape[0],
      "model.vision.layers": _count_layers(tensors, "vision_model.encoder.layers.", ".self_attn.q_proj.weight"),
      "model.vision.heads": vision["num_attention_heads"],
      "model.text.width": text_width,
      "model.text.layers": _count_layers(tensors, "text_model.encoder.layers.", ".self_attn.q_proj.weight"),
      "model.text.heads": text["num_attention_heads"],
      "model.activation": acts.pop(),
      "data.context_length": tensors["text_model.embeddings.position_embedding.weight"].shape[0],
      "vocab_size": vocab,
      "eot_id": vocab - 1 if eos == 2 else eos,
  }


def model_arch(cfg: clip.CLIPConfig) -> dict:
  """`describe`'s keys for the model `cfg` builds (vocab and eot: the tokenizer's)."""
  v, t = cfg.vision, cfg.text
  return {
      "model.embed_dim": cfg.embed_dim,
      "model.vision.patch_size": v.patch_size, "model.vision.width": v.width,
      "model.vision.layers": v.layers, "model.vision.heads": v.heads,
      "model.text.width": t.width, "model.text.layers": t.layers, "model.text.heads": t.heads,
      "model.activation": cfg.activation,
      "data.context_length": t.context_length,
      "vocab_size": t.vocab_size,
      "eot_id": t.eot_token_id,
  }


def check_arch(ckpt: dict, cfg: clip.CLIPConfig, appended_tokens: int, where: str) -> None:
  """Raises, listing every field where the checkpoint `ckpt` (`describe`) and the model disagree."""
  ours = model_arch(cfg)
  ours["vocab_size"] -= appended_tokens
  problems = [f"{k}: config {ours[k]!r}, checkpoint {ckpt[k]!r} (--config.{k}={ckpt[k]})"
              for k in ours if k not in ("vocab_size", "eot_id") and ours[k] != ckpt[k]]
  if "grid_positions" in ckpt and ckpt["grid_positions"] != cfg.vision.grid[0] * cfg.vision.grid[1]:
    p = cfg.vision.patch_size
    sizes = [f"{gh * p},{ckpt['grid_positions'] // gh * p}" for gh in range(ckpt["grid_positions"], 0, -1)
             if ckpt["grid_positions"] % gh == 0 and gh >= ckpt["grid_positions"] // gh][-3:]
    problems.append(f"data.image_size: the checkpoint's trained position grid has {ckpt['grid_positions']} positions "
                    f"(taken as trained, never resized); the config's {cfg.vision.image_size[0]}x"
                    f"{cfg.vision.image_size[1]} at patch {p} has {cfg.vision.grid[0] * cfg.vision.grid[1]} "
                    f"(e.g. --config.data.image_size={' or '.join(reversed(sizes))})")
  if "grid_positions" in ckpt and appended_tokens:
    problems.append(f"data.text_pipeline: the field's vocabulary has its mask token (id 49405, a trained row); the "
                    f"tokenizer appended {appended_tokens} (--config.data.text_pipeline=irra)")
  if ours["vocab_size"] != ckpt["vocab_size"] or ours["eot_id"] != ckpt["eot_id"]:
    problems.append(
        f"tokenizer: {ours['vocab_size']} tokens (+{appended_tokens} appended), end-of-text id {ours['eot_id']}; "
        f"checkpoint: {ckpt['vocab_size']} tokens, end-of-text id {ckpt['eot_id']} "
        "(point --config.data.tokenizer at the checkpoint's tokenizer folder)")
  if problems:
    raise errors.ConfigError(f"{where} does not match the configured model:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------
# Tensor mapping: Flax parameter path -> (source tensor names, conversion)
# ---------------------------------------------------------------------------------------

Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return x.T


def _conv_kernel(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return x.transpose(2, 3, 1, 0)


def _fuse_qkv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Three torch Linear weights [W, W] -> fused Dense kernel [W, 3W] (q, k, v along the output)."""
  return np.concatenate([q, k, v], axis=0).T


def _fuse_qkv_bias(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  return np.concatenate([q, k, v], axis=0)


def resize_pos_embed(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Image position embeddings [1 + S·S, W] (square grid) -> [1 + gh·gw, W], class position kept.

  Bilinear, half-pixel centres, no antialiasing: torch's
  `F.interpolate(mode="bilinear", align_corners=False)`, which the field uses.
  """
  gh, gw = grid
  if pos.shape[0] == 1 + gh * gw:
    return pos
  side = int(round((pos.shape[0] - 1) ** 0.5))
  if side * side != pos.shape[0] - 1:
    raise errors.BadInputError(f"{pos.shape[0] - 1} patch positions are not a square grid; cannot resize to {gh}x{gw}")
  patches = pos[1:].reshape(side, side, pos.shape[1])
  resized = jax.image.resize(patches, (gh, gw, pos.shape[1]), method="linear", antialias=False)
  return np.concatenate([pos[:1], np.asarray(resized, np.float32).reshape(gh * gw, -1)])


def _append_rows(count: int) -> Callable[[np.ndarray], np.ndarray]:
  """Token embedding [V, W] -> [V + count, W], the new rows set to the mean pretrained row."""
  return lambda emb: np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), count, axis=0)])


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where a checkpoint layout keeps each tensor of our model.

  `blocks`: residual block `i` of each tower (format string). `in_proj`: our fused q,k,v
  kernel/bias from tensors under a block. `parts`: LayerNorms (ours `ln_*`: scale, bias <-
  weight, bias) and Linears (kernel, bias <- weight transposed, bias), in blocks
  (`block_parts`) and outside (`parts`). `tensors`: the rest, with their conversion.
  """

  blocks: dict[str, str]
  in_proj: dict[str, Rule]
  block_parts: dict[str, str]
  parts: dict[str, str]
  tensors: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]
  image_positions: str
  token_embedding: str


_LAYOUTS = {
    "openai": _Layout(
        blocks={"visual": "visual.transformer.resblocks.{}", "text": "transformer.resblocks.{}"},
        in_proj={"kernel": (("attn.in_proj_weight",), _transpose), "bias": (("attn.in_proj_bias",), _same)},
        block_parts={"ln_1": "ln_1", "ln_2": "ln_2", "out_proj": "attn.out_proj", "c_fc": "mlp.c_fc",
                     "c_proj": "mlp.c_proj"},
        parts={"visual/ln_pre": "visual.ln_pre", "visual/ln_post": "visual.ln_post", "text/ln_final": "ln_final"},
        tensors={"visual/conv1/kernel": ("visual.conv1.weight", _conv_kernel),
                 "visual/class_embedding": ("visual.class_embedding", _same),
                 "visual/proj": ("visual.proj", _same),  # used as x @ proj: already [W, D]
                 "text/positional_embedding": ("positional_embedding", _same),
                 "text/text_projection": ("text_projection", _same)},
        image_positions="visual.positional_embedding",
        token_embedding="token_embedding.weight"),
    "hf": _Layout(
        blocks={"visual": "vision_model.encoder.layers.{}", "text": "text_model.encoder.layers.{}"},
        in_proj={"kernel": (tuple(f"self_attn.{n}_proj.weight" for n in "qkv"), _fuse_qkv_kernel),
                 "bias": (tuple(f"self_attn.{n}_proj.bias" for n in "qkv"), _fuse_qkv_bias)},
        block_parts={"ln_1": "layer_norm1", "ln_2": "layer_norm2", "out_proj": "self_attn.out_proj",
                     "c_fc": "mlp.fc1", "c_proj": "mlp.fc2"},
        parts={"visual/ln_pre": "vision_model.pre_layrnorm",  # sic: HF's name
               "visual/ln_post": "vision_model.post_layernorm", "text/ln_final": "text_model.final_layer_norm"},
        tensors={"visual/conv1/kernel": ("vision_model.embeddings.patch_embedding.weight", _conv_kernel),
                 "visual/class_embedding": ("vision_model.embeddings.class_embedding", _same),
                 "visual/proj": ("visual_projection.weight", _transpose),
                 "text/positional_embedding": ("text_model.embeddings.position_embedding.weight", _same),
                 "text/text_projection": ("text_projection.weight", _transpose)},
        image_positions="vision_model.embeddings.position_embedding.weight",
        token_embedding="text_model.embeddings.token_embedding.weight"),
}


def _part_rules(ours: str, theirs: str) -> dict[str, Rule]:
  """A LayerNorm (`.../ln_*`) or Linear of ours, from torch's `weight` and `bias`."""
  if ours.rsplit("/", 1)[-1].startswith("ln_"):
    return {f"{ours}/LayerNorm_0/scale": ((f"{theirs}.weight",), _same),
            f"{ours}/LayerNorm_0/bias": ((f"{theirs}.bias",), _same)}
  return {f"{ours}/kernel": ((f"{theirs}.weight",), _transpose), f"{ours}/bias": ((f"{theirs}.bias",), _same)}


def _rules(layout: _Layout, cfg: clip.CLIPConfig, appended_tokens: int) -> dict[str, Rule]:
  """Flax parameter path -> (source tensor names, conversion) for the model `cfg` builds."""
  rules: dict[str, Rule] = {}
  for tower, layers in (("visual", cfg.vision.layers), ("text", cfg.text.layers)):
    for i in range(layers):
      ours, theirs = f"{tower}/transformer/resblocks_{i}", layout.blocks[tower].format(i)
      for name, (keys, fn) in layout.in_proj.items():
        rules[f"{ours}/in_proj/{name}"] = (tuple(f"{theirs}.{k}" for k in keys), fn)
      for part, src in layout.block_parts.items():
        rules.update(_part_rules(f"{ours}/{part}", f"{theirs}.{src}"))
  for part, src in layout.parts.items():
    rules.update(_part_rules(part, src))
  rules.update({path: ((src,), fn) for path, (src, fn) in layout.tensors.items()})
  rules["visual/positional_embedding"] = ((layout.image_positions,), lambda p: resize_pos_embed(p, cfg.vision.grid))
  rules["text/token_embedding/embedding"] = ((layout.token_embedding,), _append_rows(appended_tokens))
  return rules


def _ignored(name: str, layout: str) -> bool:
  """Tensors with no place in the model: the learnt logit scale (we fix tau), HF index buffers, OpenAI's scalars."""
  if layout == "openai":
    return name in _OPENAI_IGNORED
  return name == "logit_scale" or name.endswith(".position_ids")


def param_shapes(cfg: clip.CLIPConfig) -> dict:
  """Flat {'visual/conv1/kernel': (shape, dtype), ...} of the model `cfg` builds."""
  h, w = cfg.vision.image_size
  shapes = jax.eval_shape(clip.CLIP(cfg).init, jax.random.key(0), jnp.zeros((1, h, w, 3)),
                          jnp.zeros((1, cfg.text.context_length), jnp.int32))["params"]
  return {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def convert(tensors: dict[str, np.ndarray], layout: str, cfg: clip.CLIPConfig, appended_tokens: int = 0,
            where: str = "checkpoint") -> dict:
  """Checkpoint tensors -> Flax params (nested dict of float32 host arrays) for `clip.CLIP(cfg)`.
  A field checkpoint's towers are in OpenAI's layout, their trained position grid as the model's.

  Raises listing every missing, unexpected and mis-shaped tensor.
  """
  layout = "openai" if layout == "field" else layout
  rules = _rules(_LAYOUTS[layout], cfg, appended_tokens)
  target = param_shapes(cfg)
  if set(rules) != set(target):  # the mapping itself must cover the model exactly
    raise AssertionError(f"mapping out of date with the model: {sorted(set(rules) ^ set(target))}")
  used = {k for keys, _ in rules.values() for k in keys}
  missing = sorted(used - tensors.keys())
  unexpected = sorted(k for k in tensors.keys() - used if not _ignored(k, layout))
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
  flat = {}
  for path, (keys, fn) in ({} if missing else rules).items():
    shapes = ", ".join(f"{k} {list(tensors[k].shape)}" for k in keys)
    try:
      value = fn(*(tensors[k] for k in keys))
    except ValueError as e:
      problems.append(f"mis-shaped: {shapes}: {e}")
      continue
    if value.shape != target[path][0]:
      problems.append(f"mis-shaped: {shapes} -> {path} {list(value.shape)}, the model needs {list(target[path][0])}")
    flat[path] = np.asarray(value, np.float32)
  if problems:
    raise errors.BadInputError(f"{where} cannot be loaded into the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


# ---------------------------------------------------------------------------------------
# Writing: our parameters as another layout's tensors (the inverse of `convert`)
# ---------------------------------------------------------------------------------------

def _unfuse(fused: np.ndarray) -> tuple[np.ndarray, ...]:
  """Our fused q,k,v kernel [W, 3W] or bias [3W] -> torch's three [W, W] weights or [W] biases."""
  parts = np.split(fused, 3, axis=-1)
  return tuple(p.T if p.ndim == 2 else p for p in parts)


_INVERSES = {_same: lambda x: (x,), _transpose: lambda x: (x.T,),
             _conv_kernel: lambda x: (x.transpose(3, 2, 0, 1),),
             _fuse_qkv_kernel: _unfuse, _fuse_qkv_bias: _unfuse}


def export_tensors(params: dict, layout: str, cfg: clip.CLIPConfig, mask_row: int | None = None) -> dict[str, np.ndarray]:
  """Our parameters as `layout`'s ("openai": the field's towers; "hf") float32 tensors, every one that
  `convert` reads back into the same parameters. The image position grid is written as trained.

  `mask_row`: where a mask token's embedding row appended past the checkpoint vocabulary (49,409 rows
  for CLIP's 49,408) goes: into row `mask_row` (the field's mask id, 49405, replacing the row of the
  merge its vocabulary drops), or dropped (None; Hugging Face's CLIP has no mask token).
  """
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  rules = _rules(_LAYOUTS[layout], cfg, appended_tokens=0)
  out = {}
  for path, (keys, fn) in rules.items():
    value = flat[path]
    if path == "text/token_embedding/embedding":
      value = _fold_appended_rows(value, cfg, mask_row)
      parts = (value,)
    elif path == "visual/positional_embedding":
      parts = (value,)  # as trained: the grid of the model's input
    else:
      parts = _INVERSES[fn](value)
    out.update(dict(zip(keys, parts)))
  return out


_CLIP_VOCAB = 49_408


def _fold_appended_rows(embedding: np.ndarray, cfg: clip.CLIPConfig, mask_row: int | None) -> np.ndarray:
  """The token embedding [V, W] cut to CLIP's 49,408 rows when a mask row was appended to them."""
  if embedding.shape[0] <= _CLIP_VOCAB:
    return embedding
  if embedding.shape[0] != _CLIP_VOCAB + 1:
    raise errors.BadInputError(f"the token embedding has {embedding.shape[0]} rows: neither CLIP's {_CLIP_VOCAB:,} nor "
                               "those and an appended mask token")
  folded = embedding[:_CLIP_VOCAB].copy()
  if mask_row is not None:
    folded[mask_row] = embedding[-1]
  return folded


# ---------------------------------------------------------------------------------------
# Loading, with a converted-params cache
# ---------------------------------------------------------------------------------------

def default_cache_dir() -> str:
  return config_files.user_cache_dir("converted")


def cache_key(source: Source, cfg: clip.CLIPConfig, appended_tokens: int) -> str:
  """Hash of the source files' bytes, the model (all but its compute settings) and the conversion version."""
  model = dataclasses.replace(cfg, dtype="float32", remat=False)
  h = hashlib.sha256(f"v{_CACHE_FORMAT} {source.layout} appended={appended_tokens} {model!r}\n".encode())
  for path in filter(None, (source.weights, source.config)):
    with open(path, "rb") as f:
      h.update(hashlib.file_digest(f, "sha256").digest())
  return h.hexdigest()[:32]


def load_clip(path: str, cfg: clip.CLIPConfig, *, appended_tokens: int = 0,
              cache_dir: str | None = None) -> tuple[dict, FieldInfo | None]:
  """(Flax params for `clip.CLIP(cfg)` from the checkpoint at `path` (float32 host arrays); for a
  field checkpoint, what else it holds).

  Args:
    path: a Hugging Face CLIP folder, an OpenAI `.pt` file or a field checkpoint (`best.pth`).
    cfg: the model; its architecture must match the checkpoint's (`check_arch`).
    appended_tokens: tokens the tokenizer appended to the checkpoint's vocabulary
      (`Tokenizer.num_appended`); `cfg.text.vocab_size` counts them.
    cache_dir: where converted params are kept (default `default_cache_dir()`).
  """
  source = find_source(path)
  cached = None
  if jax.process_count() == 1:
    cached = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), cache_key(source, cfg, appended_tokens))
    if os.path.isfile(os.path.join(cached, _INFO_FILE)):
      return _restore(cached, cfg)
  layout, tensors, info = read_checkpoint(source)
  check_arch(describe(source, layout, tensors), cfg, appended_tokens, path)
  params = convert(tensors, layout, cfg, appended_tokens, where=path)
  if cached:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(cached, "params"), params)
      with open(os.path.join(cached, _INFO_FILE), "w") as f:  # last: a cache entry without it is not one
        json.dump(dataclasses.asdict(info) if info else None, f)
    except (ValueError, OSError):
      if not os.path.isfile(os.path.join(cached, _INFO_FILE)):  # else another process wrote the same conversion
        raise
  return params, info


_INFO_FILE = "field_info.json"  # in a cache entry: the checkpoint's FieldInfo (null for CLIP's)


def _restore(directory: str, cfg: clip.CLIPConfig) -> tuple[dict, FieldInfo | None]:
  target = traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in param_shapes(cfg).items()}, sep="/")
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(os.path.join(directory, "params"), target)
  with open(os.path.join(directory, _INFO_FILE)) as f:
    info = json.load(f)
  field = FieldInfo(tuple(info["skipped"]), info["logit_scale"], info["epoch"]) if info else None
  return jax.tree.map(lambda x: np.asarray(x, np.float32), restored), field
