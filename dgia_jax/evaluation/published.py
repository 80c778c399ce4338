"""The field's published figures (`published.json`, as data), printed beside ours.

Each method's text→image R1/R5/R10/mAP/mINP on each benchmark's test split, as its paper or README
gives them; the field's code picks its reported epoch on the test split, so they compare with
dgia-jax's `best_on_test` figures (labelled as such), not with its validation-selected ones.
"""

from __future__ import annotations

import json
import os

from dgia_jax.evaluation.metrics import METRIC_NAMES

FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")


def figures(dataset: str) -> dict[str, dict[str, float]]:
  """{method: {"R1": ..., ...}} of every method that published figures on `dataset` (none: {})."""
  with open(FILE, encoding="utf-8") as f:
    methods = json.load(f)["methods"]
  return {name: m[dataset] for name, m in methods.items() if dataset in m}


def table(dataset: str, ours: dict[str, tuple[str, dict[str, float]]]) -> str:
  """A text table of `ours` ({label: (selection, t2i figures)}) above the published rows of `dataset`."""
  head = f"{'':<28}" + "".join(f"{m:>8}" for m in METRIC_NAMES)
  rows = [head]
  for label, (selection, t2i) in ours.items():
    rows.append(f"{label:<28}" + "".join(f"{t2i[m]:>8.2f}" for m in METRIC_NAMES) + f"  ({selection})")
  for name, published in figures(dataset).items():
    cells = "".join(f"{published[m]:>8.2f}" if m in published else f"{'-':>8}" for m in METRIC_NAMES)
    rows.append(f"{name + ' (published)':<28}{cells}  (best test epoch)")
  return "\n".join(rows)
