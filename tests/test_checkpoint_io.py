"""Pretrained CLIP loading: parity with transformers' PyTorch CLIP on checkpoints written here."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dgia_jax.data.tokenizer import Tokenizer
from dgia_jax.inference import rebuild
from dgia_jax.models import checkpoint_io, clip
from dgia_jax.training import train
from tests import clip_checkpoints as cc
from tests import helpers

CAPTIONS = ["the man in the red coat", "a woman and a man", "red", "the coat " * 10]


def _cfg(tok: Tokenizer, image_size=(cc.IMAGE, cc.IMAGE), dtype="float32", **vision) -> clip.CLIPConfig:
  return clip.CLIPConfig(
      embed_dim=cc.EMBED,
      vision=clip.VisionConfig(image_size, cc.PATCH, cc.WIDTH, cc.LAYERS, vision.get("heads", cc.HEADS)),
      text=clip.TextConfig(tok.vocab_size, cc.CONTEXT, cc.WIDTH, cc.LAYERS, cc.HEADS, tok.eot_id),
      dtype=dtype)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny CLIP in every supported layout, the tokenizer, and the PyTorch reference model."""
  root = tmp_path_factory.mktemp("clip")
  hf_dir, bin_dir = str(root / "hf"), str(root / "bin")
  cc.write_clip_tokenizer(hf_dir)
  tok = Tokenizer.from_file(hf_dir, cc.CONTEXT)
  model = cc.hf_clip(tok.vocab_size - tok.num_appended, tok.eot_id)
  model.save_pretrained(hf_dir)
  state = model.state_dict()
  # pytorch_model.bin layout, with the legacy `eos_token_id: 2` (pooling at the largest id).
  os.makedirs(bin_dir)
  torch.save(state, os.path.join(bin_dir, "pytorch_model.bin"))
  model.config.text_config.eos_token_id = 2
  model.config.save_pretrained(bin_dir)
  model.config.text_config.eos_token_id = tok.eot_id
  openai = cc.openai_state_dict(state)
  torch.save(openai, str(root / "openai_state_dict.pt"))
  scalars = {"input_resolution": torch.tensor(cc.IMAGE), "context_length": torch.tensor(cc.CONTEXT),
             "vocab_size": torch.tensor(tok.vocab_size - 1)}
  cc.save_torchscript({k: v.half() for k, v in openai.items()} | scalars, str(root / "ViT-tiny.pt"))
  return dict(root=root, tok=tok, model=model, paths={
      "safetensors": hf_dir, "pytorch_model.bin": bin_dir, "openai state dict": str(root / "openai_state_dict.pt"),
      "openai torchscript fp16": str(root / "ViT-tiny.pt")})


def _features(cfg: clip.CLIPConfig, params, images: np.ndarray, tokens: np.ndarray):
  """Unnormalised projected features [B, D] of both towers (what `get_*_features` return)."""
  img, txt = _projected(clip.CLIP(cfg), params, jnp.asarray(images), jnp.asarray(tokens))
  return np.asarray(img, np.float32), np.asarray(txt, np.float32)


@functools.partial(jax.jit, static_argnums=0)  # one program per model config, as the trainer's
def _projected(model: clip.CLIP, params, images, tokens):
  return (model.apply({"params": params}, images, method=lambda m, x: m.visual(x)),
          model.apply({"params": params}, tokens, method=lambda m, t: m.text(t)))


def _inputs(tok: Tokenizer, image_size=(cc.IMAGE, cc.IMAGE)):
  images = np.random.default_rng(0).normal(size=(3, *image_size, 3)).astype(np.float32)
  return images, tok.encode(CAPTIONS)


def _reference(model, images: np.ndarray, tokens: np.ndarray, interpolate: bool = False):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                                   interpolate_pos_encoding=interpolate).pooler_output
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output
  return img.numpy(), txt.numpy()


@pytest.mark.slow  # compiles both towers
@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin", "openai state dict"])
def test_embeddings_match_transformers(ckpt, layout, tmp_path):
  tok, cfg = ckpt["tok"], _cfg(ckpt["tok"])
  images, tokens = _inputs(tok)
  params = checkpoint_io.load_clip(ckpt["paths"][layout], cfg, appended_tokens=tok.num_appended,
                                   cache_dir=str(tmp_path))[0]
  ours, ref = _features(cfg, params, images, tokens), _reference(ckpt["model"], images, tokens)
  err = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
  print(f"{layout}: max abs error image {err[0]:.2e}, text {err[1]:.2e}")
  assert max(err) <= 1e-4, err
  assert min(np.abs(r).max() for r in ref) > 0.1  # the features are not trivially small


