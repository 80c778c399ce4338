"""Evaluators built from config and looped over; the best-epoch policy; a checkpoint's evaluation.

Every entry of `config.evals` names an evaluator: its `type` is a module of this package
(`dgia_jax.evaluation.<type>`, e.g. `retrieval`, `cross_domain`) whose `Evaluator(name, cfg,
config)` declares the data it reads (`data()`, `split`) and computes figures of parameters on it
(`figures`). A new evaluator is one module here and one entry in a config:

  c.evals.test = dict(type="retrieval", split="test", every="epoch")
  c.evals.icfg = dict(type="cross_domain", dataset="icfg_pedes", manual_dir="/data/ICFG-PEDES", split="test")

After the chosen epochs the trainer's `Evaluations` runs them in order, each an `eval` record of the
metric writer (`split`: the evaluator's name). The best epoch is a small policy over one evaluator's
metric (`BestEpoch`: `eval.select`, `eval.select_metric`, text→image); its parameters are kept in the
run's `best/`. `eval.report` names the evaluator whose last epoch is the run's `final` figures. Figures
are never computed from non-finite features: the record says the model `diverged` there.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time

import jax
import ml_collections
import numpy as np

from dgia_jax.common import errors, parallel
from dgia_jax.data import datasets
from dgia_jax.data.pipeline import Split
from dgia_jax.evaluation import published
from dgia_jax.inference import encoding, rebuild
from dgia_jax.run import checkpointing, reporting, rundir


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  """Evaluator `name` of type `cfg.type` (the module `dgia_jax.evaluation.<type>`)."""
  try:
    module = importlib.import_module(f"dgia_jax.evaluation.{cfg.type}")
    make_evaluator = module.Evaluator
  except (ImportError, AttributeError) as e:
    raise errors.ConfigError(f"evals.{name}.type={cfg.type!r} is not an evaluator (a module of dgia_jax.evaluation "
                             "with an Evaluator class; e.g. 'retrieval', 'cross_domain')") from e
  return make_evaluator(name, cfg, config)


def from_config(config: ml_collections.ConfigDict) -> list:
  """The evaluators `config.evals` names, without those switched off (`every="off"`): the selecting
  one (`eval.select`) first, then the others by name."""
  names = sorted(config.evals, key=lambda name: (name != config.eval.select, name))
  evaluators = [make(name, config.evals[name], config) for name in names]
  return [e for e in evaluators if e.every != "off"]


def _key(data_cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(data_cfg.to_dict(), sort_keys=True, default=str)


def open_data(config: ml_collections.ConfigDict, evaluators: list, splits: dict[str, Split]) -> dict[str, Split]:
  """{evaluator name: its opened split}: the run's own splits from `splits` (opened by the caller
  with the run's data), other data sets opened here, each data set once."""
  own, opened = _key(config.data), {}
  wanted: dict[str, tuple[ml_collections.ConfigDict, set[str]]] = {}
  for e in evaluators:
    if _key(e.data()) != own:
      wanted.setdefault(_key(e.data()), (e.data(), set()))[1].add(e.split)
  for key, (data_cfg, names) in wanted.items():
    _, opened[key] = datasets.load(data_cfg, tuple(sorted(names)))
  return {e.name: splits[e.split] if _key(e.data()) == own else opened[_key(e.data())][e.split] for e in evaluators}


def run_splits(config: ml_collections.ConfigDict, evaluators: list) -> tuple[str, ...]:
  """The splits of the run's own data set the evaluators read."""
  return tuple(dict.fromkeys(e.split for e in evaluators if _key(e.data()) == _key(config.data)))


@dataclasses.dataclass(frozen=True)
class BestEpoch:
  """The best-epoch policy: the evaluation of evaluator `evaluator` with the highest text→image
  `metric` (an earlier epoch wins a tie); diverged evaluations never count."""

  evaluator: str
  metric: str

  def score(self, record: dict) -> float:
    return record["t2i"][self.metric]

  def best(self, records: list[dict]) -> dict | None:
    candidates = [r for r in records if r["split"] == self.evaluator and "diverged" not in r]
    return max(candidates, key=self.score) if candidates else None

  def improves(self, record: dict, earlier: list[dict]) -> bool:
    best = self.best(earlier)
    return record["split"] == self.evaluator and "diverged" not in record and (
        best is None or self.score(record) > self.score(best))


