"""The trainer end to end on the tiny synthetic set: curves, results, resume, devices, kills."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgia_jax import build, checkpointing, config_domains, inference, objective, optim, parallel, reporting, rundir, train
from dgia_jax import step as step_lib
from dgia_jax.data import datasets, pipeline
from tests import helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  cfg = helpers.tiny_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("run"))
  return cfg, workdir, train.train_and_evaluate(cfg, workdir)


def _records(workdir, kind, split=None):
  return [r for r in rundir.RunDir(workdir).records(kind) if split in (None, r.get("split"))]


def test_writes_results_curves_and_metrics(trained):
  cfg, workdir, results = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    saved = json.load(f)
  assert saved["final"] == results["final"]
  assert set(results["final"]["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
  assert [r["epoch"] for r in _records(workdir, "eval", "test")] == [1, 2]
  assert [r["epoch"] for r in _records(workdir, "eval", "val")] == [1, 2]
  losses = [r["loss"] for r in _records(workdir, "train")]
  assert len(losses) == results["steps"] == 2 * (64 // 16) and all(np.isfinite(losses))
  with open(os.path.join(workdir, rundir.CURVES_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_latest_checkpoint(trained, capsys):
  cfg, workdir, _ = trained
  cfg.train.epochs = 3
  results = train.train_and_evaluate(cfg, workdir)
  assert "resuming at step 8" in capsys.readouterr().out
  assert results["steps"] == 12
  assert [r["epoch"] for r in _records(workdir, "eval", "test")] == [1, 2, 3]
  steps = [r["step"] for r in _records(workdir, "train")]
  assert steps == list(range(1, 13))


def test_optimizer_gives_biases_twice_the_rate_and_no_decay():
  import jax.numpy as jnp
  import ml_collections

  tcfg = ml_collections.ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_epochs=0, warmup_factor=0.1, epochs=1,
                                        weight_decay=0.5, bias_lr_factor=2.0, b1=0.9, b2=0.999, eps=1e-8,
                                        grad_clip=0.0, schedule_per="step"))
  tx, _ = optim.make_optimizer(tcfg, steps_per_epoch=100)
  params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
  grads = {"dense": {"kernel": jnp.zeros(3), "bias": jnp.full(3, 1.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves by lr·sign(g): bias -2·lr, kernel driven only by the decay term.
  np.testing.assert_allclose(updates["dense"]["bias"], -0.2, rtol=1e-4)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1, rtol=1e-4)


_LOSSES = """
import json, sys
from tests import helpers
from dgia_jax import train
cfg = helpers.tiny_config({data_dir!r})
cfg.train.epochs = 1
cfg.eval.batch_size = 16
{extra}
train.train_and_evaluate(cfg, {workdir!r})
with open({workdir!r} + "/metrics.jsonl") as f:
  print("LOSSES", json.dumps([r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]))
