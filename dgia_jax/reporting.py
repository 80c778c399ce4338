"""Metrics to a JSONL file, results as JSON, and training curves as PNG."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends one JSON object per record to `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled

  def history(self, up_to_step: int) -> list[dict]:
    """Records written so far, dropping any past `up_to_step` (lost with an unsaved tail)."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]

  def rewrite(self, records: list[dict]) -> None:
    if self.enabled:
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