def test_openai_torchscript_float16_file(ckpt, tmp_path):
  """OpenAI ships a float16 TorchScript archive (with scalar extras): read it, as float32."""
  tok, cfg = ckpt["tok"], _cfg(ckpt["tok"])
  kwargs = dict(appended_tokens=tok.num_appended, cache_dir=str(tmp_path))
  half = checkpoint_io.load_clip(ckpt["paths"]["openai torchscript fp16"], cfg, **kwargs)[0]
  full = checkpoint_io.load_clip(ckpt["paths"]["safetensors"], cfg, **kwargs)[0]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(half), jax.tree.leaves(full)):
    assert a.dtype == np.float32
    if "token_embedding" in jax.tree_util.keystr(path):  # the appended row is a mean of rounded rows
      a, b = a[:-1], b[:-1]
    np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32), err_msg=jax.tree_util.keystr(path))


def test_appended_mask_row_is_the_mean_token_embedding(ckpt, tmp_path):
  tok = ckpt["tok"]
  params = checkpoint_io.load_clip(ckpt["paths"]["safetensors"], _cfg(tok), appended_tokens=1, cache_dir=str(tmp_path))[0]
  emb = params["text"]["token_embedding"]["embedding"]
  pretrained = ckpt["model"].text_model.embeddings.token_embedding.weight.detach().numpy()
  assert tok.mask_id == emb.shape[0] - 1 == pretrained.shape[0]
  np.testing.assert_array_equal(emb[:-1], pretrained)
  np.testing.assert_allclose(emb[-1], pretrained.mean(0), atol=1e-6)


