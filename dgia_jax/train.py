"""The trainer, top to bottom: data, model, optimizer, checkpoint, jitted step, evaluation.

Sharding is declared once (`parallel`): the batch is split over the mesh's `data` axis,
parameters and optimizer state are replicated. One jitted step serves one device, many
devices, and many processes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from dgia_jax import checkpointing, evaluate, losses, parallel, reporting
from dgia_jax.data import datasets
from dgia_jax.data.pipeline import EpochOrder, Split, eval_image_batches, eval_text_batches, train_batches
from dgia_jax.models import clip

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.json"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------

def lr_schedule(tcfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from lr·warmup_factor over `warmup_epochs`, then cosine to `min_lr`."""
  warm = int(round(tcfg.warmup_epochs * steps_per_epoch))
  total = tcfg.epochs * steps_per_epoch
  cosine = optax.cosine_decay_schedule(tcfg.lr, max(1, total - warm), alpha=tcfg.min_lr / tcfg.lr)
  if warm == 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(tcfg.lr * tcfg.warmup_factor, tcfg.lr, warm), cosine], [warm])


def _param_group(params) -> Any:
  """'bias' for parameters whose path names a bias (2× lr, no decay, as the field does), else 'weight'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "bias" if any("bias" in str(getattr(k, "key", k)) for k in path) else "weight", params)


def make_optimizer(tcfg: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with L2 weight decay added to the gradient (torch.optim.Adam semantics)."""
  schedule = lr_schedule(tcfg, steps_per_epoch)
  adam = lambda: optax.scale_by_adam(tcfg.b1, tcfg.b2, tcfg.eps)  # noqa: E731
  groups = {
      "weight": optax.chain(optax.add_decayed_weights(tcfg.weight_decay), adam(),
                            optax.scale_by_learning_rate(schedule)),
      "bias": optax.chain(adam(), optax.scale_by_learning_rate(lambda s: tcfg.bias_lr_factor * schedule(s))),
  }
  tx = optax.multi_transform(groups, _param_group)
  if tcfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), tx)
  return tx, schedule


# ---------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------

def compute_losses(model: clip.CLIP, params, batch: dict[str, jax.Array], loss_cfg) -> tuple[jax.Array, dict]:
  """Total loss and its terms for one global batch. Reads no person ids."""
  img, txt = model.apply({"params": params}, clip.normalize_images(batch["image"]), batch["tokens"])
  terms = {}
  if loss_cfg.itc:
    terms["itc"] = losses.itc_loss(img, txt, loss_cfg.temperature)
  if not terms:
    raise ValueError("no loss is enabled in config.loss")
  return sum(terms.values()), terms


def make_train_step(model: clip.CLIP, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_cfg, mesh) -> Any:
  """Jitted (state, batch) -> (state, metrics); batch sharded over `data`, state replicated."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    def loss_fn(params):
      return compute_losses(model, params, batch, loss_cfg)

    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total, **{f"loss_{k}": v for k, v in terms.items()},
               "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def init_state(model: clip.CLIP, tx: optax.GradientTransformation, seed: int, mesh) -> TrainState:
  cfg = model.cfg

  def init():
    images = jnp.zeros((1, *cfg.vision.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, cfg.text.context_length), jnp.int32)
    params = model.init(jax.random.key(seed), images, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

def make_encoders(model: clip.CLIP, mesh):
  """Jitted image and text encoders over `data`-sharded batches."""
  data = parallel.data_sharding(mesh)
  enc_img = jax.jit(lambda p, im: model.apply({"params": p}, clip.normalize_images(im), method=clip.CLIP.encode_image),
                    out_shardings=data)
  enc_txt = jax.jit(lambda p, tok: model.apply({"params": p}, tok, method=clip.CLIP.encode_text), out_shardings=data)
  return enc_img, enc_txt


def extract_features(encoders, params, split: Split, mesh, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Text features float32 [P, D] (one per caption) and image features [R, D] (one per image)."""
  enc_img, enc_txt = encoders
  pi, pc = jax.process_index(), jax.process_count()

  def run(encode, batches, key):
    feats = []
    for batch in batches:
      g = parallel.to_global(batch, mesh)
      f = parallel.to_host(encode(params, g[key]))
      feats.append(f[parallel.to_host(g["valid"])])
    return np.concatenate(feats)

  txt = run(enc_txt, eval_text_batches(split, global_batch, pi, pc), "tokens")
  img = run(enc_img, eval_image_batches(split, global_batch, pi, pc), "image")
  return txt, img


def evaluate_split(encoders, params, split: Split, mesh, global_batch: int) -> dict[str, dict[str, float]]:
  txt, img = extract_features(encoders, params, split, mesh, global_batch)
  return evaluate.evaluate_retrieval(txt, img, split.pair_person_ids, split.person_ids)


# ---------------------------------------------------------------------------------------
# Train and evaluate
# ---------------------------------------------------------------------------------------

