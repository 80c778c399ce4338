"""Metrics to a JSONL file, results as JSON, and training curves as PNG."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dgia_jax import rundir  # noqa: E402


class MetricWriter:
  """The run's records: kept in memory on every process (evaluation and plots read them back) and
  appended to metrics.jsonl by process 0 (`enabled`).

  A resumed run starts from the records up to the step it resumes at; any written after it
  (lost with an unsaved tail of steps) are dropped from the file too.
  """

  def __init__(self, run: rundir.RunDir, resume_step: int, enabled: bool = True):
    self.path = run.metrics
    self.enabled = enabled
    self.records = [r for r in run.records() if r["step"] <= resume_step]
    if enabled:
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)

  def write(self, record: dict) -> None:
    self.records.append(record)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def of_kind(self, kind: str) -> list[dict]:
    return [r for r in self.records if r["kind"] == kind]


def write_json(path: str, obj) -> None:
  """`obj` as indented JSON at `path`, written whole or not at all (a temporary file renamed)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def plot_curves(records: list[dict], path: str, title: str = "") -> None:
  """Loss terms against step, and retrieval metrics against epoch, in one PNG."""
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
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
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def format_metrics(metrics: dict[str, float]) -> str:
  """`name=value` pairs, two decimals."""
  return " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