"""


def _losses(out: str):
  return json.loads(out.split("LOSSES", 1)[1])


def test_eight_devices_give_the_losses_of_one(tmp_path, data_dir):
  one = helpers.run_python(_LOSSES.format(data_dir=data_dir, workdir=str(tmp_path / "one"), extra=""), devices=1)
  eight = helpers.run_python(_LOSSES.format(
      data_dir=data_dir, workdir=str(tmp_path / "eight"),
      extra="import jax; assert jax.device_count() == 8"), devices=8)
  np.testing.assert_allclose(_losses(eight.stdout), _losses(one.stdout), rtol=2e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, data_dir):
  code = _LOSSES.format(data_dir=data_dir, workdir=str(tmp_path), extra="cfg.train.batch_size = 12")
  with pytest.raises(AssertionError, match="train.batch_size=12 is not divisible by the 8 devices"):
    helpers.run_python(code, devices=8)


def _restore_latest(cfg, ckpt_dir):
  tokenizer, _ = datasets.load(cfg.data, ("test",))
  tx, _ = optim.make_optimizer(cfg.train, 4)
  mesh = parallel.make_mesh()
  template = step_lib.init_state(inference.build_model(cfg, tokenizer), tx, 0, 64, mesh)
  ckpt = checkpointing.Checkpointer(ckpt_dir, 1, 3)
  try:
    return ckpt.latest_step(), ckpt.restore(template)
  finally:
    ckpt.close()


def test_kill_during_checkpoint_writes_leaves_a_usable_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  code = _LOSSES.format(data_dir=data_dir, workdir=workdir,
                        extra="cfg.train.epochs = 40; cfg.checkpoint.every_steps = 1; cfg.checkpoint.keep = 3")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": helpers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=helpers.ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
      if sum(n.isdigit() for n in names) >= 2:
        break  # it saves every step, asynchronously: a write is (almost always) in flight now
      time.sleep(0.005)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  # A half-written step directory, as a kill mid-write leaves it, must be ignored too.
  os.makedirs(os.path.join(ckpt_dir, "99999.orbax-checkpoint-tmp-1"), exist_ok=True)
  with open(os.path.join(ckpt_dir, "99999.orbax-checkpoint-tmp-1", "junk"), "w") as f:
    f.write("partial")
  latest, restored = _restore_latest(helpers.tiny_config(data_dir), ckpt_dir)
  assert latest is not None and latest < 99999 and int(restored.step) == latest
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_load_trained_gives_the_final_parameters(trained):
  cfg, workdir, _ = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    results = json.load(f)  # the latest run in this workdir (another test may have resumed it)
  config, tokenizer, model, params, step = inference.load_trained(workdir)
  assert step == results["steps"] and config.train.batch_size == cfg.train.batch_size
  _, splits = datasets.load(config.data, ("test",))
  txt, img = inference.extract_features(inference.make_encoders(model, parallel.make_mesh()), params, splits["test"],
                                    parallel.make_mesh(), 16)
  from dgia_jax import metrics

  metrics = metrics.evaluate_retrieval(txt, img, splits["test"].pair_person_ids, splits["test"].person_ids)
  assert metrics["t2i"] == pytest.approx(results["final"]["t2i"], abs=1e-3)


def _one_step(cfg, pair_pids_of, pseudo_ids_of=None):
  """Parameters and counts after one step of the tiny config's second epoch (all losses on).

  `pseudo_ids_of(split)`, if given, sets the pairs' pseudo identities (relations.clusters)."""
  mesh = parallel.make_mesh()
  tokenizer, splits = datasets.load(cfg.data, ("train",))
  split = splits["train"]
  order = pipeline.EpochOrder(split.num_pairs, cfg.train.batch_size, cfg.seed)
  built = build.training(cfg, tokenizer, order.steps_per_epoch, split.num_pairs, mesh)
  state = built.state
  rows = state.bank.size
  if pseudo_ids_of is not None:
    pseudo = np.full(rows, -1, np.int32)
    pseudo[:split.num_pairs] = pseudo_ids_of(split)
    state = state.replace(pseudo_ids=jnp.asarray(pseudo))
    built.step = step_lib.make_train_step(built.objective, built.tx, built.schedule, step_lib.shardings(state, mesh))
  pids = np.full(rows, -1, np.int32)
  pids[:split.num_pairs] = pair_pids_of(split)
  start = order.steps_per_epoch  # epoch 2: the global loss is on
  state = state.replace(step=jnp.asarray(start, jnp.int32))
  batches = pipeline.train_batches(split, order, start_step=start, end_step=start + 2, num_threads=2)
  for batch in batches:
    state, metrics, counts = built.step(state, parallel.to_global(batch, mesh), jnp.asarray(pids))
  return state, metrics, counts