def test_resize_pos_embed_is_torch_bilinear():
  """ViT-B/16 at 384×128: the 14×14 grid becomes 24×8 (up in height, down in width)."""
  pos = np.random.default_rng(0).normal(size=(1 + 14 * 14, 8)).astype(np.float32)
  grid = torch.from_numpy(pos[1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=(24, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, 8)
  out = checkpoint_io.resize_pos_embed(pos, (24, 8))
  assert out.shape == (1 + 24 * 8, 8)
  np.testing.assert_array_equal(out[0], pos[0])
  np.testing.assert_allclose(out[1:], ref.numpy(), atol=1e-6)


def test_non_square_input_matches_reference_with_resized_positions(ckpt, tmp_path):
  """48×16 input (grid 4×4 -> 6×2). transformers interpolates bicubically and only from/to
  square grids, so the reference model gets the field's resize (torch bilinear) in its place."""
  tok, model = ckpt["tok"], ckpt["model"]
  cfg = _cfg(tok, image_size=(48, 16))
  params = checkpoint_io.load_clip(ckpt["paths"]["safetensors"], cfg, appended_tokens=1, cache_dir=str(tmp_path))[0]
  emb = model.vision_model.embeddings
  pos = emb.position_embedding.weight.detach()
  grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
  resized = F.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(12, -1)
  emb.interpolate_pos_encoding = lambda embeddings, height, width: torch.cat([pos[:1], resized])[None]
  try:
    images, tokens = _inputs(tok, (48, 16))
    ours, ref = _features(cfg, params, images, tokens), _reference(model, images, tokens, interpolate=True)
  finally:
    del emb.interpolate_pos_encoding
  err = float(np.abs(ours[0] - ref[0]).max())
  print(f"48x16 image features: max abs error {err:.2e}")
  assert err <= 1e-4


@pytest.mark.slow  # compiles both towers twice
def test_bfloat16_compute_stays_close_to_float32(ckpt, tmp_path):
  tok = ckpt["tok"]
  params = checkpoint_io.load_clip(ckpt["paths"]["safetensors"], _cfg(tok), appended_tokens=1, cache_dir=str(tmp_path))[0]
  images, tokens = _inputs(tok)
  full, half = (jax.jit(clip.CLIP(_cfg(tok, dtype=d)).apply)({"params": params}, jnp.asarray(images),
                                                               jnp.asarray(tokens)) for d in ("float32", "bfloat16"))
  for name, a, b in zip(("image", "text"), full, half):
    err = float(jnp.abs(a - b).max())
    cos = float(jnp.min(jnp.sum(a * b, axis=-1)))
    print(f"bf16 vs fp32 {name}: max abs error {err:.2e} (L2-normalised), min cosine {cos:.5f}")
    assert err <= 1e-2 and cos >= 0.9995


def test_cache_is_read_and_a_changed_source_invalidates_it(ckpt, tmp_path):
  tok, cfg = ckpt["tok"], _cfg(ckpt["tok"])
  src = str(tmp_path / "clip")
  shutil.copytree(ckpt["paths"]["safetensors"], src)
  cache = str(tmp_path / "cache")
  load = lambda: checkpoint_io.load_clip(src, cfg, appended_tokens=1, cache_dir=cache)[0]  # noqa: E731
  first = load()
  key = checkpoint_io.cache_key(checkpoint_io.find_source(src), cfg, 1)
  assert os.listdir(cache) == [key]
  jax.tree.map(np.testing.assert_array_equal, load(), first)
  # The second load reads the cache: what is stored there is what comes back.
  marked = jax.tree.map(lambda x: x + 1.0, first)
  shutil.rmtree(os.path.join(cache, key, "params"))
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.join(cache, key, "params"), marked)
  jax.tree.map(np.testing.assert_array_equal, load(), marked)
  # A changed checkpoint has another key and is converted afresh.
  state = {k: v.contiguous() for k, v in ckpt["model"].state_dict().items()}
  state["text_projection.weight"] = state["text_projection.weight"] * 2
  save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
  changed = load()
  assert len(os.listdir(cache)) == 2
  np.testing.assert_allclose(changed["text"]["text_projection"], 2 * first["text"]["text_projection"], rtol=1e-6)
  # So does another model shape (here the input size, which resizes the position grid).
  checkpoint_io.load_clip(src, _cfg(tok, image_size=(48, 16)), appended_tokens=1, cache_dir=cache)[0]
  assert len(os.listdir(cache)) == 3


def _write_edited(ckpt, tmp_path, edit) -> str:
  folder = str(tmp_path / "edited")
  shutil.copytree(ckpt["paths"]["safetensors"], folder)
  state = {k: v.contiguous() for k, v in ckpt["model"].state_dict().items()}
  edit(state)
  save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  return folder


def test_missing_unexpected_and_misshaped_tensors_are_listed(ckpt, tmp_path):
  cfg = _cfg(ckpt["tok"])

  def drop_and_add(state):
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"], state["text_model.final_layer_norm.weight"]
    state["text_model.pooler.weight"] = torch.zeros(3)

  with pytest.raises(ValueError) as e:
    checkpoint_io.load_clip(_write_edited(ckpt, tmp_path, drop_and_add), cfg, appended_tokens=1,
                            cache_dir=str(tmp_path / "c"))[0]
  msg = str(e.value)
  assert ("missing tensors (2): text_model.final_layer_norm.weight, vision_model.encoder.layers.1.mlp.fc2.bias"
          in msg), msg
  assert "unexpected tensors (1): text_model.pooler.weight" in msg

  def reshape(state):
    state["text_model.encoder.layers.0.self_attn.k_proj.bias"] = torch.zeros(cc.WIDTH - 1)
    state["vision_model.embeddings.class_embedding"] = torch.zeros(cc.WIDTH + 2)

  shutil.rmtree(tmp_path / "edited")
  with pytest.raises(ValueError) as e:
    checkpoint_io.load_clip(_write_edited(ckpt, tmp_path, reshape), cfg, appended_tokens=1,
                            cache_dir=str(tmp_path / "c"))[0]
  msg = str(e.value)
  assert "mis-shaped: vision_model.embeddings.class_embedding [130] -> visual/class_embedding [130], " \
         "the model needs [128]" in msg, msg
  assert "text_model.encoder.layers.0.self_attn.k_proj.bias [127]" in msg
  assert not os.path.exists(tmp_path / "c") or not os.listdir(tmp_path / "c")  # nothing cached


@pytest.mark.parametrize("layout", ["safetensors", "openai state dict"])
def test_architecture_disagreements_are_refused_with_the_fix(ckpt, layout, tmp_path):
  tok = ckpt["tok"]
  with pytest.raises(ValueError) as e:
    checkpoint_io.load_clip(ckpt["paths"][layout], _cfg(tok, heads=4), appended_tokens=0, cache_dir=str(tmp_path))[0]
  msg = str(e.value)
  assert "model.vision.heads: config 4, checkpoint 2 (--config.model.vision.heads=2)" in msg, msg
  assert f"tokenizer: {tok.vocab_size} tokens (+0 appended)" in msg and "--config.data.tokenizer" in msg


def test_not_a_checkpoint_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a Hugging Face CLIP folder"):
    checkpoint_io.find_source(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such CLIP checkpoint, field checkpoint or dgia-jax training workdir"):
    checkpoint_io.find_source(str(tmp_path / "nothing"))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="pass the Hugging Face folder holding it"):
    checkpoint_io.find_source(str(tmp_path / "model.safetensors"))
  (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="weights.pt is not a readable PyTorch checkpoint"):
    checkpoint_io.read_checkpoint(checkpoint_io.find_source(str(tmp_path / "weights.pt")))


@pytest.mark.slow  # starts a program
def test_safetensors_loading_does_not_import_torch(ckpt, tmp_path):
  tok = ckpt["tok"]
  code = f"""
import sys
from dgia_jax.data.tokenizer import Tokenizer
from dgia_jax.training import train
from dgia_jax.models import checkpoint_io, clip
tok = Tokenizer.from_file({ckpt['paths']['safetensors']!r}, {cc.CONTEXT})
cfg = clip.CLIPConfig({cc.EMBED}, clip.VisionConfig(({cc.IMAGE}, {cc.IMAGE}), {cc.PATCH}, {cc.WIDTH}, {cc.LAYERS}, {cc.HEADS}),
                      clip.TextConfig(tok.vocab_size, {cc.CONTEXT}, {cc.WIDTH}, {cc.LAYERS}, {cc.HEADS}, tok.eot_id))
params = checkpoint_io.load_clip({ckpt['paths']['safetensors']!r}, cfg, appended_tokens=tok.num_appended,
                                 cache_dir={str(tmp_path)!r})[0]
assert params["text"]["token_embedding"]["embedding"].shape[0] == {tok.vocab_size}
assert "torch" not in sys.modules and "transformers" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
"""
  helpers.run_python(code)


@pytest.mark.slow  # trains
def test_training_starts_from_the_checkpoint(ckpt, tiny_config, tmp_path):
  """`model.init_from` replaces the random init; with a vanishing learning rate the trained
  parameters are still the checkpoint's (position grid resized to the 32×16 input)."""
  hf_dir, cache = ckpt["paths"]["safetensors"], str(tmp_path / "cache")
  cfg = tiny_config
  cfg.data.tokenizer, cfg.data.context_length = hf_dir, cc.CONTEXT
  cfg.model.update(dict(embed_dim=cc.EMBED, init_from=hf_dir, init_cache_dir=cache))
  for tower in (cfg.model.vision, cfg.model.text):
    tower.update(dict(width=cc.WIDTH, layers=cc.LAYERS, heads=cc.HEADS))
  cfg.loss.update(dict(lrc=False, gsrc=False))  # ITC and the masked-caption partners
  cfg.train.update(dict(epochs=1, lr=1e-12))
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  _, tok, model, params, _ = rebuild.load_trained(str(tmp_path / "run"))
  assert model.cfg.vision.grid == (4, 2) and tok.num_appended == 1
  expected = checkpoint_io.load_clip(hf_dir, model.cfg, appended_tokens=1, cache_dir=cache)[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, expected)


def test_clip_finetune_config_is_vit_b16_at_384x128():
  c = helpers.load_config("clip_finetune_synthetic")
  cfg = clip.config_from_dict(c.model, tuple(c.data.image_size), 49408 + 1, 49407, c.data.context_length)
  assert c.model.init_from == "" and cfg.vision.grid == (24, 8) and cfg.text.context_length == 77
  assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size) == (768, 12, 12, 16)
  assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.embed_dim) == (512, 12, 8, 512)
