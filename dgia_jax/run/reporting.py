"""Metrics to a JSONL file and to TensorBoard, training curves as PNG, and progress that reads well in
a terminal (tqdm's bars) and in a log file (plain periodic lines)."""

from __future__ import annotations

import json
import math
import sys
import time

from tqdm import tqdm

from dgia_jax.common import errors
from dgia_jax.run import files, rundir


def interactive() -> bool:
  """Whether progress goes to a terminal (stderr), so bars can redraw in place."""
  return sys.stderr.isatty()


class Progress:
  """Progress of `total` units: tqdm's bar on a terminal; elsewhere (a log file) one plain line
  every `every` seconds — done / total, the postfix, rate and ETA — and one at the end (unless
  `leave` is False). `enabled=False` shows nothing (processes other than 0)."""

  def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
               leave: bool = True, every: float = 30.0):
    self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, mininterval=2.0,
                     dynamic_ncols=True) if enabled and interactive() else None
    self._plain = enabled and self._bar is None
    self.total, self.done, self.desc, self.unit, self.leave, self.every = total, initial, desc, unit, leave, every
    self._start_done, self._start = initial, time.perf_counter()
    self._last_line, self._postfix = self._start, ""

  def update(self, n: int = 1) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self._plain and time.perf_counter() - self._last_line >= self.every:
      self._line()

  def set_postfix(self, **values: str) -> None:
    self._postfix = " ".join(f"{k} {v}" for k, v in values.items())
    if self._bar is not None:
      self._bar.set_postfix(**values)

  def _line(self) -> None:
    now = time.perf_counter()
    rate = (self.done - self._start_done) / max(now - self._start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    parts = [f"{self.desc}: {self.unit} {self.done}/{self.total} ({100.0 * self.done / max(self.total, 1):.0f}%)",
             self._postfix, f"{rate:.2f} {self.unit}s/s", f"ETA {eta_text}"]
    print(" | ".join(p for p in parts if p), file=sys.stderr, flush=True)
    self._last_line = now

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._plain and self.leave and self.done > self._start_done:
      self._line()
    self._plain = False


def message(text: str) -> None:
  """A line of the run's story (an evaluation, the epoch's relations), printed between progress updates."""
  tqdm.write(text) if interactive() else print(text, flush=True)


def tensorboard_scalars(record: dict) -> dict[str, float]:
  """The TensorBoard scalars of a metric record: `train/loss_itc`, `test/t2i/R1`, `relations/lrc_precision`, ..."""
  kind = record["kind"]
  prefix = record["split"] if kind == "eval" else kind
  flat = {}
  for key, value in record.items():
    if key in ("kind", "step", "epoch", "split"):
      continue
    if isinstance(value, dict):
      flat.update({f"{prefix}/{key}/{k}": v for k, v in value.items()})
    else:
      flat[f"{prefix}/{key}"] = value
  return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class MetricWriter:
  """The run's records: kept in memory on every process (evaluation and plots read them back),
  appended to metrics.jsonl by process 0 (`enabled`) and written there as TensorBoard scalars
  too (event files in the workdir: `tensorboard --logdir runs/`).

  A resumed run starts from the records up to the step it resumes at; any written after it
  (lost with an unsaved tail of steps) are dropped from the file, and TensorBoard hides them.
  """

  def __init__(self, run: rundir.RunDir, resume_step: int, enabled: bool = True):
    self.path = run.metrics
    self.enabled = enabled
    self.records = [r for r in run.records() if r["step"] <= resume_step]
    self._board = None
    if enabled:
      def write(tmp):
        with open(tmp, "w") as f:
          f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.records)

      files.replace_whole(self.path, write)
      self._board = summary_writer(run.path, purge_step=resume_step + 1 if resume_step else None)

  def write(self, record: dict) -> None:
    self.records.append(record)
    if self.enabled:
      try:
        with open(self.path, "a") as f:
          f.write(json.dumps(record, allow_nan=False) + "\n")
      except OSError as e:
        raise errors.WriteError(f"could not append to {self.path}: {e}") from e
      for tag, value in tensorboard_scalars(record).items():
        self._board.add_scalar(tag, value, record["step"])

  def of_kind(self, kind: str) -> list[dict]:
    return [r for r in self.records if r["kind"] == kind]

  def close(self) -> None:
    if self._board is not None:
      self._board.close()


def summary_writer(logdir: str, purge_step: int | None):
  """tensorboardX's SummaryWriter for `logdir`, imported without torch. Where torch is installed,
  tensorboardX imports it (1.2 s and ~0.2 GB here) only to recognise torch tensors; we write floats."""
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    import tensorboardX
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter(logdir, purge_step=purge_step, flush_secs=10)


def plot_curves(records: list[dict], path: str, title: str = "") -> None:
  """Loss terms against step, and retrieval metrics against epoch, in one PNG."""
  # Imported here: a second of every program's start-up, and most programs never draw.
  from matplotlib.figure import Figure

  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval" and "t2i" in r]  # a diverged evaluation has no figures
  fig = Figure(figsize=(12, 4.5))  # no pyplot: no global figure state, no GUI backend
  ax_loss, ax_eval = fig.subplots(1, 2)
  loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
  for key in loss_keys:
    pts = [(r["step"], r[key]) for r in train if key in r and math.isfinite(r[key]) and r[key] > 0]
    if pts:
      ax_loss.plot(*zip(*pts), label=key)
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss")
  ax_loss.set_yscale("log")
  ax_loss.grid(alpha=0.3)
  if ax_loss.lines:
    ax_loss.legend()
  for split in sorted({r["split"] for r in evals}):
    rows = [r for r in evals if r["split"] == split]
    for metric, style in (("R1", "-"), ("mAP", "--")):
      ax_eval.plot([r["epoch"] for r in rows], [r["t2i"][metric] for r in rows], style, marker="o",
                   label=f"{split} t2i {metric}")
  ax_eval.set_xlabel("epoch")
  ax_eval.set_ylabel("%")
  ax_eval.grid(alpha=0.3)
  if evals:
    ax_eval.legend()
  fig.suptitle(title)
  # Fixed margins, not `tight_layout` (which draws the figure once more to measure it: 0.6 -> 0.4 s a plot).
  fig.subplots_adjust(left=0.075, right=0.985, bottom=0.12, top=0.9, wspace=0.18)
  files.replace_whole(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


class Curves:
  """A run's curves (`plot_curves`), redrawn when records were written since they were last drawn:
  at the end of a run, and during it once `every_seconds` have passed since the start or the last
  drawing (a drawing takes ~0.4 s: a run of seconds-long epochs would spend a third of its time on them)."""

  def __init__(self, path: str, title: str = "", every_seconds: float = 30.0, clock=time.monotonic):
    self._path, self._title, self._every, self._clock = path, title, every_seconds, clock
    self._drawn, self._drawn_at = -1, clock()

  def draw(self, records: list[dict], end: bool = False) -> None:
    if len(records) == self._drawn or (not end and self._clock() - self._drawn_at < self._every):
      return
    plot_curves(records, self._path, self._title)
    self._drawn, self._drawn_at = len(records), self._clock()


def format_metrics(metrics: dict[str, float]) -> str:
  """`name=value` pairs, two decimals."""
  return " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