def test_losses_read_person_ids_only_as_the_oracle(tiny_config):
  true = lambda s: s.pair_person_ids  # noqa: E731
  shuffled = lambda s: np.random.default_rng(0).permutation(s.pair_person_ids)  # noqa: E731
  a, metrics, _ = _one_step(tiny_config, true)
  b, _, _ = _one_step(tiny_config, shuffled)
  assert {"loss_itc", "loss_lrc", "loss_iasc", "loss_gsrc"} <= set(metrics) and float(metrics["loss_gsrc"]) > 0
  for x, y in zip(jax.tree.leaves((a.params, a.bank)), jax.tree.leaves((b.params, b.bank))):
    np.testing.assert_array_equal(x, y)
  tiny_config.relations.oracle = True
  c, _, counts = _one_step(tiny_config, true)
  d, _, _ = _one_step(tiny_config, shuffled)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(c.params), jax.tree.leaves(d.params)))
  # With true ids as the relations, every same-person pair is related and nothing else.
  assert counts["lrc_pred"] == counts["lrc_hit"] == counts["lrc_same"]


def test_cluster_relations_replace_or_join_the_agreement_relations(tiny_config):
  true = lambda s: s.pair_person_ids  # noqa: E731
  tiny_config.relations.clusters.enabled = True
  tiny_config.relations.clusters.mode = "replace"
  _, _, counts = _one_step(tiny_config, true, pseudo_ids_of=true)
  assert counts["lrc_pred"] == counts["lrc_hit"] == counts["lrc_same"] > 0  # exactly the clusters
  _, _, none = _one_step(tiny_config, true, pseudo_ids_of=lambda s: np.full(s.num_pairs, -1))
  assert none["lrc_pred"] == 0  # outliers (-1) relate to nothing
  tiny_config.relations.clusters.mode = "or"
  tiny_config.relations.image_threshold = tiny_config.relations.text_threshold = -1.0  # agreement: all related
  _, _, both = _one_step(tiny_config, true, pseudo_ids_of=true)
  assert both["lrc_pred"] == 16 * 15


def _relation_aux(cfg):
  """The objective's aux on one training batch of the tiny set, relations switched on."""
  mesh = parallel.make_mesh()
  tokenizer, splits = datasets.load(cfg.data, ("train",))
  split = splits["train"]
  order = pipeline.EpochOrder(split.num_pairs, cfg.train.batch_size, cfg.seed)
  batch = next(pipeline.train_batches(split, order, start_step=0, end_step=1, num_threads=2))
  model = inference.build_model(cfg, tokenizer)
  params = model.init(jax.random.key(0), np.zeros((1, *cfg.data.image_size, 3), np.float32),
                      np.zeros((1, cfg.data.context_length), np.int32))["params"]
  obj = objective.Objective.from_config(cfg, model, tokenizer.mask_id, order.steps_per_epoch, mesh)
  _, _, aux = obj(params, jax.tree.map(jnp.asarray, batch), jnp.int32(0), pair_pids=jnp.asarray(split.pair_person_ids))
  return aux


def test_perturbed_partners_take_the_clean_pairs_relations_or_their_own(tiny_config):
  from dgia_jax import losses

  tiny_config.loss.update(dict(lrc=False, gsrc=False))
  aux = _relation_aux(tiny_config)
  sims = np.asarray(aux["img"] @ aux["img"].T)
  # Thresholds at the median cosine: about half the clean pairs are related.
  th_v, th_t = float(np.median(sims)), float(np.median(np.asarray(aux["txt"] @ aux["txt"].T)))
  tiny_config.relations.update(dict(image_threshold=th_v, text_threshold=th_t))
  tiny_config.iasc.relations = "clean"
  aux = _relation_aux(tiny_config)
  clean = np.asarray(losses.agreement_relations(aux["img"], aux["txt"], th_v, th_t))
  np.testing.assert_array_equal(aux["iasc_related"], clean)
  assert 0 < clean.sum() < clean.size
  tiny_config.iasc.relations = "perturbed"
  assert not np.array_equal(_relation_aux(tiny_config)["iasc_related"], clean)
  tiny_config.iasc.relations = "masked"
  with pytest.raises(ValueError, match="iasc.relations"):
    config_domains.check(tiny_config)


