"""The trainer, top to bottom: setup, the loop, teardown.

Setup checks the config and opens the data, builds model, optimizer, objective, state and jitted
step (`build`), resumes from the newest checkpoint, and lists the loop's periodic actions (`hooks`)
and evaluators (`evaluation.evaluators`). The loop runs one jitted step per global batch; the data
order and every random draw are functions of (seed, step), so a resumed run continues exactly.
Teardown gathers the figures into results.json. `train_and_evaluate` trains exactly the config it
is given; a pre-training stage it starts from (`model.init_config`) is trained first by
`train_initial_run`, which the main job and the ablation study call.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import ml_collections
import numpy as np

from dgia_jax.common import config_files, errors, parallel
from dgia_jax.data import datasets
from dgia_jax.data.pipeline import EpochOrder, Split, train_batches
from dgia_jax.evaluation import evaluators
from dgia_jax.run import checkpointing, files, reporting, rundir
from dgia_jax.training import build, hooks


def open_data(config: ml_collections.ConfigDict, splits: tuple[str, ...]):
  """(tokenizer, {split: Split}) of the run's data set; process 0 prepares missing data."""
  if jax.process_index() != 0:  # the others wait for process 0, then read what it prepared
    parallel.barrier("data prepared")
  tokenizer, opened = datasets.load(config.data, splits)
  if jax.process_index() == 0:
    parallel.barrier("data prepared")
  return tokenizer, opened


def hidden_pair_ids(split: Split, rows: int, mesh) -> jax.Array:
  """int32 [rows]: the person id of every training pair (-1 on padding), sharded like the banks.
  Read only for measurement and by the oracle."""
  pids = np.full(rows, -1, np.int32)
  pids[:split.num_pairs] = split.pair_person_ids
  return parallel.global_array(pids, parallel.data_sharding(mesh))


