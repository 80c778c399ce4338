"""The field's trained models in and out: a checkpoint as IRRA's and DGCMIA's code writes it (a torch
pickle, the towers under `base_model.` in float16 as `convert_weights` leaves them, a non-square
trained position grid, DGCMIA's memory banks, an MLM head and a classifier) loads, gives a torch
forward's features, and every program reads it; a run written back in the field's formats reads
back bit for bit, and as a Hugging Face folder transformers loads."""

import functools
import importlib.util
import json
import os
import shutil
import time

import httpx
import jax
import numpy as np
import pytest
import torch
import transformers

from dgia_jax.common import errors, parallel
from dgia_jax.data import datasets, field_text
from dgia_jax.inference import encoding, formats, rebuild
from dgia_jax.models import checkpoint_io, clip
from dgia_jax.run import rundir
from dgia_jax.training import train
from tests import benchmark_fixtures, helpers
from tests import clip_checkpoints as cc

pytestmark = pytest.mark.slow

GRID = (4, 2)  # a 32x16 input at patch 8: the trained, non-square grid
_FP16 = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
         "c_fc.bias", "c_proj.weight", "c_proj.bias")


@pytest.fixture(scope="module")
def bpe():
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("OpenAI's clip package (its BPE file) is not installed; make test installs it")
  return os.path.join(spec.submodule_search_locations[0], field_text.OPENAI_BPE_FILE)


def _config(data_dir: str, bpe: str, image_size=(32, 16)):
  """The tiny CLIP of tests/clip_checkpoints.py as a dgia-jax config, on the field's text pipeline."""
  c = helpers.tiny_config(data_dir)
  c.data.update(dict(image_size=image_size, context_length=cc.CONTEXT, text_pipeline="irra", tokenizer=bpe))
  c.model.embed_dim = cc.EMBED
  c.model.vision.update(dict(patch_size=cc.PATCH, width=cc.WIDTH, layers=cc.LAYERS, heads=cc.HEADS))
  c.model.text.update(dict(width=cc.WIDTH, layers=cc.LAYERS, heads=cc.HEADS))
  return c


def _field_weights(seed: int = 0):
  """A random HF CLIP of the field's vocabulary, its float16 tensors rounded as `convert_weights` stores
  them, and its towers in the field's layout with a trained 4x2 position grid."""
  model = cc.hf_clip(field_text.VOCAB_SIZE, field_text.EOT_ID, seed)
  state = cc.openai_state_dict(model.state_dict())
  del state["logit_scale"]  # the field's code keeps it unsaved
  state["visual.positional_embedding"] = torch.randn(1 + GRID[0] * GRID[1], cc.WIDTH) * 0.05
  for name in state:
    if name.endswith(_FP16) or name in ("text_projection", "visual.proj"):
      state[name] = state[name].half()
  return model, state


def _write_field_checkpoint(path: str, state: dict) -> None:
  """The file the field's `Checkpointer.save("best", ...)` writes, with DGCMIA's banks, IRRA's MLM head
  and classifier beside the towers, and the optimizer and epoch entries."""
  model = {checkpoint_io.FIELD_PREFIX + k: v for k, v in state.items()}
  model["img_memory"] = torch.randn(40, cc.EMBED).half()
  model["txt_memory"] = torch.randn(40, cc.EMBED).half()
  model["mlm_head.dense.weight"] = torch.randn(cc.EMBED, cc.EMBED).half()
  model["mlm_head.ln.weight"] = torch.ones(cc.EMBED)
  model["classifier.weight"] = torch.randn(7, cc.EMBED).half()
  torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7},
              "num_epoch": 40, "iteration": 0, "epoch": 7}, path)