class Evaluations:
  """The trainer's evaluators after an epoch and at the end, their records, the best epoch's
  parameters (`best/`) and the run's figures."""

  def __init__(self, config: ml_collections.ConfigDict, run: rundir.RunDir, encoders, evaluators: list,
               splits: dict[str, Split], mesh, writer: reporting.MetricWriter):
    self.evaluators, self._splits = evaluators, splits
    self._config, self._encoders, self._mesh, self._writer = config, encoders, mesh, writer
    names = [e.name for e in evaluators]
    ecfg = config.eval
    self.policy = BestEpoch(ecfg.select, ecfg.select_metric) if ecfg.select in names else None
    if ecfg.report not in names:
      raise errors.ConfigError(f"eval.report={ecfg.report!r} names no evaluator of config.evals that runs "
                               f"({', '.join(names) or 'none'})")
    self.report = next(e for e in evaluators if e.name == ecfg.report)
    # The newest two best epochs: if the newest is damaged, evaluate/export/search fall back to the other.
    self._best = checkpointing.Checkpointer(run.best, 1, 2, async_save=False)
    self.curves = reporting.Curves(run.curves, title=config.get("name", ""))

  def records(self, evaluator=None) -> list[dict]:
    return [r for r in self._writer.of_kind("eval") if evaluator is None or r["split"] == evaluator.name]

  def evaluate(self, evaluator, params, epoch: int, step: int) -> dict:
    """The `eval` record of `params` by `evaluator` (not written yet)."""
    record = {"kind": "eval", "step": step, "epoch": epoch, "split": evaluator.name}
    try:
      figures = evaluator.figures(self._encoders, params, self._splits[evaluator.name], self._mesh,
                                  self._config.eval.batch_size)
    except errors.NonFiniteError as e:
      record["diverged"] = str(e)
      text = f"diverged: {e}"
    else:
      record.update(figures)
      text = f"t2i {reporting.format_metrics(figures['t2i'])} | i2t {reporting.format_metrics(figures['i2t'])}"
    if jax.process_index() == 0:
      reporting.message(f"epoch {epoch} {evaluator.name}: {text}")
    return record

  def after_epoch(self, epoch: int, step: int, params, last: bool) -> None:
    """Every evaluator due (`every`), in order; the best epoch's parameters saved; the curves redrawn
    when due (`reporting.Curves`). An evaluator that has a record of `step` already (a run resumed
    there) is not run again, one that has none is: a run killed between its checkpoint and its
    evaluation evaluates on resuming."""
    diverged = []
    for evaluator in self.evaluators:
      due = evaluator.every == "epoch" or last
      if not due or any(r["step"] == step for r in self.records(evaluator)):
        continue
      earlier = self.records()
      record = self.evaluate(evaluator, params, epoch, step)
      if self.policy is not None and self.policy.improves(record, earlier):
        # Saved before the record is written: a kill in between evaluates again on resuming.
        self._best.save(step, {"params": params}, force=True)
      self._writer.write(record)
      if "diverged" in record:
        diverged.append(f"{evaluator.name}: {record['diverged']}")
    if jax.process_index() == 0:
      self.curves.draw(self._writer.records)
    if diverged and self._config.train.on_nonfinite == "stop":
      raise errors.NonFiniteError(f"the model diverged by epoch {epoch} (step {step}): {'; '.join(diverged)}; it is "
                                  "never selected as best. Set --config.train.on_nonfinite=skip to go on regardless.")

  def _report_at(self, step: int, epoch: int, params_of) -> dict:
    """The report evaluator's record of `step`, evaluated now (and written) if the run has none."""
    record = next((r for r in self.records(self.report) if r["step"] == step), None)
    if record is None:  # resumed after the last evaluation was lost, or not evaluated each epoch
      record = self.evaluate(self.report, params_of(), epoch, step)
      self._writer.write(record)
    return record

  def results(self, params, total_steps: int, epochs: int) -> dict:
    """`final` (the report evaluator's last epoch) and `best_val` (the best epoch of the selecting
    evaluator: its figures and the report evaluator's), each saying by `selection` which epoch it
    reports, never a diverged one (`diverged` lists the evaluations that had no figures); and, labelled
    as the reference code's selection and used for no decision, `best_on_test`: the report
    evaluator's best epoch (the field's published figures are selected so)."""
    keys = ("epoch", "split", "t2i", "i2t", "diverged")
    final = self._report_at(total_steps, epochs, lambda: params)
    evaluations = self.records()
    out = {"final": {"selection": "last epoch", **{k: final[k] for k in keys if k in final}}, "evaluations": evaluations}
    diverged = [{k: r[k] for k in ("epoch", "step", "split", "diverged")} for r in evaluations if "diverged" in r]
    if diverged:
      out["diverged"] = diverged
    best = self.policy.best(evaluations) if self.policy is not None else None
    if best is not None:
      at_best = self._report_at(best["step"], best["epoch"], lambda: self._best.restore_raw(best["step"])[1]["params"])
      out["best_val"] = {"selection": f"best {best['split']} epoch by t2i {self.policy.metric}",
                         "epoch": best["epoch"], "select_metric": f"t2i {self.policy.metric}",
                         "val": {k: best[k] for k in ("t2i", "i2t")},
                         "test": {k: at_best[k] for k in ("t2i", "i2t", "diverged") if k in at_best}}
    on_test = [r for r in self.records(self.report) if "diverged" not in r]
    if on_test:  # what the field's code reports: never used to select here
      metric = self._config.eval.select_metric
      top = max(on_test, key=lambda r: r["t2i"][metric])
      out["best_on_test"] = {"selection": f"best {self.report.name} epoch by t2i {metric}, the reference code's "
                                          "selection: reported to compare with published figures, used for nothing",
                             "epoch": top["epoch"], "test": {k: top[k] for k in ("t2i", "i2t")}}
    return out

  def close(self, quiet: bool = False) -> None:
    self._best.close(quiet)


