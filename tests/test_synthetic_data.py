"""The embedded synthetic person–text set: real array_record files, read back TF-free."""

import glob
import itertools
import os

import numpy as np
import pytest

from data_prep import synthetic_persons, synthetic_render
from dgia_jax.data import datasets
from tests import helpers


@pytest.fixture(scope="module")
def builder(data_dir):
  return datasets.get_builder(helpers.tiny_config(data_dir).data, prepare=False)


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def test_writes_array_record_files_and_tokenizer(builder):
  files = glob.glob(os.path.join(builder.data_dir, "*.array_record*"))
  assert {os.path.basename(f).split(".")[0].split("-")[1] for f in files} == {"train", "val", "test"}
  assert os.path.exists(os.path.join(builder.data_dir, datasets.SYNTHETIC_TOKENIZER_FILE))


def test_split_sizes_images_and_captions(builder):
  cfg = builder.builder_config
  for split, n_ids in zip(synthetic_persons.SPLITS, cfg.num_ids):
    records = _records(builder, split)
    assert len(records) == n_ids * cfg.views_per_id
    for r in records:
      assert r["image"].shape == (*cfg.image_size, 3) and r["image"].dtype == np.uint8
      assert len(r["captions"]) == cfg.captions_per_image
      assert all(c.strip() for c in r["captions"])


def test_splits_have_disjoint_identities(builder):
  pids = {s: {int(r["person_id"]) for r in _records(builder, s)} for s in synthetic_persons.SPLITS}
  for a, b in itertools.combinations(pids.values(), 2):
    assert not a & b


def test_views_of_one_identity_differ(builder):
  by_pid = {}
  for r in _records(builder, "train"):
    by_pid.setdefault(int(r["person_id"]), []).append(r["image"].astype(np.int32))
  views = next(iter(by_pid.values()))
  assert np.abs(views[0] - views[1]).mean() > 5


def test_identities_include_hard_negatives_and_are_disjoint_across_splits():
  rng = np.random.default_rng(0)
  taken: set = set()
  train = synthetic_render.sample_identities(rng, 200, taken, sibling_prob=0.5)
  test = synthetic_render.sample_identities(rng, 50, taken, sibling_prob=0.5)
  keys = [dict(i.key()) for i in train]
  assert len({i.key() for i in train + test}) == 250

  def distance(a, b):
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))

  close = sum(any(distance(a, b) <= 2 for b in keys[:i]) for i, a in enumerate(keys))
  assert close > 50, "many identities should differ from another in only one or two attributes"


def test_captions_mention_subsets_so_they_match_several_identities():
  rng = np.random.default_rng(1)
  idents = synthetic_render.sample_identities(rng, 100, set(), sibling_prob=0.5)
  colours = set(synthetic_render.GARMENT_COLOURS)
  mentioned = [len(colours & set(synthetic_render.caption(rng, i).lower().replace(".", "").split()))
               for i in idents]
  # Every identity has at least 4 coloured items; captions often name fewer.
  assert np.mean(mentioned) < 4 and min(mentioned) >= 1


def test_preparation_is_deterministic(tmp_path, data_dir):
  cfg = helpers.tiny_config(str(tmp_path)).data
  again = datasets.get_builder(cfg, prepare=True)
  first = datasets.get_builder(helpers.tiny_config(data_dir).data, prepare=False)
  a, b = _records(first, "test"), _records(again, "test")
  key = lambda r: int(r["image_id"])  # noqa: E731
  for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert list(x["captions"]) == list(y["captions"])


def test_reading_does_not_import_tensorflow(data_dir):
  code = f"""
import sys
from tests import helpers
from dgia_jax.data import datasets
tok, splits = datasets.load(helpers.tiny_config({data_dir!r}).data, ("train", "test"))
splits["train"].load_image(0)
assert "tensorflow" not in sys.modules, "tensorflow was imported"
print("ok")
"""
  assert "ok" in helpers.run_python(code).stdout
