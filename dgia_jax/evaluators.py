"""The trainer's evaluation after epochs, built from config: one evaluator per split, looped over.

The validation split picks the best epoch (`eval.select_metric`, text→image) and its parameters
are kept in the run's `best/`; the test split is evaluated for the curves
(`eval.test_each_epoch`) and for the final figures, never to select. Figures are computed by
`inference.evaluate_split`; every evaluation is an `eval` record of the metric writer.
"""

from __future__ import annotations

import jax
import ml_collections

from dgia_jax import checkpointing, errors, inference, reporting, rundir
from dgia_jax.data.pipeline import Split


class SplitEvaluator:
  """Text→image and image→text figures of one split, as `eval` records. Features that are not
  finite give no figures: the record says the model `diverged` there."""

  def __init__(self, split: Split, encoders, mesh, batch_size: int, writer: reporting.MetricWriter):
    self.split, self._encoders, self._mesh, self._batch_size, self._writer = split, encoders, mesh, batch_size, writer

  def evaluate(self, params, epoch: int, step: int) -> dict:
    """The `eval` record of `params` (not written yet)."""
    record = {"kind": "eval", "step": step, "epoch": epoch, "split": self.split.name}
    try:
      figures = inference.evaluate_split(self._encoders, params, self.split, self._mesh, self._batch_size)
    except errors.NonFiniteError as e:
      record["diverged"] = str(e)
      text = f"diverged: {e}"
    else:
      record.update(figures)
      text = f"t2i {reporting.format_metrics(figures['t2i'])} | i2t {reporting.format_metrics(figures['i2t'])}"
    if jax.process_index() == 0:
      reporting.message(f"epoch {epoch} {self.split.name}: {text}")
    return record

  def run(self, params, epoch: int, step: int) -> dict:
    """`evaluate`, its record written."""
    record = self.evaluate(params, epoch, step)
    self._writer.write(record)
    return record

  def records(self) -> list[dict]:
    return [r for r in self._writer.of_kind("eval") if r["split"] == self.split.name]

  def figures(self) -> list[dict]:
    """The records with figures (the model had not diverged)."""
    return [r for r in self.records() if "diverged" not in r]


class Evaluation:
  """The validation evaluator (it selects) and the test evaluator, after an epoch and at the end."""

  def __init__(self, config: ml_collections.ConfigDict, run: rundir.RunDir, encoders, splits: dict[str, Split],
               mesh, writer: reporting.MetricWriter):
    ecfg, dcfg = config.eval, config.data
    make = lambda split: SplitEvaluator(split, encoders, mesh, ecfg.batch_size, writer)  # noqa: E731
    self.val = make(splits[dcfg.val_split]) if dcfg.val_split in splits else None
    self.test = make(splits[dcfg.eval_split])
    self._config, self._run, self._writer = config, run, writer
    # The newest two best epochs: if the newest is damaged, evaluate/export/search fall back to the other.
    self._best = checkpointing.Checkpointer(run.best, 1, 2, async_save=False)

  def _score(self, record: dict) -> float:
    return record["t2i"][self._config.eval.select_metric]

  def after_epoch(self, epoch: int, step: int, params, last: bool) -> None:
    """Validation (the best epoch's parameters saved), then test if due; the curves redrawn. An
    evaluator that has a record of `step` already (a run resumed there) is not run again, one that
    has none is: a run killed between its checkpoint and its evaluation evaluates on resuming."""
    diverged = []
    for evaluator, due in ((self.val, True), (self.test, self._config.eval.test_each_epoch or last)):
      if evaluator is None or not due or any(r["step"] == step for r in evaluator.records()):
        continue
      earlier = evaluator.figures()
      record = evaluator.evaluate(params, epoch, step)
      if evaluator is self.val and "diverged" not in record and (
          not earlier or self._score(record) > max(map(self._score, earlier))):
        # Saved before the record is written: a kill in between evaluates again on resuming.
        self._best.save(step, {"params": params}, force=True)
      self._writer.write(record)
      if "diverged" in record:
        diverged.append(f"{evaluator.split.name}: {record['diverged']}")
    if jax.process_index() == 0:
      reporting.plot_curves(self._writer.records, self._run.curves, title=self._config.get("name", ""))
    if diverged and self._config.train.on_nonfinite == "stop":
      raise errors.NonFiniteError(f"the model diverged by epoch {epoch} (step {step}): {'; '.join(diverged)}; it is "
                                  "never selected as best. Set --config.train.on_nonfinite=skip to go on regardless.")

  def results(self, params, total_steps: int, epochs: int) -> dict:
    """`final` (last epoch, test) and `best_val` (best-on-val epoch, its val and test figures), each
    saying by `selection` which epoch it reports; never an epoch picked on the test split, never a
    diverged one (`diverged` lists the evaluations that had no figures)."""
    tests = {r["step"]: r for r in self.test.records()}
    if total_steps not in tests:  # resumed after the last evaluation was lost
      tests[total_steps] = self.test.run(params, epochs, total_steps)
    final = {k: tests[total_steps][k] for k in ("epoch", "split", "t2i", "i2t", "diverged") if k in tests[total_steps]}
    evaluations = self._writer.of_kind("eval")
    out = {"final": {"selection": "last epoch", **final}, "evaluations": evaluations}
    diverged = [{k: r[k] for k in ("epoch", "step", "split", "diverged")} for r in evaluations if "diverged" in r]
    if diverged:
      out["diverged"] = diverged
    vals = self.val.figures() if self.val is not None else []
    if vals:
      best = max(vals, key=self._score)
      if best["step"] not in tests:
        _, raw = self._best.restore_raw(best["step"])
        tests[best["step"]] = self.test.run(raw["params"], best["epoch"], best["step"])
      test = tests[best["step"]]
      out["best_val"] = {"selection": f"best {self.val.split.name} epoch by t2i {self._config.eval.select_metric}",
                         "epoch": best["epoch"], "select_metric": f"t2i {self._config.eval.select_metric}",
                         "val": {k: best[k] for k in ("t2i", "i2t")},
                         "test": {k: test[k] for k in ("t2i", "i2t", "diverged") if k in test}}
    return out

  def close(self, quiet: bool = False) -> None:
    self._best.close(quiet)
