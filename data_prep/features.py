"""The one example schema every person–text builder writes: one example per image."""

import numpy as np
import tensorflow_datasets as tfds


def person_text_features() -> tfds.features.FeaturesDict:
  """Image (encoded file bytes), all its captions, hidden person id, stable index, path."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "person_id": np.int64,
      "image_id": np.int64,
      "path": tfds.features.Text(),
  })
