"""The ablation runner: rows are switches of one trainer; a rerun reuses finished runs."""

import json
import os

import pytest

from dgia_jax.training import ablation
from tests import helpers

pytestmark = pytest.mark.slow  # trains


def test_rows_differ_only_in_their_switches(tiny_config):
  itc, full, oracle = (ablation.row_config(tiny_config, r, seed=2) for r in ("itc", "full", "oracle"))
  assert (itc.loss.lrc, itc.loss.iasc, itc.loss.gsrc) == (False, False, False)
  assert (full.loss.lrc, full.loss.iasc, full.loss.gsrc) == (True, True, True)
  assert oracle.relations.oracle and not full.relations.oracle
  assert itc.seed == full.seed == 2
  for section in ("data", "model", "train", "eval", "iasc", "gsrc"):
    assert itc[section].to_dict() == full[section].to_dict()
  with pytest.raises(ValueError, match="unknown ablation row 'nope'"):
    ablation.row_config(tiny_config, "nope", 0)


def test_ablation_writes_table_chart_and_reuses_finished_runs(tmp_path, data_dir):
  config = helpers.write_tiny_config(tmp_path / "tiny.py", data_dir, train__epochs=2)
  workdir = str(tmp_path / "ablation")
  args = ("--config", config, "--workdir", workdir, "--rows", "itc,full", "--seeds", "2")
  proc = helpers.run_module("dgia_jax.tools.ablate", *args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "ablation.json")) as f:
    summary = json.load(f)
  assert list(summary) == ["itc", "full"] and summary["full"]["seeds"] == 2
  for row in ("itc", "full"):
    runs = [json.load(open(os.path.join(workdir, row, f"seed{s}", "results.json"))) for s in (0, 1)]
    r1 = [r["final"]["t2i"]["R1"] for r in runs]
    assert summary[row]["last"]["R1"]["mean"] == pytest.approx(sum(r1) / 2)
    assert summary[row]["best_val"] is not None
  assert "gsrc_precision" in summary["full"]["relations"] and not summary["itc"]["relations"]
  paired = summary["full"]["minus_itc"]["last_mAP"]
  full, itc = ([json.load(open(os.path.join(workdir, row, f"seed{s}", "results.json")))["final"]["t2i"]["mAP"]
                for s in (0, 1)] for row in ("full", "itc"))
  assert paired["mean"] == pytest.approx((full[0] - itc[0] + full[1] - itc[1]) / 2)
  assert paired["std"] == pytest.approx(abs((full[0] - itc[0]) - (full[1] - itc[1])) / 2 ** 0.5)
  table = open(os.path.join(workdir, "ablation.md")).read()
  assert "| itc | 2 |" in table and "| full | 2 |" in table and "best epoch on validation" in table
  assert "Paired differences against `itc`" in table and "| ΔR1 last | ΔmAP last | ΔR1 best-val" in table
  with open(os.path.join(workdir, "ablation.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  stamp = os.path.getmtime(os.path.join(workdir, "full", "seed1", "results.json"))
  again = helpers.run_module("dgia_jax.tools.ablate", *args)
  assert again.returncode == 0 and "dgia-jax:" not in again.stdout  # nothing trained again
  assert os.path.getmtime(os.path.join(workdir, "full", "seed1", "results.json")) == stamp


def test_the_main_jobs_fine_tuning_identities_are_disjoint_from_its_pre_training_identities():
  from dgia_jax.data import datasets

  pre, fine = helpers.load_config("synthetic_pretrain"), helpers.load_config("default")
  assert (pre.loss.lrc, pre.loss.iasc, pre.loss.gsrc) == (False, False, False)  # ITC only: no method in the start
  assert fine.model.init_from == "runs/synthetic_pretrain"
  assert fine.model.init_config == os.path.join(helpers.ROOT, "configs", "synthetic_pretrain.py")
  assert fine.model.vision.to_dict() == pre.model.vision.to_dict() and fine.data.image_size == pre.data.image_size

  def identities(config):
    splits = datasets._synthetic_builder(config.data)._identities()
    return {split: {identity.key() for identity in ids} for split, ids in splits.items()}

  seen = set().union(*identities(pre).values())
  fine_ids = identities(fine)
  assert [len(fine_ids[s]) for s in ("train", "val", "test")] == list(fine.data.synthetic.num_ids)
  assert all(not (keys & seen) for keys in fine_ids.values())