def test_fine_tuning_starts_from_a_run_with_its_tokenizer(trained, tiny_config, tmp_path):
  """`model.init_from` = a training workdir: its final parameters are the start, and its
  tokenizer (not the new data set's own) encodes the captions and is recorded in the config."""
  pre_cfg, pre_dir, _ = trained
  cfg = tiny_config
  cfg.data.synthetic.seed = 1  # another build: identities, captions and its own tokenizer differ
  cfg.model.init_from = pre_dir
  cfg.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  cfg.train.update(dict(epochs=1, lr=1e-12))
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  saved, tok, _, params, _ = inference.load_trained(str(tmp_path / "run"))
  own = datasets.tokenizer_path(cfg.data, datasets.get_builder(cfg.data, prepare=False))
  assert saved.data.tokenizer == inference.run_tokenizer_path(pre_dir) != own
  captions = ["a woman wearing a red coat and black trousers"]
  np.testing.assert_array_equal(tok.encode(captions), inference.load_trained(pre_dir)[1].encode(captions))
  _, _, _, start, _ = inference.load_trained(pre_dir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, start)
  cfg.model.text.width = 48  # a model the run's weights do not fit
  with pytest.raises(ValueError, match="text/.* is .* there, the config's model has"):
    train.train_and_evaluate(cfg, str(tmp_path / "other"))


def test_relation_counts_hand_computed():
  aux = {"lrc_related": jnp.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], bool),
         "gsrc_rows": jnp.array([[3, 4], [0, 2], [4, 1]]), "gsrc_valid": jnp.array([[1, 1], [0, 0], [1, 0]], bool),
         "gsrc_edges": jnp.array([[0.7, 0.8], [-jnp.inf, -jnp.inf], [0.6, -jnp.inf]])}
  pair_pids = jnp.array([5, 5, 6, 5, 6])
  counts = jax.device_get(objective.relation_counts(aux, jnp.array([0, 1, 2]), pair_pids))
  # In batch: pids 5, 5, 6. Predicted off-diagonal: (0,1), (1,0), (1,2), (2,1) -> 2 hits of 2 same.
  assert (counts["lrc_pred"], counts["lrc_hit"], counts["lrc_same"]) == (4, 2, 2)
  # Global: anchor 0 (pid 5) -> rows 3 (5), 4 (6); anchor 2 (pid 6) -> row 4 (6).
  assert (counts["gsrc_pred"], counts["gsrc_hit"], counts["gsrc_anchors"]) == (3, 2, 2)
  summary = objective.summarize_relations(counts)
  assert summary["lrc_precision"] == 50.0 and summary["lrc_recall"] == 100.0
  assert summary["gsrc_precision"] == pytest.approx(200 / 3) and summary["gsrc_mean_weight"] == pytest.approx(0.7)


