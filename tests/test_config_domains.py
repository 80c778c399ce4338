"""Every config key has a domain, checked in one place: values with no meaning are refused naming
their key, never passed on to fail later (fuzzed in-process with hypothesis)."""

import glob
import math
import os

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgia_jax.common import config_files, errors
from dgia_jax.training import config_domains
from tests import helpers

CONFIGS = sorted(p for p in glob.glob(os.path.join(helpers.ROOT, "configs", "*.py")) if not p.endswith("base.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_key_of_every_shipped_config_has_a_domain_and_holds(path):
  assert config_domains.problems_of(config_files.load_config(path)) == []


def test_the_tests_tiny_config_holds():
  assert config_domains.problems_of(helpers.tiny_config("/tmp/unused")) == []


@pytest.mark.parametrize("key, value, says", [
    ("train.lr", math.inf, "train.lr=inf must be a finite number > 0"),
    ("train.lr", 0.0, "train.lr=0.0 must be a finite number > 0"),
    ("loss.temperature", 0.0, "loss.temperature=0.0 must be a finite number > 0"),
    ("loss.temperature", math.nan, "loss.temperature=nan must be a finite number > 0"),
    ("relations.image_threshold", 5.0, "relations.image_threshold=5.0 must be a finite number in [-1, 1]"),
    ("train.warmup_epochs", -1.0, "train.warmup_epochs=-1.0 must be a finite number ≥ 0"),
    ("gsrc.k", 0, "gsrc.k=0 must be a whole number in [1, 1024]"),
    ("data.image_size", (0, 0), "data.image_size=(0, 0) must be 2 whole numbers ≥ 1"),
    ("train.batch_size", True, "train.batch_size=True must be a whole number ≥ 1"),
    ("gsrc.rows", "everything", "gsrc.rows='everything' must be one of 'batch', 'batch+bank'"),
])
def test_a_value_outside_its_domain_is_named_with_its_key(key, value, says):
  config = helpers.load_config("default")
  _set(config, key, value)
  with pytest.raises(errors.ConfigError) as e:
    config_domains.check(config)
  assert str(e.value) == says


def test_unknown_keys_and_broken_rules_between_keys_are_named():
  config = helpers.load_config("default")
  config.unlock()
  config.train.lr_typo = 1.0
  assert config_domains.problems_of(config) == [
      "train.lr_typo is not a config key dgia-jax knows (a typo in the config file?)"]
  config = helpers.load_config("default")
  config.data.image_size = (96, 30)  # not a multiple of the patch, 8
  config.model.text.heads = 3  # does not divide 128
  config.train.min_lr = 1.0  # above lr
  assert config_domains.problems_of(config) == [
      "data.image_size=(96, 30) must be a multiple of model.vision.patch_size=8",
      "model.text.heads=3 must divide model.text.width=128",
      "train.min_lr=1.0 must not exceed train.lr=0.0001"]


def _set(config, key, value):
  *parents, name = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[name] = value


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.tuples(st.integers(-3, 300), st.integers(-3, 300)),
                    st.lists(st.integers(-3, 5), max_size=4), st.sampled_from(["bilinear", ">", "raw", "stop", "R1"]))


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(config_domains.KEYS)), value=_VALUES)
def test_any_value_of_any_key_passes_or_is_refused_naming_that_key(key, value):
  key = key.replace("*", "val")  # a pattern of the table (`evals.*.split`): the val evaluator's
  config = helpers.load_config("default")
  if key.startswith("data.") and key.split(".")[1] not in config.data:  # a benchmark's keys
    config = helpers.load_config("cuhk_pedes")
  _set(config, key, value)
  try:
    config_domains.check(config)
  except errors.ConfigError as e:
    assert key in str(e), (key, value, str(e))
  else:  # ml_collections may convert a value as it stores it (False -> 0.0 in a float field)
    assert config_domains.key_of(key).domain.holds(config_domains.leaves(config)[key]), (key, value)


def test_a_rerun_may_change_policy_and_plumbing_but_not_what_is_trained():
  saved = helpers.load_config("default")
  config = ml_collections.ConfigDict(saved.to_dict())
  config.train.log_every, config.data.data_dir, config.relations.on_collapse = 50, "/elsewhere", "stop"
  config.train.epochs = 9  # a longer run
  assert config_domains.conflicts(saved, config) == []
  config.model.vision.width, config.seed = 64, 3
  assert config_domains.conflicts(saved, config) == ["model.vision.width: the run has 128, this config 64",
                                                     "seed: the run has 0, this config 3"]


def test_a_run_saved_before_a_key_was_retired_still_resumes():
  config = helpers.load_config("default")
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.data.eval_split, saved.eval.test_each_epoch = "test", True  # the keys config.evals replaced
  assert config_domains.conflicts(saved, config) == []
  saved.data.train_split = "val"
  assert config_domains.conflicts(saved, config) == ["data.train_split: the run has 'val', this config 'train'"]


def test_a_run_saved_before_the_field_text_pipeline_resumes_as_it_trained():
  config = helpers.load_config("default")
  saved = ml_collections.ConfigDict(config.to_dict())
  del saved.data["text_pipeline"], saved.iasc["mask_first"]
  saved.iasc.mask_at_least_one = False  # today's mask_first=False
  assert config_domains.conflicts(saved, config) == []
  config.data.text_pipeline = "irra"
  assert config_domains.conflicts(saved, config) == ["data.text_pipeline: the run has 'hf', this config 'irra'"]
  config.data.text_pipeline, saved.iasc.mask_at_least_one = "hf", True  # a rule of the past: named
  assert config_domains.conflicts(saved, config) == ["iasc.mask_at_least_one: the run has True, this config '<absent>'",
                                                     "iasc.mask_first: the run has '<absent>', this config False"]
