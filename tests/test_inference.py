"""A trained run rebuilt from its directory, and its encoders."""

import json
import os

import pytest

from dgia_jax.common import parallel
from dgia_jax.data import datasets
from dgia_jax.inference import encoding, rebuild
from dgia_jax.run import rundir


def test_load_trained_gives_the_final_parameters(trained):
  cfg, workdir, _ = trained
  with open(os.path.join(workdir, rundir.RESULTS_FILE)) as f:
    results = json.load(f)  # the latest run in this workdir (another test may have resumed it)
  config, tokenizer, model, params, step = rebuild.load_trained(workdir)
  assert step == results["steps"] and config.train.batch_size == cfg.train.batch_size
  _, splits = datasets.load(config.data, ("test",))
  txt, img = encoding.extract_features(encoding.make_encoders(model, parallel.make_mesh()), params, splits["test"],
                                    parallel.make_mesh(), 16)
  from dgia_jax.evaluation import metrics

  metrics = metrics.evaluate_retrieval(txt, img, splits["test"].pair_person_ids, splits["test"].person_ids)
  assert metrics["t2i"] == pytest.approx(results["final"]["t2i"], abs=1e-3)
