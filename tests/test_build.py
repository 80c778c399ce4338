"""The one build chain: a fine-tuning start from an earlier run."""

import jax
import numpy as np
import pytest

from dgia_jax.data import datasets
from dgia_jax.inference import rebuild
from dgia_jax.training import train


def test_fine_tuning_starts_from_a_run_with_its_tokenizer(trained, tiny_config, tmp_path):
  """`model.init_from` = a training workdir: its final parameters are the start, and its
  tokenizer (not the new data set's own) encodes the captions and is recorded in the config."""
  pre_cfg, pre_dir, _ = trained
  cfg = tiny_config
  cfg.data.synthetic.seed = 1  # another build: identities, captions and its own tokenizer differ
  cfg.model.init_from = pre_dir
  cfg.loss.update(dict(lrc=False, iasc=False, gsrc=False))
  cfg.train.update(dict(epochs=1, lr=1e-12))
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  saved, tok, _, params, _ = rebuild.load_trained(str(tmp_path / "run"))
  own = datasets.tokenizer_path(cfg.data, datasets.get_builder(cfg.data, prepare=False))
  assert saved.data.tokenizer == rebuild.run_tokenizer_path(pre_dir) != own
  captions = ["a woman wearing a red coat and black trousers"]
  np.testing.assert_array_equal(tok.encode(captions), rebuild.load_trained(pre_dir)[1].encode(captions))
  _, _, _, start, _ = rebuild.load_trained(pre_dir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, start)
  cfg.model.text.width = 48  # a model the run's weights do not fit
  with pytest.raises(ValueError, match="text/.* is .* there, the config's model has"):
    train.train_and_evaluate(cfg, str(tmp_path / "other"))
