"""The ablation study: every row is a set of config switches of the same trainer.

  python -m dgia_jax.tools.ablate --config configs/default.py --workdir runs/ablation \
      --rows itc,lrc,gsrc,lrc+gsrc,full,oracle --seeds 3

Each (row, seed) trains in `workdir/<row>/seed<k>` with identical data and schedule; `seed`
sets initialisation, data order and perturbations, and is the same across rows. Finished
runs are skipped and interrupted ones resume, so the command can simply be rerun. Writes
`ablation.md` (mean ± std over seeds of text→image Rank-1/5/10, mAP, mINP, for the last
epoch and for the best-on-validation epoch, with wall time and relation precision; and each
row's paired difference to the first row, seed by seed),
`ablation.json` and `ablation.png` into the workdir.
"""

from __future__ import annotations

import os
import time

import numpy as np
from matplotlib.figure import Figure

from dgia_jax.common import errors
from dgia_jax.method import objective
from dgia_jax.run import files, rundir
from dgia_jax.training import train

# The objective's terms (its term table): the base loss alone, each other term beside it, all of them.
_BASE, *_OTHERS = objective.TERM_NAMES
_LOSSES_OFF = {f"loss.{name}": False for name in _OTHERS}
ROWS: dict[str, dict[str, object]] = {
    _BASE: dict(_LOSSES_OFF),
    **{name: {**_LOSSES_OFF, f"loss.{name}": True} for name in _OTHERS},
    "lrc+gsrc": {**_LOSSES_OFF, "loss.lrc": True, "loss.gsrc": True},  # the paper's both-granularities row
    "full": {f"loss.{name}": True for name in _OTHERS},
    # Supervised upper bound (measurement only): the full method with true ids as in-batch relations.
    "oracle": {"loss.lrc": True, "loss.iasc": True, "loss.gsrc": True, "relations.oracle": True},
    # Beyond the paper: cluster pseudo identities as the in-batch relations (alone, and OR-ed into the full method).
    "clusters": {**_LOSSES_OFF, "loss.lrc": True, "relations.clusters.enabled": True,
                 "relations.clusters.mode": "replace"},
    "full+clusters": {"loss.lrc": True, "loss.iasc": True, "loss.gsrc": True, "relations.clusters.enabled": True,
                      "relations.clusters.mode": "or"},
}
# The reference code's settings where ours differ (docs/REPRODUCING.md), each a row on top of `full`,
# and all of them together (`code`).
CODE_SWITCHES: dict[str, dict[str, object]] = {
    "adam_eps": {"train.eps": 1e-3},
    "sdm_eps": {"loss.relation_eps": 1e-6},
    "strict": {"relations.compare": ">"},
    "bank_rows": {"gsrc.rows": "batch+bank"},
    "skip_top1": {"gsrc.candidates": "skip_top1"},
    "raw_bank": {"gsrc.bank_features": "raw"},
    "perturbed_relations": {"iasc.relations": "perturbed"},
    "mean_erase": {"iasc.erase_fill": "mean"},
    "first_masked": {"iasc.mask_first": True},
    "bilinear": {"data.resize": "bilinear"},
    "epoch_schedule": {"train.schedule_per": "epoch"},
}
ROWS.update({f"full+{name}": {**ROWS["full"], **switch} for name, switch in CODE_SWITCHES.items()})
ROWS["code"] = {**ROWS["full"], **{k: v for switch in CODE_SWITCHES.values() for k, v in switch.items()}}
# The relation rule for data without ids (mutual top-k within the batch) beside the paper's, on both recipes.
ROWS.update({f"{row}+mutual_topk": {**ROWS[row], "relations.rule": "mutual_topk"} for row in ("full", "code")})
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
TIME_FILE = "wall_seconds.json"  # beside each run of the study: its training time, resumes included


def row_config(config, row: str, seed: int):
  """A copy of `config` with the switches of `row` and `seed`."""
  if row not in ROWS:
    raise errors.ConfigError(f"unknown ablation row '{row}'; known: {sorted(ROWS)}")
  c = config.copy_and_resolve_references()
  c.unlock()
  for path, value in ROWS[row].items():
    *parents, key = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[key] = value
  c.seed = seed
  c.name = f"{config.get('name', 'run')} {row} seed {seed}"
  return c


def run_one(config, workdir: str) -> dict:
  """Trains one (row, seed) unless its results exist; returns results with its wall time."""
  run = rundir.RunDir(workdir)
  time_path = os.path.join(workdir, TIME_FILE)
  if not os.path.exists(run.results):
    spent = files.read_json(time_path, dict)["seconds"] if os.path.exists(time_path) else 0.0
    started = time.time()
    train.train_and_evaluate(config, workdir)
    files.write_json(time_path, {"seconds": spent + time.time() - started})
  results = run.read_results()
  results["wall_seconds"] = files.read_json(time_path, dict)["seconds"]
  relations = run.records("relations")
  results["relations"] = relations[-1] if relations else {}
  return results


