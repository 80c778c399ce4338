"""The retrieval evaluator (`type="retrieval"`): a split of the run's own data set, every caption a
query over every image (text→image) and every image a query over every caption (image→text),
Rank-1/5/10, mAP and mINP as the field computes them.

  c.evals.test = dict(type="retrieval", split="test", every="epoch")
"""

from __future__ import annotations

import ml_collections

from dgia_jax.data.pipeline import Split
from dgia_jax.evaluation import metrics
from dgia_jax.inference import encoding

EVERY = ("epoch", "last", "off")  # after every evaluation epoch; after the last epoch only; never


def evaluate_split(encoders, params, split: Split, mesh, global_batch: int) -> dict[str, dict[str, float]]:
  """Text→image and image→text R1/R5/R10, mAP, mINP (%) of `split`: every caption a query over every image.
  Raises NonFiniteError if any feature is not finite."""
  txt, img = encoding.extract_features(encoders, params, split, mesh, global_batch)
  return metrics.evaluate_retrieval(txt, img, split.pair_person_ids, split.person_ids)


class Evaluator:
  """Figures of split `cfg.split` of the data the run's config names.

  Attributes:
    name: the evaluator's name in `config.evals` (its records' `split`).
    split: the split it reads.
    every: "epoch", "last" or "off" (`EVERY`).
  """

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
    self.name, self.split, self.every = name, cfg.split, cfg.get("every", "epoch")
    self._data = config.data

  def data(self) -> ml_collections.ConfigDict:
    """The data config of the data set it reads (its split: `split`)."""
    return self._data

  def figures(self, encoders, params, split: Split, mesh, global_batch: int) -> dict[str, dict[str, float]]:
    """{"t2i": {...}, "i2t": {...}} of `params` on `split` (the opened `data()` split)."""
    return evaluate_split(encoders, params, split, mesh, global_batch)
