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


def test_captions_cut_to_their_length_give_the_features_of_the_whole_context(tiny_config):
  """Rows run at their length rounded up to 16 tokens: the same features as every row at the full
  context (the tower is causal and read at end-of-text), whatever the rows' lengths and order."""
  import jax
  import numpy as np

  tokenizer, splits = datasets.load(tiny_config.data, ("test",))
  model = rebuild.build_model(tiny_config, tokenizer)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, *tiny_config.data.image_size, 3), np.float32),
                              np.zeros((1, tiny_config.data.context_length), np.int32))["params"]
  mesh = parallel.make_mesh()
  encoders = encoding.make_encoders(model, mesh)
  texts = ["a man", "a woman in a red coat carrying a black backpack !", "!", " ".join(["long"] * 100),
           "a man", "short hair , blue jeans and white shoes"]
  tokens = tokenizer.encode(texts)
  groups = encoding.length_groups(tokens, tokenizer.eot_id)
  assert [length for _, length in groups] == [16, 32] and 0 in groups[0][0] and 3 in groups[1][0]  # short, cut
  whole = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(params, tokens))
  cut = encoding.encode_tokens(encoders, params, tokens, mesh, 4)
  np.testing.assert_allclose(cut, whole, atol=1e-6)
  np.testing.assert_array_equal(cut[0], cut[4])  # a row's feature depends on its own tokens only
  np.testing.assert_array_equal(encoding.encode_tokens(encoders, params, tokens[::-1], mesh, 4), cut[::-1])
  queries = encoding.TextEncoder(rebuild.TrainedRun(tiny_config, tokenizer, model, params, 0), batch=3, warn=False)
  np.testing.assert_allclose(queries.embed(texts)[0], whole, atol=1e-6)  # queries run as captions do
  assert queries.embed([])[0].shape == (0, whole.shape[1])
