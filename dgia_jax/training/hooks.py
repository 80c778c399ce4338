"""The training loop's periodic actions: each a small hook, due by one predicate, `itstime`.

After a step: metrics every logging interval and at epoch ends (`StepLog.flush`), a preemption
check (`Preemption`), a checkpoint, the epoch's relation summary (`StepLog.end_epoch`) and
evaluation. Before a step: re-clustering the training images into pseudo identities
(`Recluster`).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from dgia_jax.common import errors, parallel
from dgia_jax.data.pipeline import Split
from dgia_jax.evaluation import metrics
from dgia_jax.inference import encoding
from dgia_jax.method import clustering, objective
from dgia_jax.run import checkpointing, reporting


def itstime(step: int, every: int, total: int | None = None, start: int = 0) -> bool:
  """Whether an action repeated every `every` steps from step `start` is due at `step`, or at
  `total` (the last step) when given. `every` <= 0: only at `total`."""
  if total is not None and step == total:
    return True
  return every > 0 and step >= start and (step - start) % every == 0


class Hook(NamedTuple):
  """`run(done, state)` after `done` steps whenever `itstime(done, every, total)`. `timed=False`:
  the step timing of `StepLog` leaves the hook's time out."""

  run: Callable
  every: int
  total: int | None = None
  timed: bool = True

  def due(self, done: int) -> bool:
    return itstime(done, self.every, self.total)