def build_model(config: ml_collections.ConfigDict, tokenizer) -> clip.CLIP:
  return clip.CLIP(clip.config_from_dict(config.model, tuple(config.data.image_size), tokenizer.vocab_size,
                                         tokenizer.eot_id, tokenizer.context_length))


def load_trained(workdir: str, step: int | None = None):
  """(config, tokenizer, model, params, step) of a training run, for inference.

  Reads the config the run saved and the parameters of checkpoint `step` (default: latest).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {CONFIG_FILE} is missing")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = datasets.get_tokenizer(config.data, datasets.get_builder(config.data, prepare=False))
  model = build_model(config, tokenizer)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
  try:
    step, raw = ckpt.restore_raw(step)
  finally:
    ckpt.close()
  return config, tokenizer, model, jax.tree.map(jnp.asarray, raw["params"]), step


def _fmt(metrics: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.2f}" for k, v in metrics.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with `config`, evaluating every `eval.every_epochs`; resumes from `workdir`.

  Writes `metrics.jsonl`, `curves.png` and `results.json` to `workdir` and returns the results.
  """
  tcfg = config.train
  mesh = parallel.make_mesh()
  parallel.check_divisible(tcfg.batch_size, mesh)
  parallel.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  tokenizer, splits = datasets.load(config.data, (config.data.train_split, config.data.eval_split))
  train_split, eval_split = splits[config.data.train_split], splits[config.data.eval_split]
  order = EpochOrder(train_split.num_pairs, tcfg.batch_size, config.seed)
  if order.steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={tcfg.batch_size} exceeds the {train_split.num_pairs} training pairs")
  total_steps = tcfg.epochs * order.steps_per_epoch

  model = build_model(config, tokenizer)
  tx, schedule = make_optimizer(tcfg, order.steps_per_epoch)
  state = init_state(model, tx, config.seed, mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every_steps,
                                    config.checkpoint.keep)
  state = ckpt.restore(state) or state
  start_step = int(state.step)
  writer = reporting.MetricWriter(workdir, enabled=is_main)
  history = writer.history(up_to_step=start_step)
  writer.rewrite(history)
  if is_main:
    print(f"dgia-jax: {jax.device_count()} devices × {jax.process_count()} processes; "
          f"{train_split.num_pairs} training pairs, {order.steps_per_epoch} steps/epoch, "
          f"{clip.count_params(state.params) / 1e6:.2f}M parameters; "
          + (f"resuming at step {start_step}" if start_step else "starting"), flush=True)

  train_step = make_train_step(model, tx, schedule, config.loss, mesh)
  encoders = make_encoders(model, mesh)
  batches = train_batches(train_split, order, start_step=start_step, end_step=total_steps,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          num_threads=config.data.num_threads)
  started = time.time()
  pending: list[dict] = []
  bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not is_main,
             desc="train", mininterval=2.0, dynamic_ncols=True)
  for step in bar:
    state, metrics = train_step(state, parallel.to_global(next(batches), mesh))
    pending.append(metrics)
    done = step + 1
    if done % tcfg.log_every == 0 or done == total_steps:
      means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      pending.clear()
      record = {"kind": "train", "step": done, "epoch": done / order.steps_per_epoch, **means}
      history.append(record)
      writer.write(record)
      bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
    epoch_end = done % order.steps_per_epoch == 0
    ckpt.save(done, state, force=epoch_end)
    epoch = done // order.steps_per_epoch
    if epoch_end and (epoch % config.eval.every_epochs == 0 or done == total_steps):
      metrics = evaluate_split(encoders, state.params, eval_split, mesh, config.eval.batch_size)
      record = {"kind": "eval", "step": done, "epoch": epoch, "split": eval_split.name, **metrics}
      history.append(record)
      writer.write(record)
      if is_main:
        tqdm.write(f"epoch {epoch} {eval_split.name}: t2i {_fmt(metrics['t2i'])} | i2t {_fmt(metrics['i2t'])}")
        reporting.plot_curves(history, os.path.join(workdir, CURVES_FILE), title=config.get("name", ""))
  bar.close()
  ckpt.close()

  evals = [r for r in history if r["kind"] == "eval"]
  if not evals or evals[-1]["step"] != total_steps:  # resumed after the last evaluation was lost
    metrics = evaluate_split(encoders, state.params, eval_split, mesh, config.eval.batch_size)
    evals.append({"kind": "eval", "step": total_steps, "epoch": tcfg.epochs, "split": eval_split.name, **metrics})
    history.append(evals[-1])
    writer.write(evals[-1])
  results = {
      "final": {k: evals[-1][k] for k in ("epoch", "split", "t2i", "i2t")},
      "evaluations": evals,
      "steps": total_steps,
      "train_seconds_this_run": time.time() - started,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "config": config.to_dict(),
  }
  if is_main:
    tmp = os.path.join(workdir, RESULTS_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(workdir, RESULTS_FILE))
    reporting.plot_curves(history, os.path.join(workdir, CURVES_FILE), title=config.get("name", ""))
  return results
