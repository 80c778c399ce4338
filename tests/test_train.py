"""The trainer end to end on the tiny synthetic set: curves, results, resume, devices, kills."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dgia_jax.common import parallel
from dgia_jax.data import datasets
from dgia_jax.inference import rebuild
from dgia_jax.run import checkpointing, rundir
from dgia_jax.training import optim, train
from dgia_jax.training import step as step_lib
from tests import helpers

pytestmark = pytest.mark.slow  # trains or starts programs


def test_writes_results_curves_and_metrics(trained):
  cfg, workdir, results = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    saved = json.load(f)
  assert saved["final"] == results["final"]
  assert set(results["final"]["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
  assert [r["epoch"] for r in helpers.records(workdir, "eval", "test")] == [1, 2]
  assert [r["epoch"] for r in helpers.records(workdir, "eval", "val")] == [1, 2]
  losses = [r["loss"] for r in helpers.records(workdir, "train")]
  assert len(losses) == results["steps"] == 2 * (64 // 16) and all(np.isfinite(losses))
  with open(os.path.join(workdir, rundir.CURVES_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_latest_checkpoint(trained, capsys):
  cfg, workdir, _ = trained
  cfg.train.epochs = 3
  results = train.train_and_evaluate(cfg, workdir)
  assert "resuming at step 8" in capsys.readouterr().out
  assert results["steps"] == 12
  assert [r["epoch"] for r in helpers.records(workdir, "eval", "test")] == [1, 2, 3]
  steps = [r["step"] for r in helpers.records(workdir, "train")]
  assert steps == list(range(1, 13))


_LOSSES = """
import json, sys
from tests import helpers
from dgia_jax.training import train
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


def test_eight_devices_give_the_losses_of_one(tmp_path, data_dir, trained):
  """The tiny config's two epochs (the second with every loss) on 8 devices, against the session's
  one-device run of the same config (`trained`; its first 8 steps, whatever a later test resumed)."""
  one = [r["loss"] for r in helpers.records(trained[1], "train") if r["step"] <= 8]
  eight = helpers.run_python(_LOSSES.format(
      data_dir=data_dir, workdir=str(tmp_path / "eight"),
      extra="cfg.train.epochs = 2; import jax; assert jax.device_count() == 8"), devices=8)
  assert len(one) == 8
  np.testing.assert_allclose(_losses(eight.stdout), one, rtol=2e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, data_dir):
  code = _LOSSES.format(data_dir=data_dir, workdir=str(tmp_path), extra="cfg.train.batch_size = 12")
  with pytest.raises(AssertionError, match="train.batch_size=12 is not divisible by the 8 devices"):
    helpers.run_python(code, devices=8)


def _restore_latest(cfg, ckpt_dir):
  tokenizer, _ = datasets.load(cfg.data, ("test",))
  tx, _ = optim.make_optimizer(cfg.train, 4)
  mesh = parallel.make_mesh()
  template = step_lib.init_state(rebuild.build_model(cfg, tokenizer), tx, 0, 64, mesh)
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
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.DEVNULL,
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


def test_memory_bank_is_checkpointed_and_restored(trained):
  cfg, workdir, _ = trained
  _, restored = _restore_latest(cfg, os.path.join(workdir, "checkpoints"))
  assert restored.bank is not None and bool(restored.bank.filled[:64].all())
  assert restored.bank.image.sharding == parallel.data_sharding(parallel.make_mesh())
  norms = np.linalg.norm(np.asarray(restored.bank.image)[:64], axis=1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


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
  train.train_initial_run(tiny_config)  # as the main job does before it trains the config
  train.train_and_evaluate(tiny_config, str(tmp_path / "fine"))
  out = capsys.readouterr().out
  assert f"stage 1: training {pre} with {config_file}" in out and "stage 2:" in out
  stage1 = rundir.RunDir(pre)
  assert stage1.read_config().loss.lrc is False and stage1.read_results()["steps"] == 4
  fine = rundir.RunDir(str(tmp_path / "fine")).read_config()
  assert fine.data.tokenizer == rebuild.run_tokenizer_path(pre)  # stage 2 reads tokens as stage 1 did
  stamp = os.path.getmtime(stage1.results)
  train.train_and_evaluate(tiny_config, str(tmp_path / "fine_again"))
  assert "stage 1" not in capsys.readouterr().out and os.path.getmtime(stage1.results) == stamp
