import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import features
from dgia_jax.data import datasets, pipeline


@pytest.fixture(scope="module")
def splits(data_dir):
  from tests import helpers

  return datasets.load(helpers.tiny_config(data_dir).data, ("train", "test"))


def test_pair_table(splits):
  tok, s = splits
  train = s["train"]
  assert train.num_pairs == 2 * train.num_images == 64
  assert train.tokens.shape == (64, 32) and train.tokens.dtype == np.int32
  assert (np.bincount(train.pair_record) == 2).all()
  assert train.load_image(0).shape == (32, 16, 3)


def _batch_pairs(order: pipeline.EpochOrder, step: int) -> np.ndarray:
  return np.array([order.pair(step, row) for row in range(order.global_batch)])


def test_resize_filter_is_a_switch(tiny_config):
  """`data.resize`: bilinear (torchvision's default, the reference code's) or bicubic, both from PIL."""
  builder = datasets.get_builder(tiny_config.data)
  tokenizer = datasets.get_tokenizer(tiny_config.data, builder)
  imgs = {r: pipeline.open_split(builder, "test", tokenizer, (20, 10), r).load_image(0) for r in ("bicubic", "bilinear")}
  raw = builder.as_data_source(split="test", decoders={"image": tfds.decode.SkipDecoding()})[0]["image"]
  source = Image.open(io.BytesIO(raw)).convert("RGB")
  assert source.size == (16, 32)  # stored at 32x16, read at 20x10
  np.testing.assert_array_equal(imgs["bilinear"], np.asarray(source.resize((10, 20), Image.Resampling.BILINEAR)))
  np.testing.assert_array_equal(imgs["bicubic"], np.asarray(source.resize((10, 20), Image.Resampling.BICUBIC)))
  assert not np.array_equal(imgs["bilinear"], imgs["bicubic"])
  with pytest.raises(ValueError, match="data.resize must be one of"):
    pipeline.open_split(builder, "test", tokenizer, (20, 10), "nearest")
  tiny_config.data.resize = "bilinear"
  assert datasets.load(tiny_config.data, ("test",))[1]["test"].resize == "bilinear"


def test_epoch_order_is_a_deterministic_permutation_per_epoch():
  order = pipeline.EpochOrder(num_pairs=50, global_batch=8, seed=3)
  assert order.steps_per_epoch == 6
  epoch0 = np.concatenate([_batch_pairs(order, s) for s in range(6)])
  epoch1 = np.concatenate([_batch_pairs(order, s) for s in range(6, 12)])
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
  assert not np.array_equal(epoch0, epoch1)
  again = pipeline.EpochOrder(num_pairs=50, global_batch=8, seed=3)
  np.testing.assert_array_equal(_batch_pairs(again, 7), _batch_pairs(order, 7))
  np.testing.assert_array_equal(_batch_pairs(order, 7), order.permutation(1)[8:16])  # step 7: epoch 1, batch 1


def test_train_batches_carry_no_person_ids_and_follow_the_order(splits):
  _, s = splits
  train = s["train"]
  order = pipeline.EpochOrder(train.num_pairs, 16, seed=0)
  batches = list(pipeline.train_batches(train, order, start_step=0, end_step=5, num_threads=2))
  assert set(batches[0]) == {"image", "tokens", "index"}
  assert batches[0]["image"].shape == (16, 32, 16, 3) and batches[0]["image"].dtype == np.uint8
  for step, b in enumerate(batches):
    np.testing.assert_array_equal(b["index"], _batch_pairs(order, step))
    np.testing.assert_array_equal(b["tokens"], train.tokens[b["index"]])
    np.testing.assert_array_equal(b["image"][3], train.load_image(train.pair_record[b["index"][3]]))


def test_processes_split_each_global_batch_and_resume_is_exact(splits):
  _, s = splits
  train = s["train"]
  order = pipeline.EpochOrder(train.num_pairs, 16, seed=1)
  whole = list(pipeline.train_batches(train, order, start_step=2, end_step=6, num_threads=2))
  parts = [list(pipeline.train_batches(train, order, start_step=2, end_step=6, process_index=p, process_count=2,
                                       num_threads=2)) for p in range(2)]
  for w, a, b in zip(whole, *parts):
    for key in w:
      np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    pipeline.train_batches(train, order, start_step=0, end_step=1, process_count=3)


def test_eval_batches_cover_every_item_once_with_padding(splits):
  _, s = splits
  test = s["test"]
  imgs = list(pipeline.eval_image_batches(test, 12, num_threads=2))
  valid = np.concatenate([b["valid"] for b in imgs])
  assert valid.sum() == test.num_images and len(valid) % 12 == 0
  first = np.concatenate([b["image"] for b in imgs])[valid]
  np.testing.assert_array_equal(first[5], test.load_image(5))
  txt = list(pipeline.row_batches(test.tokens, "tokens", 12))
  tokens = np.concatenate([b["tokens"] for b in txt])[np.concatenate([b["valid"] for b in txt])]
  np.testing.assert_array_equal(tokens, test.tokens)
  parts = [list(pipeline.row_batches(test.tokens, "tokens", 12, p, 2)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([parts[0][0]["tokens"], parts[1][0]["tokens"]]), txt[0]["tokens"])


class _BadRecords(tfds.core.GeneratorBasedBuilder):
  """A one-split data set whose second record has an empty caption and third a corrupt image."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=features.person_text_features())

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(buf, format="PNG")
    good = buf.getvalue()
    rows = [(good, ["a man"]), (good, ["a woman", " "]), (good, ["a child"])]
    for i, (img, caps) in enumerate(rows):
      yield i, {"image": img, "captions": caps, "person_id": i, "image_id": i, "path": f"imgs/{i}.png"}


def test_empty_caption_names_the_record(tmp_path, splits):
  tok, _ = splits
  builder = _BadRecords(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  with pytest.raises(ValueError, match=r"train record \d \(imgs/1.png\): caption 1 is empty"):
    pipeline.open_split(builder, "train", tok, (8, 4))


def test_corrupt_image_names_the_record(splits):
  _, s = splits
  test = s["test"]
  broken = pipeline.Split(**{**test.__dict__, "source": [{"image": b"not an image"}]})
  with pytest.raises(ValueError, match=r"cannot decode test record 0 \(test/.*\.png\): cannot identify image file"):
    broken.load_image(0)


def test_missing_data_is_a_clear_error(tmp_path):
  from tests import helpers

  cfg = helpers.tiny_config(str(tmp_path / "nowhere")).data
  with pytest.raises(FileNotFoundError, match="is not prepared under .*nowhere.*prepare=True"):
    datasets.get_builder(cfg, prepare=False)
