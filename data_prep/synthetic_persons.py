"""TFDS builder for the embedded synthetic person–text data set (no downloads).

Sizes come from a `SyntheticPersonsConfig`; its name encodes every size so differently sized
sets never collide in one `data_dir`. Splits `train`, `val` and `test` hold disjoint
identities. The tokenizer the set is read with is trained on its train captions by the reader
(`dgia_jax.data.datasets`), not here.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import features, synthetic_render

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(kw_only=True)
class SyntheticPersonsConfig(tfds.core.BuilderConfig):
  """Sizes and difficulty of the synthetic set."""

  num_ids: tuple[int, int, int] = (500, 50, 100)  # train, val, test identities
  views_per_id: int = 4
  captions_per_image: int = 2
  image_size: tuple[int, int] = (96, 32)  # height, width
  sibling_prob: float = 0.5
  mention_prob: float = 0.6
  seed: int = 0
  tokenizer_vocab_size: int = 600

  @classmethod
  def from_sizes(cls, **sizes) -> "SyntheticPersonsConfig":
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in sizes.items()}
    probe = cls(name="probe", **fields)
    h, w = probe.image_size
    name = (f"ids{'-'.join(map(str, probe.num_ids))}_v{probe.views_per_id}_c{probe.captions_per_image}"
            f"_{h}x{w}_sib{probe.sibling_prob:g}_men{probe.mention_prob:g}_voc{probe.tokenizer_vocab_size}"
            f"_s{probe.seed}")
    return cls(name=name, **fields)


class SyntheticPersons(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered pedestrians with attribute captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = []  # sizes always come from a config built by `SyntheticPersonsConfig.from_sizes`

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features.person_text_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    identities = self._identities()
    return {split: self._generate_examples(split, identities[split]) for split in SPLITS}

  def _identities(self) -> dict[str, list[synthetic_render.Identity]]:
    cfg = self.builder_config
    rng = np.random.default_rng([cfg.seed, 0])
    taken: set = set()
    return {split: synthetic_render.sample_identities(rng, n, taken, cfg.sibling_prob)
            for split, n in zip(SPLITS, cfg.num_ids)}

  def _generate_examples(self, split: str, identities) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    split_idx = SPLITS.index(split)
    first_pid = sum(cfg.num_ids[:split_idx])
    h, w = cfg.image_size
    for i, ident in enumerate(identities):
      pid = first_pid + i
      for view in range(cfg.views_per_id):
        rng = np.random.default_rng([cfg.seed, 1, pid, view])
        image = synthetic_render.render_view(rng, ident, h, w)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        captions = [synthetic_render.caption(rng, ident, cfg.mention_prob) for _ in range(cfg.captions_per_image)]
        image_id = i * cfg.views_per_id + view
        yield f"{pid}_{view}", {
            "image": buf.getvalue(),
            "captions": captions,
            "person_id": pid,
            "image_id": image_id,
            "path": f"{split}/{pid:06d}_{view}.png",
        }
