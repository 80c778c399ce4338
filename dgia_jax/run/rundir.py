"""A training run's directory: its layout is owned here and nowhere else.

  <workdir>/
    config.json      the config the run trained with (written when it starts)
    checkpoints/     orbax checkpoints of the train state, the newest `checkpoint.keep`
    best/            the best-on-validation parameters
    metrics.jsonl    one JSON record per logging interval (`train`), evaluation (`eval`),
                     clustering (`clusters`) and epoch's relations (`relations`)
    curves.png       loss terms against step, retrieval figures against epoch
    results.json     final and best-on-validation figures, every evaluation, the config
    evaluations/     figures of `tools/evaluate`: <dataset>-<split>-step<N>[-best].json
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from dgia_jax.common import errors
from dgia_jax.run import files

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
RESULTS_FILE = "results.json"
EVALUATIONS_DIR = "evaluations"


def _file(name: str) -> property:
  return property(lambda self: os.path.join(self.path, name), doc=f"<workdir>/{name}")


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The files of the run in `path`."""

  path: str

  config_file = _file(CONFIG_FILE)
  checkpoints = _file(CHECKPOINT_DIR)
  best = _file(BEST_DIR)
  metrics = _file(METRICS_FILE)
  curves = _file(CURVES_FILE)
  results = _file(RESULTS_FILE)

  def is_run(self) -> bool:
    """Whether this is a dgia-jax training workdir: its saved config and checkpoints (a Hugging
    Face CLIP folder has a config.json too)."""
    return bool(self.path) and os.path.isfile(self.config_file) and os.path.isdir(self.checkpoints)

  def read_config(self) -> ml_collections.ConfigDict:
    if not os.path.isfile(self.config_file):
      raise errors.MissingPathError(f"{self.path} is not a training workdir: {CONFIG_FILE} is missing")
    return ml_collections.ConfigDict(files.read_json(self.config_file, dict))

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    """config.json, whole or not at all (a full disk leaves the one there before)."""
    files.make_dirs(self.path, "--workdir")
    files.write_text(self.config_file, config.to_json_best_effort(indent=1))

  def read_results(self) -> dict:
    return files.read_json(self.results, dict)

  def records(self, kind: str | None = None) -> list[dict]:
    """The records of metrics.jsonl (of `kind` only, if given), in order. A last line cut short (a
    write the process did not finish) is left out; a damaged line before it is an error."""
    if not os.path.exists(self.metrics):
      return []
    with open(self.metrics) as f:
      lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except ValueError as e:
        if i < len(lines) - 1:
          raise errors.BadInputError(f"{self.metrics}: line {i + 1} is not a JSON record: {e}") from e
    return [r for r in records if kind in (None, r["kind"])]

  def evaluation_file(self, dataset: str, split: str, step: int, best: bool) -> str:
    name = f"{dataset}-{split}-step{step}{'-best' if best else ''}.json"
    return os.path.join(self.path, EVALUATIONS_DIR, name)