def test_memory_bank_is_checkpointed_and_restored(trained):
  cfg, workdir, _ = trained
  _, restored = _restore_latest(cfg, os.path.join(workdir, "checkpoints"))
  assert restored.bank is not None and bool(restored.bank.filled[:64].all())
  assert restored.bank.image.sharding == parallel.data_sharding(parallel.make_mesh())
  norms = np.linalg.norm(np.asarray(restored.bank.image)[:64], axis=1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_best_epoch_is_selected_on_validation_identities_only(trained):
  cfg, workdir, _ = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    results = json.load(f)
  vals = _records(workdir, "eval", "val")
  best = max(vals, key=lambda r: r["t2i"]["R1"])
  assert results["best_val"]["epoch"] == best["epoch"] and results["best_val"]["val"]["t2i"] == best["t2i"]
  test_at_best = next(r for r in _records(workdir, "eval", "test") if r["step"] == best["step"])
  assert results["best_val"]["test"]["t2i"] == test_at_best["t2i"]
  step, _ = checkpointing.Checkpointer(os.path.join(workdir, rundir.BEST_DIR), 1, 1).restore_raw()
  assert step == best["step"]


def test_without_test_curves_the_best_epoch_is_evaluated_from_its_checkpoint(tmp_path, tiny_config):
  tiny_config.eval.test_each_epoch = False
  tiny_config.train.epochs = 3
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  tests = _records(str(tmp_path), "eval", "test")
  assert tests[0]["epoch"] == 3 and tests[0]["step"] == 12  # the last epoch, always evaluated
  best = results["best_val"]
  assert best["test"]["t2i"] == next(r for r in tests if r["epoch"] == best["epoch"])["t2i"]


def test_identities_held_out_of_train_become_the_validation_split(tiny_config):
  tiny_config.data.holdout_val_ids = 3
  _, splits = datasets.load(tiny_config.data, ("train", "val"))
  train_ids, val_ids = set(splits["train"].person_ids), set(splits["val"].person_ids)
  assert len(val_ids) == 3 and not train_ids & val_ids and len(train_ids) == 13
  assert splits["val"].num_pairs == 3 * 2 * 2 and splits["train"].num_pairs == 13 * 2 * 2
  full = datasets.load(helpers.tiny_config(tiny_config.data.data_dir).data, ("train",))[1]["train"]
  held = np.flatnonzero(np.isin(full.person_ids, list(val_ids)))
  np.testing.assert_array_equal(splits["val"].load_image(0), full.load_image(int(held[0])))
  held_pairs = np.isin(full.pair_record, held)
  np.testing.assert_array_equal(splits["val"].tokens, full.tokens[held_pairs])
  np.testing.assert_array_equal(splits["val"].pair_person_ids, full.pair_person_ids[held_pairs])


_PRETRAIN_CONFIG = """
from tests import helpers

def get_config():
  c = helpers.tiny_config({data_dir!r})
  c.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  c.train.epochs = 1
  return c
"""


def test_a_missing_initial_run_is_trained_first_then_reused(tiny_config, tmp_path, capsys):
  """`model.init_config`: the run `model.init_from` names is trained first (stage 1), once."""
  config_file = tmp_path / "pretrain.py"
  config_file.write_text(_PRETRAIN_CONFIG.format(data_dir=tiny_config.data.data_dir))
  pre = str(tmp_path / "pre")
  tiny_config.model.update(dict(init_from=pre, init_config=str(config_file)))
  tiny_config.train.epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path / "fine"))
  out = capsys.readouterr().out
  assert f"stage 1: training {pre} with {config_file}" in out and "stage 2:" in out
  stage1 = rundir.RunDir(pre)
  assert stage1.read_config().loss.lrc is False and stage1.read_results()["steps"] == 4
  fine = rundir.RunDir(str(tmp_path / "fine")).read_config()
  assert fine.data.tokenizer == inference.run_tokenizer_path(pre)  # stage 2 reads tokens as stage 1 did
  stamp = os.path.getmtime(stage1.results)
  train.train_and_evaluate(tiny_config, str(tmp_path / "fine_again"))
  assert "stage 1" not in capsys.readouterr().out and os.path.getmtime(stage1.results) == stamp


def _tensorboard_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} read back from the run's TensorBoard event files (TFRecord framing: length,
  its CRC, the Event proto, its CRC), later files overriding earlier ones as TensorBoard shows them."""
  import struct

  from tensorboardX.proto import event_pb2

  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_shows_the_loss_terms_rate_relations_and_every_evaluation(trained):
  _, workdir, _ = trained
  scalars = _tensorboard_scalars(workdir)
  for tag in ("train/loss", "train/loss_itc", "train/loss_lrc", "train/loss_iasc", "train/loss_gsrc", "train/lr",
              "train/lrc_precision", "relations/lrc_precision", "relations/gsrc_precision", "test/t2i/R1",
              "test/t2i/mAP", "val/t2i/R1", "val/i2t/mINP"):
    assert tag in scalars, (tag, sorted(scalars))
  checked = 0
  for record in rundir.RunDir(workdir).records():
    for tag, value in reporting.tensorboard_scalars(record).items():
      assert scalars[tag][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, record["step"])
      checked += 1
  assert checked > 100


def test_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
  helpers.run_python(f"""
import sys
from dgia_jax import reporting
writer = reporting.summary_writer({str(tmp_path)!r}, None)
writer.add_scalar("train/loss", 1.5, 1)
writer.close()
assert "torch" not in sys.modules
import torch  # hidden only while tensorboardX was imported
assert torch.zeros(1).shape == (1,)
""")
