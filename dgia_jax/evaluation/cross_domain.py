"""The cross-domain evaluator (`type="cross_domain"`): another benchmark's split, read with the run's
tokenizer, image size, resize filter and context length — the field's generalisation table (trained
on CUHK-PEDES, tested on ICFG-PEDES or RSTPReid) after every epoch.

  c.evals.icfg = dict(type="cross_domain", dataset="icfg_pedes", manual_dir="/path/ICFG-PEDES", split="test")

The benchmark's own splits are read (no identities held out), built into the run's `data_dir` on
first use.
"""

from __future__ import annotations

import ml_collections

from dgia_jax.data import datasets
from dgia_jax.evaluation import retrieval


class Evaluator(retrieval.Evaluator):
  """Figures of split `cfg.split` of benchmark `cfg.dataset` (its original folder `cfg.manual_dir`)."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
    super().__init__(name, cfg, config)
    self._data = datasets.cross_domain(config.data, cfg.dataset, cfg.get("manual_dir", ""),
                                       datasets.tokenizer_path(config.data))
