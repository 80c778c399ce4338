"""A trained run rebuilt from its directory: its config, tokenizer, model and one checkpoint's parameters.
Never imports the trainer.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from dgia_jax.common import errors
from dgia_jax.data import datasets
from dgia_jax.data.tokenizer import Tokenizer
from dgia_jax.models import clip
from dgia_jax.run import checkpointing, rundir


def build_model(config: ml_collections.ConfigDict, tokenizer) -> clip.CLIP:
  """The two towers `config.model` describes, for `config.data`'s input and the tokenizer's vocabulary."""
  return clip.CLIP(clip.config_from_dict(config.model, tuple(config.data.image_size), tokenizer.vocab_size,
                                         tokenizer.eot_id, tokenizer.context_length))


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
