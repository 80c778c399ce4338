"""A model's jitted encoders, and features through them: every image of a split in record order,
every caption in caption order, a user's images, free-text queries.

Features go through the eval transforms, in padded global batches sharded over the mesh's `data`
axis; every process receives all of them. Shapes: N rows, D embedding width.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

from dgia_jax.common import errors, parallel
from dgia_jax.data.pipeline import Split, eval_image_batches, row_batches
from dgia_jax.inference import rebuild
from dgia_jax.models import clip
from dgia_jax.run import reporting


class Encoders(NamedTuple):
  """A model's jitted encoders over `data`-sharded batches, and its end-of-text token id."""

  image: Callable  # (params, uint8 [B, H, W, 3]) -> float32 [B, D]
  text: Callable  # (params, int32 [B, L]) -> float32 [B, D]
  eot_id: int


def make_encoders(model: clip.CLIP, mesh) -> Encoders:
  """Jitted image and text encoders over `data`-sharded batches."""
  data = parallel.data_sharding(mesh)
  enc_img = jax.jit(lambda p, im: model.apply({"params": p}, clip.normalize_images(im), method=clip.CLIP.encode_image),
                    out_shardings=data)
  enc_txt = jax.jit(lambda p, tok: model.apply({"params": p}, tok, method=clip.CLIP.encode_text), out_shardings=data)
  return Encoders(enc_img, enc_txt, model.cfg.text.eot_token_id)


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
  return _encode_all(encoders.image, params, batches, "image", mesh, split.num_images, global_batch)


TOKEN_BUCKET = 16  # a caption runs cut to its length rounded up to a multiple of this (at most the context)


def run_lengths(context_length: int) -> list[int]:
  """The lengths rows of tokens run at: multiples of `TOKEN_BUCKET` below L, and L."""
  return [*range(TOKEN_BUCKET, context_length, TOKEN_BUCKET), context_length]


def length_groups(tokens: np.ndarray, eot_id: int) -> list[tuple[np.ndarray, int]]:
  """(row indices int64 [n], run length) of tokens int32 [N, L], one pair per length used.

  The text tower is causal and read at each row's first end-of-text token (`eot_id`), so what
  follows it changes nothing: a row runs cut to that token's position + 1 rounded up to a multiple
  of `TOKEN_BUCKET` (a row without one runs whole; a row's feature depends on its own tokens only)
  — for captions of 10-40 tokens, about half the work of running every row at L = 77.
  """
  is_eot = tokens == eot_id
  used = np.where(is_eot.any(1), np.argmax(is_eot, axis=1) + 1, tokens.shape[1])
  lengths = np.minimum(-(-used // TOKEN_BUCKET) * TOKEN_BUCKET, tokens.shape[1])
  return [(np.flatnonzero(lengths == n), n) for n in np.unique(lengths).tolist()]


def encode_tokens(encoders, params, tokens: np.ndarray, mesh, global_batch: int) -> np.ndarray:
  """float32 [N, D]: one feature per row of tokens int32 [N, L] (captions or free-text queries),
  each group of `length_groups` at its length."""
  parts = []
  for rows, length in length_groups(tokens, encoders.eot_id) or [(np.arange(0), tokens.shape[1])]:
    batches = row_batches(tokens[rows, :length], "tokens", global_batch, jax.process_index(), jax.process_count())
    parts.append((rows, _encode_all(encoders.text, params, batches, "tokens", mesh, len(rows), global_batch)))
  out = np.empty((len(tokens), *parts[0][1].shape[1:]), parts[0][1].dtype)
  for rows, part in parts:
    out[rows] = part
  return out


def encode_images(encoders, params, images: np.ndarray, mesh, global_batch: int) -> np.ndarray:
  """float32 [N, D]: one feature per decoded image uint8 [N, H, W, 3] (`pipeline.decode_image`)."""
  batches = row_batches(images, "image", global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders.image, params, batches, "image", mesh, len(images), global_batch)


def extract_features(encoders, params, split: Split, mesh, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Text features float32 [P, D] (one per caption) and image features [R, D] (one per image)."""
  txt = encode_tokens(encoders, params, split.tokens, mesh, global_batch)
  return txt, extract_image_features(encoders, params, split, mesh, global_batch)


class TextEncoder:
  """The run's text tower for free-text queries, tokenized as its captions were, compiled once for
  batches of `batch` queries at each of `run_lengths`: fewer are padded, more go in several calls,
  so no query ever compiles again; a query runs at its length as a caption does (`length_groups`).
  Single-process."""

  def __init__(self, run: rebuild.TrainedRun, batch: int = 16, warn: bool = True):
    if batch < 1:
      raise errors.ConfigError(f"the query batch must be at least 1, got {batch}")
    self.tokenizer, self.batch, self._params, self._warn = run.tokenizer, batch, run.params, warn
    self.max_pieces = run.tokenizer.context_length - 2  # more are cut
    self._encode = jax.jit(lambda p, tokens: run.model.apply({"params": p}, tokens, method=clip.CLIP.encode_text))
    for length in run_lengths(run.tokenizer.context_length):  # compile now, not at the first query
      warm = self._encode(self._params, np.zeros((batch, length), np.int32))
    self._feature = (warm.shape[1:], warm.dtype)

  def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [Q, D] embeddings, int64 [Q] word pieces of each text before any cut; with `warn`, a
    warning says how many were cut)."""
    tokens, pieces = self.tokenizer.encode_counted(texts, "queries", warn=self._warn)
    feats = np.empty((len(tokens), *self._feature[0]), self._feature[1])
    for rows, length in length_groups(tokens, self.tokenizer.eot_id):
      for start in range(0, len(rows), self.batch):
        part = tokens[rows[start:start + self.batch], :length]
        padded = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), axis=0)])
        feats[rows[start:start + self.batch]] = np.asarray(self._encode(self._params, padded))[:len(part)]
    return feats, pieces
