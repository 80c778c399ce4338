"""Inference: a trained run rebuilt from its directory (config, tokenizer, model, parameters), the
jitted encoders, feature extraction and the evaluation of a split. Never imports the trainer.

Features come in record order (images) and caption order (texts), through the eval transforms,
in padded global batches sharded over the mesh's `data` axis; every process receives all of them.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dgia_jax import checkpointing, errors, metrics, parallel, reporting, rundir
from dgia_jax.data import datasets
from dgia_jax.data.pipeline import Split, eval_image_batches, row_batches
from dgia_jax.data.tokenizer import Tokenizer
from dgia_jax.models import clip


def build_model(config: ml_collections.ConfigDict, tokenizer) -> clip.CLIP:
  """The two towers `config.model` describes, for `config.data`'s input and the tokenizer's vocabulary."""
  return clip.CLIP(clip.config_from_dict(config.model, tuple(config.data.image_size), tokenizer.vocab_size,
                                         tokenizer.eot_id, tokenizer.context_length))


def make_encoders(model: clip.CLIP, mesh):
  """Jitted image and text encoders over `data`-sharded batches."""
  data = parallel.data_sharding(mesh)
  enc_img = jax.jit(lambda p, im: model.apply({"params": p}, clip.normalize_images(im), method=clip.CLIP.encode_image),
                    out_shardings=data)
  enc_txt = jax.jit(lambda p, tok: model.apply({"params": p}, tok, method=clip.CLIP.encode_text), out_shardings=data)
  return enc_img, enc_txt


def _encode_all(encode, params, batches, key: str, mesh, rows: int, global_batch: int) -> np.ndarray:
  """float32 [rows, D]: `encode` over process-local eval batches, gathered on every process, padding
  dropped; progress on process 0 (a bar that goes away on a terminal; in a log, a line a minute)."""
  feats = []
  progress = reporting.Progress(-(-rows // global_batch), f"encode {key}", unit="batch", leave=False,
                                enabled=jax.process_index() == 0, every=60.0)
  for batch in batches:
    g = parallel.to_global(batch, mesh)
    f = parallel.to_host(encode(params, g[key]))
    feats.append(f[parallel.to_host(g["valid"])])
    progress.update()
  progress.close()
  return np.concatenate(feats)


def extract_image_features(encoders, params, split: Split, mesh, global_batch: int) -> np.ndarray:
  """float32 [R, D]: one feature per image, in record order, eval transforms."""
  batches = eval_image_batches(split, global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders[0], params, batches, "image", mesh, split.num_images, global_batch)


def encode_tokens(encoders, params, tokens: np.ndarray, mesh, global_batch: int) -> np.ndarray:
  """float32 [N, D]: one feature per row of tokens int32 [N, L] (captions or free-text queries)."""
  batches = row_batches(tokens, "tokens", global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders[1], params, batches, "tokens", mesh, len(tokens), global_batch)


def encode_images(encoders, params, images: np.ndarray, mesh, global_batch: int) -> np.ndarray:
  """float32 [N, D]: one feature per decoded image uint8 [N, H, W, 3] (`pipeline.decode_image`)."""
  batches = row_batches(images, "image", global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders[0], params, batches, "image", mesh, len(images), global_batch)


def extract_features(encoders, params, split: Split, mesh, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Text features float32 [P, D] (one per caption) and image features [R, D] (one per image)."""
  txt = encode_tokens(encoders, params, split.tokens, mesh, global_batch)
  return txt, extract_image_features(encoders, params, split, mesh, global_batch)


def evaluate_split(encoders, params, split: Split, mesh, global_batch: int) -> dict[str, dict[str, float]]:
  """Text→image and image→text R1/R5/R10, mAP, mINP (%) of `split`: every caption a query over every image."""
  txt, img = extract_features(encoders, params, split, mesh, global_batch)
  return metrics.evaluate_retrieval(txt, img, split.pair_person_ids, split.person_ids)


class TrainedRun(NamedTuple):
  """A training run rebuilt for inference: its config, tokenizer, model and one checkpoint's parameters."""

  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  model: clip.CLIP
  params: dict
  step: int


