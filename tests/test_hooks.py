"""The loop's periodic actions: one `itstime` predicate, the step log and its collapse check, re-clustering."""

import jax.numpy as jnp
import numpy as np
import pytest

from dgia_jax.common import errors
from dgia_jax.method import objective
from dgia_jax.training import hooks


@pytest.mark.parametrize("step, due", [(0, False), (3, False), (4, True), (5, False), (8, False), (12, True)])
def test_clusters_are_due_at_the_start_epoch_and_every_few_epochs(tiny_config, step, due):
  ccfg = tiny_config.relations.clusters
  ccfg.update(dict(enabled=True, start_epoch=2, every_epochs=2))
  assert hooks.clusters_due(ccfg, step, steps_per_epoch=4) == due
  ccfg.enabled = False
  assert not hooks.clusters_due(ccfg, step, steps_per_epoch=4)


@pytest.mark.parametrize("step, every, total, start, due", [
    (0, 5, None, 0, True), (5, 5, None, 0, True), (6, 5, None, 0, False), (7, 5, 7, 0, True),  # the last step
    (3, 0, 10, 0, False), (10, 0, 10, 0, True), (4, 4, None, 8, False), (8, 4, None, 8, True), (12, 4, None, 8, True)])
def test_itstime_is_every_n_from_a_start_and_always_at_the_total(step, every, total, start, due):
  assert hooks.itstime(step, every, total, start) == due


class _Writer:
  enabled = False

  def __init__(self):
    self.records = []

  def write(self, record):
    self.records.append(record)


def _counts(pred: float, rows: int = 16, skipped: int = 0) -> dict:
  return {"rows": rows, "lrc_pred": pred, "lrc_hit": 0.0, "lrc_same": 16.0, "skipped": skipped}


def test_the_step_log_averages_applied_steps_only_and_names_a_collapse():
  writer = _Writer()
  log = hooks.StepLog(writer, steps_per_epoch=2, start_step=0, total_steps=4, stop_on_nonfinite=False, batch_size=16,
                      collapse_share=0.5)
  log.add({"loss": np.float32(2.0), "lr": np.float32(0.1)}, _counts(16 * 15))
  log.add({"loss": np.float32(np.nan), "lr": np.float32(0.1)}, _counts(16 * 15, skipped=1))
  log.flush(2)
  (record,) = writer.records
  assert record["loss"] == 2.0 and record["skipped_steps"] == 1  # the NaN of the skipped step is in no mean
  log.end_epoch(2)
  relations = writer.records[-1]
  assert relations["kind"] == "relations" and relations["collapsed"] == ["lrc"]
  assert relations["lrc_relations_per_batch_row"] == 15.0

  log.add({"loss": np.float32(np.nan), "lr": np.float32(0.1)}, _counts(3.0, skipped=1))
  log.flush(3)
  assert "loss" not in writer.records[-1]  # only skipped steps: no mean at all
  log.end_epoch(4)
  assert "collapsed" not in writer.records[-1]  # 3 relations over 16 rows: far from the 7.5 of half the batch


def test_a_collapse_stops_the_run_when_asked():
  log = hooks.StepLog(_Writer(), 1, 0, 4, stop_on_nonfinite=False, batch_size=16, collapse_share=0.9,
                      stop_on_collapse=True)
  log.add({"loss": np.float32(1.0), "lr": np.float32(0.1)}, _counts(16 * 14))  # 14 of 15 > 0.9
  log.flush(1)
  with pytest.raises(errors.CollapseError, match="lrc 14.0 of the 15 other rows of a batch per row .93 %"):
    log.end_epoch(1)


def test_without_ids_relations_are_counted_and_the_log_says_precision_cannot_be_measured(monkeypatch):
  said = []
  monkeypatch.setattr(hooks.reporting, "message", said.append)
  writer = _Writer()
  writer.enabled = True
  log = hooks.StepLog(writer, 1, 0, 2, stop_on_nonfinite=False, batch_size=4, with_ids=False)
  related = jnp.asarray(np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool) | np.eye(4, k=-1, dtype=bool))
  counts = objective.relation_counts({"lrc_related": related}, jnp.arange(4), jnp.full((8,), -1))  # no ids: -1
  assert int(counts["lrc_hit"]) == int(counts["lrc_same"]) == 0 and int(counts["lrc_pred"]) == 6
  log.add({"loss": np.float32(1.0), "lr": np.float32(0.1)}, {**{k: float(v) for k, v in counts.items()}, "skipped": 0})
  log.flush(1)
  log.end_epoch(1)
  relations = writer.records[-1]
  assert relations["kind"] == "relations" and relations["lrc_relations_per_batch_row"] == 1.5
  assert not [k for r in writer.records for k in r if k.endswith(("precision", "recall"))]  # no zeros printed
  assert any("the data set has no ids: precision and recall cannot be measured" in m for m in said), said
