"""One build chain: from a config, the model, optimizer, objective, train state and jitted step.

The trainer and every benchmark build through `training`, so a benchmark measures the step the
trainer runs. `with_init_tokenizer` and `initial_params` resolve `model.init_from`: a CLIP
checkpoint, or an earlier dgia-jax run to fine-tune.
"""

from __future__ import annotations

import dataclasses
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dgia_jax.common import errors, parallel
from dgia_jax.inference import encoding, rebuild
from dgia_jax.method import identity_graph
from dgia_jax.method.objective import Objective
from dgia_jax.models import checkpoint_io, clip
from dgia_jax.run import rundir
from dgia_jax.training import config_domains, optim
from dgia_jax.training import step as step_lib


@dataclasses.dataclass
class Training:
  """What `training` builds. `step` is jitted: (state, batch, pair_pids) -> (state, metrics, counts);
  `encoders` are the model's jitted image and text encoders (evaluation, clustering); `rows` is the
  number of memory-bank rows (the training pairs, padded to the mesh); `field_start` what a field
  checkpoint the run starts from held besides its towers (`checkpoint_io.FieldInfo`)."""

  model: clip.CLIP
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  objective: Objective
  state: step_lib.TrainState
  step: object
  encoders: tuple
  rows: int
  field_start: dict | None = None  # a field checkpoint's FieldInfo (as a dict) when the start is one

  @property
  def num_params(self) -> int:
    return clip.count_params(self.state.params)


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Refuses, naming the key, a config with no meaning here, before anything is written: a value
  outside its domain (`config_domains`), a batch the mesh does not divide, a start that is not there."""
  config_domains.check(config)
  parallel.check_divisible(config.train.batch_size, mesh)
  parallel.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  step_lib.check_micro_batch(config.train.batch_size, config.train.micro_batch, mesh.devices.size)
  init_from, init_config = config.model.init_from, config.model.init_config
  if init_config and not os.path.isfile(init_config):
    raise errors.MissingPathError(f"model.init_config={init_config}: no such config file")
  if init_from and not init_config and not os.path.exists(init_from):
    raise errors.MissingPathError(f"model.init_from={init_from}: no such CLIP checkpoint, field checkpoint or dgia-jax training workdir")


def check_rerun(config: ml_collections.ConfigDict, run: rundir.RunDir) -> None:
  """Refuses, without touching the run, a rerun into `run` whose config changes what that run trains
  (`config_domains.conflicts`: a model shape, the data, a loss, the seed), naming every such key."""
  if not os.path.exists(run.config_file):
    return
  conflicts = config_domains.conflicts(run.read_config(), config)
  if conflicts:
    raise errors.ConfigError(f"--workdir {run.path} holds a run trained with another config; a rerun may not change "
                             f"{len(conflicts)} of its keys (train into another --workdir instead):\n  "
                             + "\n  ".join(conflicts))


def training(config: ml_collections.ConfigDict, tokenizer, steps_per_epoch: int, num_pairs: int, mesh: Mesh,
             pretrained: bool = False, abstract: bool = False) -> Training:
  """The model, optimizer, objective, initial state and step for `config`.

  `tokenizer` gives the vocabulary, end-of-text and mask ids; `num_pairs` sizes the memory banks
  (padded to the mesh) and pseudo ids. With `pretrained`, parameters come from `model.init_from`
  (`initial_params`), else from a fresh init with `config.seed`. With `abstract`, the state is
  shapes and shardings only (`step.init_state`), for compiling the step without allocating it.
  """
  model = rebuild.build_model(config, tokenizer)
  tx, schedule = optim.make_optimizer(config.train, steps_per_epoch)
  objective = Objective.from_config(config, model, tokenizer.mask_id, steps_per_epoch, mesh)
  micro_batch = config.train.micro_batch
  step_lib.check_micro_batch(config.train.batch_size, micro_batch, mesh.devices.size)
  rows = identity_graph.padded_size(num_pairs, mesh)
  params, start = initial_params(config, model, tokenizer) if pretrained else (None, None)
  state = step_lib.init_state(model, tx, config.seed, rows if objective.banks else 0, mesh, params,
                              pseudo_rows=rows if config.relations.clusters.enabled else 0, abstract=abstract,
                              bank_dtype=config.gsrc.bank_dtype)
  train_step = step_lib.make_train_step(objective, tx, schedule, step_lib.shardings(state, mesh), micro_batch)
  return Training(model, tx, schedule, objective, state, train_step, encoding.make_encoders(model, mesh), rows, start)


def with_init_tokenizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, with `data.tokenizer` set to the run's when `model.init_from` is a dgia-jax run.

  A model fine-tuned from an earlier run must read token ids as that run did (the synthetic
  set trains its tokenizer on its own captions); the saved config then names the tokenizer,
  so `rebuild.load_trained` of the new run reads the right one.
  """
  if config.data.tokenizer or not rundir.RunDir(config.model.init_from).is_run():
    return config
  config = config.copy_and_resolve_references()
  config.data.tokenizer = rebuild.run_tokenizer_path(config.model.init_from)
  return config


def initial_params(config: ml_collections.ConfigDict, model: clip.CLIP, tokenizer) -> tuple[dict, dict | None]:
  """(parameters named by `model.init_from`: a dgia-jax run (its latest checkpoint), a CLIP checkpoint
  or a field checkpoint; for a field checkpoint, what else it held: `checkpoint_io.FieldInfo` as a dict).

  Raises ValueError naming the run and the first parameter whose shape differs from `model`'s.
  """
  init_from = config.model.init_from
  if not rundir.RunDir(init_from).is_run():
    params, info = checkpoint_io.load_clip(init_from, model.cfg, appended_tokens=tokenizer.num_appended,
                                           cache_dir=config.model.init_cache_dir or None)
    return params, None if info is None else {**dataclasses.asdict(info), "describe": info.describe()}
  step, params = rebuild.restore_params(init_from)
  images = jnp.zeros((1, *model.cfg.vision.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.cfg.text.context_length), jnp.int32)
  want = flax.traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"],
                                         sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  for name in sorted(set(want) | set(got)):
    have, need = (got[name].shape if name in got else "missing"), (want[name].shape if name in want else "absent")
    if have != need:
      raise errors.ConfigError(f"model.init_from={init_from} (step {step}) does not fit this model: parameter "
                       f"{name} is {have} there, the config's model has {need}")
  return params, None