def _torch_features(state: dict, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Projected features [B, D] of a torch forward of the field's towers: transformers' CLIP layers,
  with the non-square trained position table added as it is (float32 compute on the stored values)."""
  model = cc.hf_clip(field_text.VOCAB_SIZE, field_text.EOT_ID)
  hf = {}
  for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
    for i in range(cc.LAYERS):
      o, h = f"{prefix}transformer.resblocks.{i}.", f"{tower}.encoder.layers.{i}."
      for part in ("weight", "bias"):
        for n, chunk in zip("qkv", state[f"{o}attn.in_proj_{part}"].float().chunk(3)):
          hf[f"{h}self_attn.{n}_proj.{part}"] = chunk
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
          hf[f"{h}{theirs}.{part}"] = state[f"{o}{ours}.{part}"].float()
  for part in ("weight", "bias"):
    hf[f"vision_model.pre_layrnorm.{part}"] = state[f"visual.ln_pre.{part}"].float()
    hf[f"vision_model.post_layernorm.{part}"] = state[f"visual.ln_post.{part}"].float()
    hf[f"text_model.final_layer_norm.{part}"] = state[f"ln_final.{part}"].float()
  hf["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"].float()
  hf["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"].float()
  hf["visual_projection.weight"] = state["visual.proj"].float().T
  hf["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"].float()
  hf["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"].float()
  hf["text_projection.weight"] = state["text_projection"].float().T
  model.load_state_dict(hf, strict=False)
  with torch.no_grad():
    pixels = torch.from_numpy(np.asarray(clip.normalize_images(images))).permute(0, 3, 1, 2)
    vm = model.vision_model
    patches = vm.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([vm.embeddings.class_embedding.expand(len(pixels), 1, -1), patches], 1)
    x = vm.pre_layrnorm(x + state["visual.positional_embedding"].float()[None])
    x = vm.encoder(inputs_embeds=x).last_hidden_state
    img = model.visual_projection(vm.post_layernorm(x[:, 0]))
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output
  return img.numpy(), txt.numpy()


@pytest.fixture(scope="module")
def field(tmp_path_factory, data_dir, bpe):
  root = tmp_path_factory.mktemp("field")
  _, state = _field_weights()
  path = str(root / "best.pth")
  _write_field_checkpoint(path, state)
  return path, state, _config(data_dir, bpe)


def test_a_field_checkpoint_loads_and_gives_a_torch_forwards_features(field):
  path, state, config = field
  run = rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(path, config))
  assert run.step == 7 and run.tokenizer.num_appended == 0 and run.model.cfg.text.vocab_size == 49408
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 16, 3)).astype(np.uint8)
  tokens = run.tokenizer.encode(["a woman in a red coat", "the man with a black backpack &amp; jeans", "jekyll"])
  ours = [np.asarray(jax.jit(functools.partial(run.model.apply, method=method))({"params": run.params}, x))
          for x, method in ((clip.normalize_images(images), lambda m, x: m.visual(x)),
                            (tokens, lambda m, t: m.text(t)))]
  theirs = _torch_features(state, images.astype(np.float32), tokens)
  for a, b in zip(ours, theirs):
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), np.abs(a - b).max()
  # float16 tensors became float32 exactly; the trained grid is taken as it is.
  np.testing.assert_array_equal(np.asarray(run.params["visual"]["positional_embedding"]),
                                state["visual.positional_embedding"].float().numpy())
  np.testing.assert_array_equal(np.asarray(run.params["visual"]["conv1"]["kernel"]),
                                state["visual.conv1.weight"].float().numpy().transpose(2, 3, 1, 0))
  _, tensors, info = checkpoint_io.read_checkpoint(checkpoint_io.find_source(path))
  assert sorted(info.skipped) == ["classifier.weight", "img_memory", "mlm_head.dense.weight", "mlm_head.ln.weight",
                                  "txt_memory"]
  assert info.epoch == 7 and info.logit_scale is None and "no logit scale stored" in info.describe()


def test_a_field_checkpoint_of_another_shape_or_no_checkpoint_at_all_is_named(field, tmp_path):
  path, _, config = field
  wide = config.copy_and_resolve_references()
  wide.model.vision.width, wide.data.image_size = 64, (32, 32)
  with pytest.raises(errors.ConfigError) as e:
    rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(path, wide))
  assert "model.vision.width: config 64, checkpoint 128 (--config.model.vision.width=128)" in str(e.value)
  assert "data.image_size: the checkpoint's trained position grid has 8 positions" in str(e.value)
  assert "--config.data.image_size=32,16" in str(e.value)
  hf_text = config.copy_and_resolve_references()
  hf_text.data.text_pipeline = "hf"
  with pytest.raises(errors.UserError):
    rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(path, hf_text))
  (tmp_path / "notes.pth").write_bytes(b"not a checkpoint at all")
  with pytest.raises(errors.BadInputError, match="notes.pth is not a readable PyTorch checkpoint"):
    rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(str(tmp_path / "notes.pth"), config))
  data = open(path, "rb").read()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.BadInputError, match="cut.pth is not a readable PyTorch checkpoint"):
    rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(str(tmp_path / "cut.pth"), config))
  proc = helpers.run_module("dgia_jax.tools.evaluate", "--checkpoint", str(tmp_path / "cut.pth"),
                            f"--config.data.tokenizer={config.data.tokenizer}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "cut.pth" in proc.stderr


def _config_file(tmp_path, config) -> str:
  path = tmp_path / "field_config.py"
  path.write_text("import json\nimport ml_collections\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
  return str(path)


def test_field_checkpoint_programs_evaluate_export_search_and_serve(field, tmp_path):
  path, _, config = field
  root = str(tmp_path / "RSTPReid")
  benchmark_fixtures.write_fixture(root, "rstpreid")
  cfg_file = _config_file(tmp_path, config)
  common = ["--checkpoint", path, "--config", cfg_file]
  proc = helpers.run_module("dgia_jax.tools.evaluate", *common, "--dataset", "rstpreid", "--manual_dir", root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rstpreid test:" in proc.stdout and "DGCMIA (published)" in proc.stdout and "IRRA (published)" in proc.stdout
  written = json.load(open(os.path.splitext(path)[0] + "-rstpreid-test.json"))
  assert written["checkpoint"] == path and written["published"]["DGCMIA"]["R1"] == 61.30
  crops = tmp_path / "crops"
  crops.mkdir()
  for i in range(4):
    (crops / f"c{i}.png").write_bytes(open(os.path.join(root, "imgs", os.listdir(os.path.join(root, "imgs"))[i]), "rb").read())
  emb = str(tmp_path / "emb")
  proc = helpers.run_module("dgia_jax.tools.export", *common, "--images", str(crops), "--out", emb)
  assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = json.load(open(os.path.join(emb, "manifest.json")))
  assert manifest["checkpoint"] == path and manifest["workdir"] == "" and manifest["step"] == 7
  proc = helpers.run_module("dgia_jax.tools.search", "--emb", emb, "--query", "a man in a red coat", "-k", "2")
  assert proc.returncode == 0 and proc.stdout.count("person ?") == 2, proc.stderr[-3000:]
  split_emb, report = str(tmp_path / "split_emb"), str(tmp_path / "report")
  proc = helpers.run_module("dgia_jax.tools.export", *common, "--split", "test", "--out", split_emb)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = helpers.run_module("dgia_jax.tools.report", "--emb", split_emb, "--out", report, "--num_queries", "2", "-k", "2")
  assert proc.returncode == 0 and os.path.isfile(os.path.join(report, "report.html")), proc.stderr[-3000:]
  port = helpers.free_port()
  server = helpers.run_module("dgia_jax.tools.serve", "--emb", emb, "--port", str(port), background=True)
  try:
    for _ in range(240):
      try:
        answer = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"q": "a man", "k": 3}, timeout=5)
        break
      except httpx.HTTPError:
        assert server.poll() is None, server.stdout.read()[-3000:]
        time.sleep(0.5)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 3
  finally:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def field_run(tmp_path_factory, data_dir, bpe):
  """A tiny dgia-jax run on the field's text pipeline at a square 32x32 input (one epoch)."""
  config = _config(data_dir, bpe, image_size=(32, 32))
  config.train.epochs = 1
  workdir = str(tmp_path_factory.mktemp("field_run"))
  train.train_and_evaluate(config, workdir)
  return workdir, config


# The keys IRRA's and DGCMIA's `build_model` makes for this architecture (2 layers per tower), in
# their state_dict's order: what `--format irra` writes.
FIELD_KEYS = (
    ["positional_embedding", "text_projection", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
     "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"]
    + [f"visual.transformer.resblocks.{i}.{n}" for i in range(2) for n in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
        "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
        "ln_2.bias")]
    + ["visual.ln_post.weight", "visual.ln_post.bias"]
    + [f"transformer.resblocks.{i}.{n}" for i in range(2) for n in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
        "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
        "ln_2.bias")]
    + ["token_embedding.weight", "ln_final.weight", "ln_final.bias"])


