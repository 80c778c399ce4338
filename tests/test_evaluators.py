"""Evaluators from config, the best-epoch policy, and a checkpoint's evaluation (tools.evaluate)."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from dgia_jax.common import errors, parallel
from dgia_jax.data import datasets
from dgia_jax.evaluation import evaluators, retrieval
from dgia_jax.gallery import exports, searcher
from dgia_jax.inference import encoding, rebuild
from dgia_jax.run import checkpointing, reporting, rundir
from dgia_jax.training import train
from tests import benchmark_fixtures, helpers


def test_best_epoch_is_selected_on_validation_identities_only(trained):
  cfg, workdir, _ = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    results = json.load(f)
  vals = helpers.records(workdir, "eval", "val")
  best = max(vals, key=lambda r: r["t2i"]["R1"])
  assert results["best_val"]["epoch"] == best["epoch"] and results["best_val"]["val"]["t2i"] == best["t2i"]
  test_at_best = next(r for r in helpers.records(workdir, "eval", "test") if r["step"] == best["step"])
  assert results["best_val"]["test"]["t2i"] == test_at_best["t2i"]
  step, _ = checkpointing.Checkpointer(os.path.join(workdir, rundir.BEST_DIR), 1, 1).restore_raw()
  assert step == best["step"]


@pytest.mark.slow  # trains
def test_without_test_curves_the_best_epoch_is_evaluated_from_its_checkpoint(tmp_path, tiny_config):
  tiny_config.evals.test.every = "last"
  tiny_config.train.epochs = 3
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  tests = helpers.records(str(tmp_path), "eval", "test")
  assert tests[0]["epoch"] == 3 and tests[0]["step"] == 12  # the last epoch, always evaluated
  best = results["best_val"]
  assert best["test"]["t2i"] == next(r for r in tests if r["epoch"] == best["epoch"])["t2i"]


def _figures(result: dict) -> dict:
  return {k: result[k] for k in ("t2i", "i2t")}


def test_evaluate_run_gives_the_trainers_figures(tiny_run):
  with open(os.path.join(tiny_run, rundir.RESULTS_FILE)) as f:
    results = json.load(f)
  latest = evaluators.evaluate_run(tiny_run)
  assert {k: latest[k] for k in ("dataset", "split", "best", "step", "images", "captions", "identities")} == {
      "dataset": "synthetic_persons", "split": "test", "best": False, "step": results["steps"], "images": 16,
      "captions": 32, "identities": 8}
  assert _figures(latest) == _figures(results["final"])
  assert _figures(evaluators.evaluate_run(tiny_run, best=True)) == results["best_val"]["test"]
  assert rundir.RunDir(tiny_run).evaluation_file("synthetic_persons", "test", latest["step"], False) == os.path.join(
      tiny_run, "evaluations", f"synthetic_persons-test-step{latest['step']}.json")


def test_evaluate_run_on_another_benchmark_reads_it_as_the_run_reads_captions_and_images(tiny_run, tmp_path):
  root = str(tmp_path / "RSTPReid")
  test_annos = [a for a in benchmark_fixtures.write_fixture(root, "rstpreid") if a["split"] == "test"]
  result = evaluators.evaluate_run(tiny_run, dataset="rstpreid", manual_dir=root)
  assert (result["dataset"], result["images"], result["captions"], result["identities"]) == (
      "rstpreid", len(test_annos), sum(len(a["captions"]) for a in test_annos), benchmark_fixtures.SPLIT_IDS["test"])

  config, tokenizer, model, params, _ = rebuild.load_trained(tiny_run)
  cfg = datasets.cross_domain(config.data, "rstpreid", root, rebuild.run_tokenizer_path(tiny_run))
  assert (cfg.image_size, cfg.context_length, cfg.data_dir) == (
      config.data.image_size, config.data.context_length, config.data.data_dir)
  _, splits = datasets.load(cfg, ("test",))
  test = splits["test"]
  assert test.pair_caption == [c for a in test_annos for c in a["captions"]]
  np.testing.assert_array_equal(test.tokens, tokenizer.encode(test.pair_caption))
  assert test.load_image(0).shape == (*config.data.image_size, 3)
  mesh = parallel.make_mesh()
  assert _figures(result) == retrieval.evaluate_split(encoding.make_encoders(model, mesh), params, test, mesh,
                                                  config.eval.batch_size)


def test_evaluate_run_errors_name_what_is_wrong(tiny_run, tmp_path):
  known = "reads a benchmark (cuhk_pedes, icfg_pedes, rstpreid), got 'market1501'"
  with pytest.raises(ValueError, match=re.escape(known)):
    evaluators.evaluate_run(tiny_run, dataset="market1501")
  with pytest.raises(FileNotFoundError, match=re.escape(f"manual_dir {tmp_path}/none is not a folder")):
    evaluators.evaluate_run(tiny_run, dataset="cuhk_pedes", manual_dir=str(tmp_path / "none"))
  with pytest.raises(ValueError, match="manual_dir is for another data set"):
    evaluators.evaluate_run(tiny_run, manual_dir=str(tmp_path))
  copy = str(tmp_path / "run")
  shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns(rundir.BEST_DIR))
  with pytest.raises(FileNotFoundError, match=f"{re.escape(copy)} has no best/ folder: the run evaluated no val"):
    evaluators.evaluate_run(copy, best=True)


def test_evaluate_run_command_prints_and_writes_the_figures(tiny_run):
  proc = helpers.run_module("dgia_jax.tools.evaluate", "--workdir", tiny_run, "--best")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = evaluators.evaluate_run(tiny_run, best=True)
  out = rundir.RunDir(tiny_run).evaluation_file(result["dataset"], result["split"], result["step"], True)
  with open(out) as f:
    written = json.load(f)
  assert _figures(written) == _figures(result) and written["best"] and written["step"] == result["step"]
  assert f"text→image  {reporting.format_metrics(result['t2i'])}" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == f"written to {out}"
  bad = helpers.run_module("dgia_jax.tools.evaluate", "--workdir", tiny_run, "--dataset", "market1501")
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: cross-domain evaluation reads a benchmark")


def test_the_best_checkpoint_is_what_evaluate_export_and_search_read(tiny_run, exported, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(tiny_run, copy)
  config, _, model, params, step = rebuild.load_trained(copy)
  halved = jax.tree.map(lambda p: 0.5 * p, params)
  best = checkpointing.Checkpointer(os.path.join(copy, rundir.BEST_DIR), 1, 1, async_save=False)
  best.save(step + 1, {"params": halved}, force=True)
  best.close()
  _, _, _, loaded, loaded_step = rebuild.load_trained(copy, best=True)
  assert loaded_step == step + 1
  jax.tree.map(np.testing.assert_array_equal, loaded, halved)

  _, splits = datasets.load(config.data, ("test",))
  mesh = parallel.make_mesh()
  expected = retrieval.evaluate_split(encoding.make_encoders(model, mesh), halved, splits["test"], mesh,
                                  config.eval.batch_size)
  result = evaluators.evaluate_run(copy, best=True)
  assert result["best"] and result["step"] == step + 1 and _figures(result) == expected


  manifest = exports.export_split(copy, "test", str(tmp_path / "emb"), best=True)
  assert manifest["best"] and manifest["step"] == step + 1
  emb, latest = exports.load(str(tmp_path / "emb")), exports.load(exported[0])
  assert not np.allclose(np.concatenate(emb.texts), np.concatenate(latest.texts), atol=1e-3)
  captions = [r["caption"] for r in emb.text_index[:3]]  # search embeds queries with the export's checkpoint
  _, rows = searcher.search_texts(emb, captions, k=1)
  best_run = rebuild.load_trained(copy, best=True)
  np.testing.assert_allclose(encoding.TextEncoder(best_run).embed(captions)[0], np.concatenate(emb.texts)[:3], atol=1e-6)
  expected = searcher.exact_search(encoding.TextEncoder(best_run).embed(captions)[0], emb.images, 1)[1]
  np.testing.assert_array_equal(rows, expected)


@pytest.mark.slow
def test_a_cross_domain_evaluator_is_one_config_entry_and_runs_each_epoch(tiny_config, tmp_path):
  """Another benchmark's test split beside val and test after every epoch, read with the run's
  tokenizer and transforms: the same figures `evaluate_run(..., dataset=...)` gives."""
  root = str(tmp_path / "RSTPReid")
  benchmark_fixtures.write_fixture(root, "rstpreid")
  tiny_config.evals.rst = dict(type="cross_domain", dataset="rstpreid", manual_dir=root, split="test")
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(tiny_config, workdir)
  rst = helpers.records(workdir, "eval", "rst")
  assert [r["epoch"] for r in rst] == [1, 2] and all("t2i" in r for r in rst)
  assert [r["split"] for r in results["evaluations"] if r["epoch"] == 1] == ["val", "rst", "test"]
  again = evaluators.evaluate_run(workdir, dataset="rstpreid", manual_dir=root)
  assert again["t2i"] == rst[-1]["t2i"] and again["i2t"] == rst[-1]["i2t"]


def test_evaluators_come_from_config_and_an_unknown_type_is_named(tiny_config):
  names = [e.name for e in evaluators.from_config(tiny_config)]
  assert names == ["val", "test"]  # the selecting one first
  tiny_config.evals.val.every = "off"
  tiny_config.eval.select = ""
  assert [e.name for e in evaluators.from_config(tiny_config)] == ["test"]
  tiny_config.evals.test.type = "nonsense"
  with pytest.raises(errors.ConfigError, match="evals.test.type='nonsense' is not an evaluator"):
    evaluators.from_config(tiny_config)


def test_the_best_epoch_policy_takes_the_first_best_and_never_a_diverged_one():
  policy = evaluators.BestEpoch("val", "R1")
  rec = lambda epoch, r1, split="val": {"epoch": epoch, "split": split, "t2i": {"R1": r1}}  # noqa: E731
  records = [rec(1, 10.0), rec(1, 99.0, "test"), rec(2, 20.0), rec(3, 20.0),
             {"epoch": 4, "split": "val", "diverged": "3 of 8 text features are not finite"}]
  assert policy.best(records)["epoch"] == 2
  assert policy.improves(rec(5, 20.5), records) and not policy.improves(rec(5, 20.0), records)
  assert not policy.improves({"epoch": 5, "split": "val", "diverged": "x"}, records)
  assert policy.best([rec(1, 99.0, "test")]) is None