def train_initial_run(config: ml_collections.ConfigDict) -> None:
  """Stage 1: the run `model.init_from` names, trained with `model.init_config` unless it finished
  (its results.json exists); an interrupted one resumes. Later runs reuse it. `config` (stage 2's)
  is checked first, so a value with no meaning costs no stage 1."""
  build.check_config(config, parallel.make_mesh())
  if not config.data.prepare:
    datasets.check_prepared(config.data)
  init_config = config.model.get("init_config", "")
  if not init_config or os.path.exists(rundir.RunDir(config.model.init_from).results):
    return
  if jax.process_index() == 0:
    print(f"dgia-jax: stage 1: training {config.model.init_from} with {init_config} first (kept for later runs)",
          flush=True)
  train_and_evaluate(config_files.load_config(init_config), config.model.init_from)
  if jax.process_index() == 0:
    print(f"dgia-jax: stage 2: {config.get('name', '')} from {config.model.init_from}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with `config`, evaluating every `eval.every_epochs`; resumes from `workdir`.

  Writes the run directory (`rundir`): config.json, checkpoints/, best/, metrics.jsonl,
  curves.png and results.json; returns the results.
  """
  # Setup: every check before anything is written.
  mesh = parallel.make_mesh()
  build.check_config(config, mesh)
  if not config.data.prepare:
    datasets.check_prepared(config.data)
  config = build.with_init_tokenizer(config)
  run, is_main = rundir.RunDir(workdir), jax.process_index() == 0
  build.check_rerun(config, run)
  # One writer: process 0 holds the workdir's lock until the run ends (the OS drops it if the process dies).
  with files.FolderLock(workdir, "--workdir") if is_main else contextlib.nullcontext():
    return _train(config, run, mesh)


def _train(config: ml_collections.ConfigDict, run: rundir.RunDir, mesh) -> dict:
  """The run of `train_and_evaluate`, its config checked."""
  is_main = jax.process_index() == 0
  evaluation_list = evaluators.from_config(config)
  tokenizer, splits = open_data(config, (config.data.train_split, *evaluators.run_splits(config, evaluation_list)))
  train_split = splits[config.data.train_split]
  order = EpochOrder(train_split.num_pairs, config.train.batch_size, config.seed)
  if order.steps_per_epoch == 0:
    raise errors.ConfigError(f"train.batch_size={config.train.batch_size} exceeds the {train_split.num_pairs} training pairs")
  if config.relations.oracle and not train_split.has_ids:
    raise errors.ConfigError(f"relations.oracle relates pairs by their person ids, and {config.data.name} has none")
  if is_main:
    run.write_config(config)  # whole or not at all, after every check
  spe, total_steps = order.steps_per_epoch, config.train.epochs * order.steps_per_epoch
  ckpt = checkpointing.Checkpointer(run.checkpoints, config.checkpoint.every_steps, config.checkpoint.keep)
  fresh = ckpt.latest_step() is None
  built = build.training(config, tokenizer, spe, train_split.num_pairs, mesh,
                         pretrained=bool(config.model.init_from) and fresh)
  state = built.state if fresh else ckpt.restore(built.state)
  start_step = int(state.step)
  writer = reporting.MetricWriter(run, start_step, enabled=is_main)
  if built.field_start is not None:  # the run records the field checkpoint it starts from
    writer.write({"kind": "init", "step": 0, "field_checkpoint": os.path.abspath(config.model.init_from),
                  **{k: v for k, v in built.field_start.items() if k != "describe"}})
    if is_main:
      print(f"dgia-jax: starting from the field checkpoint {config.model.init_from}: {built.field_start['describe']}",
            flush=True)
  if is_main:
    print(f"dgia-jax: {jax.device_count()} devices × {jax.process_count()} processes; "
          f"{train_split.num_pairs} training pairs, {spe} steps/epoch, {built.num_params / 1e6:.2f}M parameters; "
          + (f"resuming at step {start_step}" if start_step else "starting"), flush=True)
  pair_pids = hidden_pair_ids(train_split, built.rows, mesh)
  evaluation = evaluators.Evaluations(config, run, built.encoders, evaluation_list,
                                      evaluators.open_data(config, evaluation_list, splits), mesh, writer)
  batches = train_batches(train_split, order, start_step=start_step, end_step=total_steps,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          num_threads=config.data.num_threads)
  log = hooks.StepLog(writer, spe, start_step, total_steps, stop_on_nonfinite=config.train.on_nonfinite == "stop",
                      batch_size=config.train.batch_size, collapse_share=config.relations.collapse_share,
                      stop_on_collapse=config.relations.on_collapse == "stop", with_ids=train_split.has_ids)
  recluster = hooks.Recluster(config, built.encoders, train_split, mesh, spe, built.rows, writer, log)
  after_step = [
      hooks.Hook(log.flush, config.train.log_every),
      hooks.Hook(log.flush, spe),  # and at every epoch's end
      # SIGTERM: a collective, so with several processes only every `log_every` steps.
      hooks.Hook(hooks.Preemption(ckpt, log), 1 if jax.process_count() == 1 else config.train.log_every),
      hooks.Hook(lambda done, state: ckpt.save(done, state, force=hooks.itstime(done, spe)), 1),
      hooks.Hook(log.end_epoch, spe),
  ]
  evaluate_hook = hooks.Hook(
      lambda done, state: evaluation.after_epoch(done // spe, done, state.params, done == total_steps),
      config.eval.every_epochs * spe, total_steps, timed=False)
  after_step.append(evaluate_hook)

  # The loop.
  started = time.time()
  try:
    if start_step and evaluate_hook.due(start_step):  # a kill between the checkpoint and its evaluation loses none
      evaluate_hook.run(start_step, state)
    for step in range(start_step, total_steps):
      if recluster.due(step):
        state = recluster(step, state)
        log.restart_clock()  # step timing leaves clustering out
      batch = log.next_batch(batches)
      state, step_metrics, counts = built.step(state, parallel.to_global(batch, mesh), pair_pids)
      log.add(step_metrics, counts)
      for hook in after_step:
        if hook.due(step + 1):
          hook.run(step + 1, state)
          if not hook.timed:
            log.restart_clock()
  except BaseException:  # preempted, a failed write, a stop on non-finite steps: pending writes end first
    log.close()
    for closing in (ckpt.close, evaluation.close):
      closing(quiet=True)
    writer.close()
    raise

  # Teardown.
  log.close()
  ckpt.close()
  writer.close()
  results = {
      **evaluation.results(state.params, total_steps, config.train.epochs),
      "steps": total_steps,
      "train_seconds_this_run": time.time() - started,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "config": config.to_dict(),
  }
  if is_main:
    files.write_json(run.results, results)
    evaluation.curves.draw(writer.records, end=True)
  evaluation.close()
  return results