def restore_params(workdir: str, step: int | None = None, best: bool = False) -> tuple[int, dict]:
  """(step, parameters) of checkpoint `step` (default: latest) of the run in `workdir`, from
  its best-on-validation checkpoint if `best`."""
  run = rundir.RunDir(workdir)
  directory = run.best if best else run.checkpoints
  if not os.path.isdir(directory):
    raise errors.MissingPathError(f"{workdir} has no {os.path.basename(directory)}/ folder"
                            + (": the run evaluated no validation split" if best else " of checkpoints"))
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    step, raw = ckpt.restore_raw(step)
  finally:
    ckpt.close()
  return step, jax.tree.map(jnp.asarray, raw["params"])


def load_trained(workdir: str, step: int | None = None, best: bool = False) -> TrainedRun:
  """The run in `workdir` with the parameters of checkpoint `step` (default: latest); with `best`,
  of the best-on-validation epoch the run kept in `workdir/best`."""
  config = rundir.RunDir(workdir).read_config()
  step, params = restore_params(workdir, step, best)  # a run without checkpoints is named before its data
  tokenizer = datasets.get_tokenizer(config.data)
  return TrainedRun(config, tokenizer, build_model(config, tokenizer), params, step)


def run_tokenizer_path(workdir: str) -> str:
  """The tokenizer file or folder the training run in `workdir` encoded its captions with."""
  return datasets.tokenizer_path(rundir.RunDir(workdir).read_config().data)


class TextEncoder:
  """The run's text tower for free-text queries, tokenized as its captions were, compiled once for
  batches of `batch` queries: fewer are padded, more go in several calls, so no query count ever
  compiles again. Single-process."""

  def __init__(self, run: TrainedRun, batch: int = 16, warn: bool = True):
    if batch < 1:
      raise errors.ConfigError(f"the query batch must be at least 1, got {batch}")
    self.tokenizer, self.batch, self._params, self._warn = run.tokenizer, batch, run.params, warn
    self.max_pieces = run.tokenizer.context_length - 2  # more are cut
    self._encode = jax.jit(lambda p, tokens: run.model.apply({"params": p}, tokens, method=clip.CLIP.encode_text))
    self.embed(["warm up"])  # compile now, not at the first query

  def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [Q, D] embeddings, int64 [Q] word pieces of each text before any cut; with `warn`, a
    warning says how many were cut)."""
    tokens, pieces = self.tokenizer.encode_counted(texts, "queries", warn=self._warn)
    feats = []
    for start in range(0, len(tokens), self.batch):
      part = tokens[start:start + self.batch]
      padded = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), axis=0)])
      feats.append(np.asarray(self._encode(self._params, padded))[:len(part)])
    return np.concatenate(feats), pieces


def evaluate_run(workdir: str, split: str = "test", step: int | None = None, best: bool = False,
                 dataset: str = "", manual_dir: str = "") -> dict:
  """Retrieval figures of a trained run's checkpoint on `split` of its data set, or of benchmark
  `dataset` (its original folder `manual_dir`), read with the run's tokenizer, image size and
  context length (cross-domain).

  Returns {"workdir", "step", "best", "dataset", "split", "images", "captions", "identities",
  "t2i", "i2t", "seconds"}; t2i and i2t hold R1, R5, R10, mAP and mINP in %, seconds the time
  to encode the split and rank it (compilation included).
  """
  config, _, model, params, step = load_trained(workdir, step, best)
  data_cfg = config.data
  if dataset and dataset != data_cfg.name:
    data_cfg = datasets.cross_domain(data_cfg, dataset, manual_dir, datasets.tokenizer_path(data_cfg))
  elif manual_dir:
    raise errors.ConfigError(f"manual_dir is for another data set (--dataset); the run's own, '{data_cfg.name}', is read "
                     f"from {data_cfg.data_dir} as it trained")
  _, splits = datasets.load(data_cfg, (split,))
  data = splits[split]
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  figures = evaluate_split(make_encoders(model, mesh), params, data, mesh, config.eval.batch_size)
  return {"workdir": os.path.abspath(workdir), "step": int(step), "best": best, "dataset": data_cfg.name,
          "split": split, "images": data.num_images, "captions": data.num_pairs,
          "identities": int(np.unique(data.person_ids).size), **figures, "seconds": time.perf_counter() - start}