def evaluate_run(model, split: str = "test", step: int | None = None, best: bool = False, dataset: str = "",
                 manual_dir: str = "") -> dict:
  """Retrieval figures of a model on `split` of its data set, or of benchmark `dataset` (its original
  folder `manual_dir`) read with the model's tokenizer, image size and context length: the trainer's
  evaluators (`retrieval`, `cross_domain`), run once. `model`: a run's workdir (its checkpoint `step`,
  or its best-on-validation one if `best`), or a `rebuild.FieldCheckpoint` (a benchmark always: its
  config's data set unless `dataset`).

  Returns {"workdir" or "checkpoint", "step", "best", "dataset", "split", "images", "captions",
  "identities", "t2i", "i2t", "seconds", "published"}; t2i and i2t hold R1, R5, R10, mAP and mINP in
  %, seconds the time to encode the split and rank it (compilation included), published the field's
  figures on that data set (`published.figures`).
  """
  config, _, towers, params, step = rebuild.load_model(model, step, best)
  field = isinstance(model, rebuild.FieldCheckpoint)
  cfg = ml_collections.ConfigDict({"type": "retrieval", "split": split})
  if field or (dataset and dataset != config.data.name):
    cfg.update(type="cross_domain", dataset=dataset or config.data.name,
               manual_dir=manual_dir or config.data.get("manual_dir", ""))
  elif manual_dir:
    raise errors.ConfigError(f"manual_dir is for another data set (--dataset); the run's own, '{config.data.name}', is "
                             f"read from {config.data.data_dir} as it trained")
  evaluator = make(split, cfg, config)
  _, splits = datasets.load(evaluator.data(), (split,))
  data = splits[split]
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  figures = evaluator.figures(encoding.make_encoders(towers, mesh), params, data, mesh, config.eval.batch_size)
  name = evaluator.data().name
  return {**rebuild.describe_model(model), "step": int(step), "best": best, "dataset": name, "split": split,
          "images": data.num_images, "captions": data.num_pairs, "identities": int(np.unique(data.person_ids).size),
          **figures, "seconds": time.perf_counter() - start, "published": published.figures(name)}