def summarize(per_row: dict[str, list[dict]]) -> dict:
  """Mean and std over seeds of every figure the report shows."""
  def stats(values):
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}

  def paired(runs, base, which, metric):  # same seed: initialisation and data order cancel
    value = lambda r: r["final"]["t2i"][metric] if which == "last" else r["best_val"]["test"]["t2i"][metric]  # noqa: E731
    n = min(len(runs), len(base))
    return stats([value(a) - value(b) for a, b in zip(runs[:n], base[:n])])

  base_row, base = next(iter(per_row.items()))
  out = {}
  for row, runs in per_row.items():
    out[row] = {
        "seeds": len(runs),
        "last": {m: stats([r["final"]["t2i"][m] for r in runs]) for m in METRICS},
        "best_val": {m: stats([r["best_val"]["test"]["t2i"][m] for r in runs]) for m in METRICS}
        if all("best_val" in r for r in runs) else None,
        "wall_seconds": stats([r["wall_seconds"] for r in runs]),
        "relations": {k: stats([r["relations"][k] for r in runs])
                      for k in ("lrc_precision", "lrc_recall", "gsrc_precision", "iasc_precision")
                      if all(k in r["relations"] for r in runs)},
    }
    if row != base_row:
      out[row]["minus_" + base_row] = {
          f"{which}_{m}": paired(runs, base, which, m) for which in ("last", "best_val") for m in ("R1", "mAP")
          if which == "last" or (out[row]["best_val"] and out[base_row]["best_val"])}
  return out


def markdown(summary: dict, command: str) -> str:
  def cell(s):
    return f"{s['mean']:.2f} ± {s['std']:.2f}"

  lines = [f"Command: `{command}`", ""]
  for which, title in (("last", "last epoch"), ("best_val", "best epoch on validation identities")):
    lines += [f"Text→image, {title} (test split, mean ± std over seeds):", "",
              "| row | seeds | " + " | ".join(METRICS) + " | wall time / run |",
              "|---|---|" + "---|" * (len(METRICS) + 1)]
    for row, s in summary.items():
      if s[which] is None:
        continue
      lines.append(f"| {row} | {s['seeds']} | " + " | ".join(cell(s[which][m]) for m in METRICS)
                   + f" | {s['wall_seconds']['mean'] / 60:.1f} min |")
    lines.append("")
  base = next(iter(summary))
  diffs = [(row, s[f"minus_{base}"]) for row, s in summary.items() if f"minus_{base}" in s]
  if diffs:
    keys = list(diffs[0][1])  # "<last|best_val>_<metric>"
    labels = [f"Δ{k.rsplit('_', 1)[1]} {'last' if k.startswith('last') else 'best-val'}" for k in keys]
    lines += [f"Paired differences against `{base}` (same seed; mean ± std over seeds, percentage points):", "",
              "| row | " + " | ".join(labels) + " |", "|---|" + "---|" * len(keys)]
    for row, d in diffs:
      lines.append(f"| {row} | " + " | ".join(f"{d[k]['mean']:+.2f} ± {d[k]['std']:.2f}" for k in keys) + " |")
    lines.append("")
  rel_rows = [(row, s["relations"]) for row, s in summary.items() if s["relations"]]
  if rel_rows:
    keys = sorted({k for _, r in rel_rows for k in r})
    lines += ["Relations in the last epoch against the hidden train ids (percent, mean ± std):", "",
              "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row, r in rel_rows:
      lines.append(f"| {row} | " + " | ".join(cell(r[k]) if k in r else "" for k in keys) + " |")
    lines.append("")
  return "\n".join(lines)


def bar_chart(summary: dict, path: str) -> None:
  rows = list(summary)
  x = np.arange(len(rows))
  fig = Figure(figsize=(1.4 * len(rows) + 3, 4))
  ax = fig.subplots()
  for i, (metric, which) in enumerate((("R1", "last"), ("mAP", "last"), ("R1", "best_val"))):
    vals = [summary[r][which][metric] if summary[r][which] else {"mean": 0, "std": 0} for r in rows]
    ax.bar(x + (i - 1) * 0.27, [v["mean"] for v in vals], 0.27, yerr=[v["std"] for v in vals], capsize=3,
           label=f"t2i {metric} ({'last epoch' if which == 'last' else 'best on val'})")
  ax.set_xticks(x, rows)
  ax.set_ylabel("%")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  files.replace_whole(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def run_study(config, root: str, rows: list[str], seeds: int, command: str) -> str:
  """Trains every (row, seed) under `root` (finished runs are reused) and writes ablation.md,
  ablation.json and ablation.png there; returns the markdown report."""
  if not rows:
    raise errors.ConfigError(f"give at least one ablation row; known: {sorted(ROWS)}")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise errors.ConfigError(f"unknown ablation rows {unknown}; known: {sorted(ROWS)}")
  train.train_initial_run(config)  # a pre-training stage every row starts from, once
  per_row = {row: [] for row in rows}
  for seed in range(seeds):  # seed-major: an interrupted study has every row at equal seeds
    for row in rows:
      print(f"ablation: row {row}, seed {seed}", flush=True)
      per_row[row].append(run_one(row_config(config, row, seed), os.path.join(root, row, f"seed{seed}")))
  diverged = [f"{row} seed {seed}" for row, runs in per_row.items() for seed, r in enumerate(runs)
              if "t2i" not in r["final"]]
  if diverged:
    raise errors.NonFiniteError(f"{len(diverged)} runs of the study diverged and have no figures ({', '.join(diverged)}; "
                                "see their results.json): no table is made of them")
  summary = summarize(per_row)
  report = markdown(summary, command)
  files.write_text(os.path.join(root, "ablation.md"), report)
  files.write_json(os.path.join(root, "ablation.json"), summary)
  bar_chart(summary, os.path.join(root, "ablation.png"))
  return report