class StepLog:
  """The loop's metrics and progress (process 0; a bar on a terminal, plain lines in a log).

  Every step's metrics and relation counts stay on the device until `flush`, which fetches them
  and writes one `train` record (means, relation figures of the interval, skipped steps, seconds
  per step and the share spent waiting for data). `end_epoch` writes the epoch's summed relation
  figures as a `relations` record.
  """

  def __init__(self, writer: reporting.MetricWriter, steps_per_epoch: int, start_step: int, total_steps: int,
               stop_on_nonfinite: bool, batch_size: int = 0, collapse_share: float = 1.0, stop_on_collapse: bool = False,
               with_ids: bool = True):
    self._writer, self._steps_per_epoch, self._stop = writer, steps_per_epoch, stop_on_nonfinite
    self._with_ids = with_ids  # the training pairs have person ids to measure relations against
    self._batch_size, self._collapse_share, self._stop_on_collapse = batch_size, collapse_share, stop_on_collapse
    self.bar = reporting.Progress(total_steps, "train", initial=start_step, enabled=writer.enabled)
    self._pending: list[tuple[dict, dict]] = []
    self._epoch_counts: dict[str, float] = {}
    self.restart_clock()

  def restart_clock(self) -> None:
    """Step timing starts afresh (after work that is not a step: evaluation, clustering)."""
    self._clock, self._waited = time.perf_counter(), 0.0

  def next_batch(self, batches):
    start = time.perf_counter()
    batch = next(batches)
    self._waited += time.perf_counter() - start
    return batch

  def add(self, metrics: dict, counts: dict) -> None:
    self._pending.append((metrics, counts))
    self.bar.update(1)

  def message(self, text: str) -> None:
    if self._writer.enabled:
      reporting.message(text)

  def flush(self, done: int, state=None) -> None:
    """The `train` record of the steps since the last flush; raises NonFiniteError on skipped steps
    if the run stops on them."""
    del state
    if not self._pending:
      return
    fetched = jax.device_get(self._pending)
    self._pending.clear()
    elapsed = time.perf_counter() - self._clock
    timing = {"seconds_per_step": elapsed / len(fetched), "data_wait_fraction": self._waited / elapsed}
    self.restart_clock()
    # Means over the steps that were applied: a skipped step's loss or gradient norm is not finite,
    # and no figure is made of it (an interval of skipped steps only has no means).
    applied = [m for m, c in fetched if not c["skipped"]]
    means = {k: float(np.mean([m[k] for m in applied])) for k in fetched[0][0]} if applied else {}
    sums = {k: float(np.sum([c[k] for _, c in fetched])) for k in fetched[0][1]}
    self._epoch_counts = {k: self._epoch_counts.get(k, 0.0) + v for k, v in sums.items()}
    self._writer.write({"kind": "train", "step": done, "epoch": done / self._steps_per_epoch, **means,
                        **objective.summarize_relations(sums, self._with_ids), "skipped_steps": int(sums["skipped"]),
                        **timing})
    if means:
      self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
    if sums["skipped"] and self._stop:
      raise errors.NonFiniteError(
          f"non-finite loss, gradients or update in {int(sums['skipped'])} of steps {done - len(fetched) + 1}..{done} "
          "(updates skipped; the last checkpoint is intact). Set --config.train.on_nonfinite=skip to skip such steps "
          "and go on.")

  def end_epoch(self, done: int, state=None) -> None:
    """The `relations` record of the epoch that ends at `done` (if any relation was measured). If the
    in-batch relations per batch row passed `collapse_share` of the batch's other rows, the record
    and the log say the relations collapsed; with `stop_on_collapse` the run stops (CollapseError)."""
    del state
    relations = objective.summarize_relations(self._epoch_counts, self._with_ids)
    self._epoch_counts = {}
    if not relations:
      return
    epoch = done // self._steps_per_epoch
    others = max(self._batch_size - 1, 1)
    collapsed = {name: relations[f"{name}_relations_per_batch_row"] for name in ("lrc", "iasc")
                 if relations.get(f"{name}_relations_per_batch_row", 0.0) > self._collapse_share * others}
    self._writer.write({"kind": "relations", "step": done, "epoch": epoch, **relations,
                        **({"collapsed": sorted(collapsed)} if collapsed else {})})
    against = "vs hidden ids" if self._with_ids else "the data set has no ids: precision and recall cannot be measured"
    self.message(f"epoch {epoch} relations ({against}): {reporting.format_metrics(relations)}")
    if collapsed:
      figures = ", ".join(f"{name} {rate:.1f} of the {others} other rows of a batch per row ({100 * rate / others:.0f} %)"
                          for name, rate in collapsed.items())
      text = (f"epoch {epoch}: the in-batch relations collapsed: {figures}, over relations.collapse_share="
              f"{self._collapse_share:g}; every pair of a batch is becoming related")
      if self._stop_on_collapse:
        raise errors.CollapseError(f"{text} (relations.on_collapse=stop; the epoch's checkpoint is kept)")
      self.message(f"warning: {text} (relations.on_collapse=warn)")

  def close(self) -> None:
    self.bar.close()


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint at step `args[0]`."""


class Preemption:
  """On SIGTERM (recorded, not fatal), all processes agree on a step, save it and stop (`Preempted`)."""

  def __init__(self, ckpt: checkpointing.Checkpointer, log: StepLog):
    self._ckpt, self._log, self.raised = ckpt, log, False
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __call__(self, done: int, state) -> None:
    if parallel.any_process(self.raised):  # a collective: every process checks at the same steps
      self._ckpt.save(done, state, force=True)
      self._ckpt.close()
      self._log.close()
      if jax.process_index() == 0:
        print(f"dgia-jax: SIGTERM: saved step {done} and stopped; rerun the same command to resume", flush=True)
      raise Preempted(done)


def pseudo_identities(encoders, params, split: Split, mesh, ccfg: ml_collections.ConfigDict,
                      global_batch: int) -> tuple[np.ndarray, dict[str, float]]:
  """int32 [P] pseudo id of every training pair (its image's cluster, -1: outlier) and the
  quality of the image clusters against the hidden ids (measurement only).

  Every training image is embedded in record order with eval transforms and clustered
  (`clustering.cluster_images`, labels keyed by record); captions inherit their image's label.
  Deterministic, so every process computes the same labels.
  """
  started = time.perf_counter()
  img = encoding.extract_image_features(encoders, params, split, mesh, global_batch)
  metrics.require_finite(img, "training image features")
  labels = clustering.cluster_images(img, np.arange(split.num_images), k1=ccfg.k1, k2=ccfg.k2, eps=ccfg.eps,
                                     min_samples=ccfg.min_samples, ann_threshold=ccfg.ann_threshold)
  measured = clustering.label_quality(labels, split.person_ids) if split.has_ids else clustering.label_counts(labels)
  quality = {**measured, "seconds": time.perf_counter() - started}
  return clustering.pair_labels(labels, split.pair_record).astype(np.int32), quality


def clusters_due(ccfg: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
  """Whether the training images are (re-)clustered before `step` (0-based): at the start of
  epoch `start_epoch` and every `every_epochs` epochs after."""
  n = steps_per_epoch
  return ccfg.enabled and itstime(step, ccfg.every_epochs * n, start=(ccfg.start_epoch - 1) * n)


class Recluster:
  """Pseudo identities (`relations.clusters`) from the current parameters, before the first step
  of epoch `start_epoch` and every `every_epochs` epochs after; a `clusters` record each time."""

  def __init__(self, config: ml_collections.ConfigDict, encoders, split: Split, mesh, steps_per_epoch: int,
               rows: int, writer: reporting.MetricWriter, log: StepLog):
    self._ccfg, self._encoders, self._split, self._mesh = config.relations.clusters, encoders, split, mesh
    self._batch_size, self._steps_per_epoch, self._rows = config.eval.batch_size, steps_per_epoch, rows
    self._writer, self._log = writer, log

  def due(self, step: int) -> bool:
    return clusters_due(self._ccfg, step, self._steps_per_epoch)

  def __call__(self, step: int, state):
    """The state with pseudo ids from its parameters; unchanged (the record says why) if its features
    are not finite."""
    epoch = step // self._steps_per_epoch + 1
    try:
      labels, quality = pseudo_identities(self._encoders, state.params, self._split, self._mesh, self._ccfg,
                                          self._batch_size)
    except errors.NonFiniteError as e:
      self._writer.write({"kind": "clusters", "step": step, "epoch": epoch, "diverged": str(e)})
      self._log.message(f"epoch {epoch} clusters: not made, the pseudo ids kept: {e}")
      return state
    padded = np.full(self._rows, -1, np.int32)
    padded[:self._split.num_pairs] = labels
    record = {"kind": "clusters", "step": step, "epoch": epoch, **quality}
    self._writer.write(record)
    self._log.message(f"epoch {record['epoch']} clusters (vs hidden ids): {reporting.format_metrics(quality)}")
    return state.replace(pseudo_ids=parallel.global_array(padded, parallel.data_sharding(self._mesh)))
