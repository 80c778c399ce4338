"""A trained model rebuilt: a dgia-jax run from its directory (its config, tokenizer, model and one
checkpoint's parameters), or a field checkpoint with the config that describes it. Never imports the
trainer.
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
from dgia_jax.models import checkpoint_io, clip
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


class FieldCheckpoint(NamedTuple):
  """A field checkpoint (the `best.pth` of IRRA's and DGCMIA's code) and the config that describes
  its model, input and text pipeline (e.g. configs/field_checkpoint.py): a model without a dgia-jax run."""

  path: str
  config: ml_collections.ConfigDict


def load_field_checkpoint(checkpoint: FieldCheckpoint) -> TrainedRun:
  """The model of a field checkpoint, its shape checked against the config's (every disagreement named
  with its flag), its step the checkpoint's epoch (0 if it has none)."""
  config = checkpoint.config
  tokenizer = datasets.get_tokenizer(config.data)
  model = build_model(config, tokenizer)
  params, info = checkpoint_io.load_clip(checkpoint.path, model.cfg, appended_tokens=tokenizer.num_appended,
                                         cache_dir=config.model.get("init_cache_dir") or None)
  if info is None:
    raise errors.ConfigError(f"--checkpoint {checkpoint.path} is a CLIP checkpoint, not a trained field checkpoint; "
                             "start a run from it with --config.model.init_from")
  return TrainedRun(config, tokenizer, model, jax.tree.map(jnp.asarray, params), info.epoch or 0)


def load_model(model, step: int | None = None, best: bool = False) -> TrainedRun:
  """A trained model: `model` a dgia-jax run's workdir (its checkpoint `step`, or its best) or a
  `FieldCheckpoint`."""
  if isinstance(model, FieldCheckpoint):
    return load_field_checkpoint(model)
  return load_trained(model, step, best)


def describe_model(model) -> dict:
  """What an export's manifest says of the model that made it: {"workdir"} or {"checkpoint"} (absolute)."""
  if isinstance(model, FieldCheckpoint):
    return {"workdir": "", "checkpoint": os.path.abspath(model.path)}
  return {"workdir": os.path.abspath(model)}


def model_of_manifest(manifest: dict, workdir: str | None = None, checkpoint: str | None = None):
  """The model an export's manifest names (`describe_model`), at the path given if it has moved."""
  if manifest.get("checkpoint") or checkpoint:
    return FieldCheckpoint(checkpoint or manifest["checkpoint"], ml_collections.ConfigDict(manifest["config"]))
  return workdir or manifest["workdir"]