def test_field_checkpoint_round_trip_run_to_irra_to_run_is_bit_identical(field_run, tmp_path):
  workdir, config = field_run
  run = rebuild.load_trained(workdir)
  out = str(tmp_path / "best.pth")
  proc = helpers.run_module("dgia_jax.tools.export_model", "--workdir", workdir, "--format", "irra", "--out", out)
  # float16 as `convert_weights` leaves them: 8 linear weights and biases in each of the 4 blocks, conv1,
  # visual.proj and text_projection
  assert proc.returncode == 0 and f"{len(FIELD_KEYS)} tensors under base_model. (35 float16)" in proc.stdout, \
      proc.stderr[-3000:]
  assert "Warning" not in proc.stderr, proc.stderr[-3000:]
  saved = torch.load(out, weights_only=True)["model"]
  assert list(saved) == [checkpoint_io.FIELD_PREFIX + k for k in FIELD_KEYS]
  assert saved["base_model.visual.positional_embedding"].shape == (1 + 4 * 4, cc.WIDTH)
  assert saved["base_model.token_embedding.weight"].shape == (49408, cc.WIDTH)
  assert saved["base_model.visual.conv1.weight"].dtype == torch.float16
  assert saved["base_model.ln_final.weight"].dtype == torch.float32
  full = str(tmp_path / "best_fp32.pth")
  formats.write_irra(run, full, fp16=False)
  back = rebuild.load_field_checkpoint(rebuild.FieldCheckpoint(full, config))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(run.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_field_checkpoint_run_to_hf_gives_transformers_the_same_features(field_run, tmp_path):
  workdir, config = field_run
  run = rebuild.load_trained(workdir)
  out = str(tmp_path / "hf")
  proc = helpers.run_module("dgia_jax.tools.export_model", "--workdir", workdir, "--format", "hf", "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = transformers.CLIPModel.from_pretrained(out).eval()
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  tokens = run.tokenizer.encode(["a woman in a red coat", "a man with a bag"])
  encoders = encoding.make_encoders(run.model, parallel.make_mesh())
  ours_img = np.asarray(encoders[0](run.params, images))
  ours_txt = np.asarray(encoders[1](run.params, tokens))
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(np.asarray(clip.normalize_images(images))).permute(0, 3, 1, 2))
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long())
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(unit(img.pooler_output.numpy()), ours_img, atol=1e-5)
  np.testing.assert_allclose(unit(txt.pooler_output.numpy()), ours_txt, atol=1e-5)


def test_fine_tuning_from_a_field_checkpoint_records_it(field, tmp_path):
  path, _, config = field
  config = config.copy_and_resolve_references()
  config.model.init_from, config.train.epochs = path, 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  (init,) = rundir.RunDir(workdir).records("init")
  assert init["field_checkpoint"] == path and init["epoch"] == 7 and len(init["skipped"]) == 5
  assert datasets.get_tokenizer(rundir.RunDir(workdir).read_config().data).mask_id == 49405
  shutil.rmtree(workdir)
