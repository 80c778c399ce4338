"""The trainer, top to bottom: data, model, optimizer, checkpoint, jitted step, evaluation.

Sharding is declared once (`parallel`): the batch is split over the mesh's `data` axis,
parameters and optimizer state are replicated. One jitted step serves one device, many
devices, and many processes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from dgia_jax import checkpointing, clustering, evaluate, identity_graph, losses, parallel, perturb, reporting
from dgia_jax.data import datasets
from dgia_jax.data.pipeline import EpochOrder, Split, eval_image_batches, token_batches, train_batches
from dgia_jax.models import checkpoint_io, clip

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"  # the best-on-validation parameters (EpochEvaluator)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  bank: identity_graph.MemoryBank | None  # present when the global loss is on
  # int32 [N_pad]: pseudo identity of every training pair (-1: outlier or not clustered
  # yet), present when `relations.clusters.enabled`. Part of the state, so a resumed run
  # continues with the clusters it had.
  pseudo_ids: jax.Array | None = None


def state_sharding(state: TrainState, mesh) -> TrainState:
  """Replicated parameters and optimizer state; memory banks and pseudo ids split over `data` along N."""
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return TrainState(step=repl, params=repl, opt_state=repl, bank=None if state.bank is None else data,
                    pseudo_ids=None if state.pseudo_ids is None else data)


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

def compute_losses(model: clip.CLIP, params, batch: dict[str, jax.Array], key: jax.Array, bank,
                   pair_pids: jax.Array, active: dict[str, jax.Array], config, mask_id: int,
                   mesh, pseudo_ids: jax.Array | None = None) -> tuple[jax.Array, dict, dict]:
  """Total loss, its terms, and what the step needs besides (features, relations).

  `active` holds bool scalars: `relations` (in-batch agreement relations on; before that
  the relation target is the identity) and `gsrc` (global loss on). `mask_id` is the
  tokenizer's mask token, for the masked caption partners. `pair_pids` (hidden person id
  of every training pair) is read only when `config.relations.oracle` makes true ids the
  in-batch relation source. `pseudo_ids` [N_pad] (cluster of every training pair, -1 for
  none) relate pairs of one cluster, OR-ed with the agreement relations or replacing them
  (`relations.clusters.mode`).
  """
  lc, rc, tau = config.loss, config.relations, config.loss.temperature
  apply = functools.partial(model.apply, {"params": params})
  img, txt = apply(clip.normalize_images(batch["image"]), batch["tokens"])
  terms, aux = {}, {"img": img, "txt": txt}

  def in_batch_relations(img, txt):
    if rc.oracle:
      pids = pair_pids[batch["index"]]
      return pids[:, None] == pids[None, :]
    eye = jnp.eye(img.shape[0], dtype=bool)
    related = losses.agreement_relations(img, txt, rc.image_threshold, rc.text_threshold) & (active["relations"] | eye)
    if pseudo_ids is None:
      return related
    cluster = pseudo_ids[batch["index"]]
    same_cluster = (cluster[:, None] == cluster[None, :]) & (cluster[:, None] >= 0)
    return (same_cluster | eye) if rc.clusters.mode == "replace" else (related | same_cluster)

  if lc.itc:
    terms["itc"] = losses.itc_loss(img, txt, tau)
  if lc.lrc:
    aux["lrc_related"] = related = in_batch_relations(img, txt)
    terms["lrc"] = losses.lrc_loss(img, txt, losses.relation_targets(related, rc.weight), tau)
  if lc.iasc:
    ic = config.iasc
    key_img, key_txt = jax.random.split(key)
    p_img = apply(perturb.perturb_images(key_img, batch["image"], batch["index"], pad=ic.pad,
                                         erase_prob=ic.erase_prob), method=clip.CLIP.encode_image)
    p_txt = apply(perturb.mask_tokens(key_txt, batch["tokens"], batch["index"], eot_id=model.cfg.text.eot_token_id,
                                      mask_id=mask_id, prob=ic.mask_prob), method=clip.CLIP.encode_text)
    if ic.relations == "clean":  # pair i's perturbed partner shares pair i's identity relations
      related = aux["lrc_related"] if "lrc_related" in aux else in_batch_relations(img, txt)
    else:
      related = in_batch_relations(p_img, p_txt)
    aux["iasc_related"] = related
    terms["iasc"] = losses.lrc_loss(p_img, p_txt, losses.relation_targets(related, rc.weight), tau)
  if lc.gsrc:
    gc = config.gsrc
    sims, rows, valid = identity_graph.search_neighbours(bank, img, batch["index"], gc.k, gc.threshold, mesh)
    valid = valid & active["gsrc"]
    nb_img, nb_txt = identity_graph.gather_rows(bank, rows, mesh)
    edges = identity_graph.reweight_edges(sims, valid)
    own_only = losses.relation_targets(jnp.zeros((img.shape[0],) * 2, bool), rc.weight)
    target, cols = identity_graph.global_targets(own_only, edges)
    loss = identity_graph.gsrc_loss(img, txt, nb_img, nb_txt, target, cols, tau)
    terms["gsrc"] = jnp.where(active["gsrc"], loss, 0.0)
    aux.update(gsrc_rows=rows, gsrc_valid=valid, gsrc_edges=edges)
  if not terms:
    raise ValueError("no loss is enabled in config.loss")
  return sum(terms.values()), terms, aux


def relation_counts(aux: dict, index: jax.Array, pair_pids: jax.Array) -> dict[str, jax.Array]:
  """Counts for relation precision/recall against the hidden ids (measurement only).

  In-batch: predicted off-diagonal relations, how many are the same person, and how many
  same-person pairs the batch holds. Global: selected neighbours, how many are the same
  person, anchors with at least one, and the summed edge weight.
  """
  pids = pair_pids[index]
  same = (pids[:, None] == pids[None, :]) & ~jnp.eye(pids.shape[0], dtype=bool)
  counts = {"rows": jnp.asarray(pids.shape[0])}
  for name in ("lrc", "iasc"):
    if f"{name}_related" in aux:
      pred = aux[f"{name}_related"] & ~jnp.eye(pids.shape[0], dtype=bool)
      counts.update({f"{name}_pred": pred.sum(), f"{name}_hit": (pred & same).sum(), f"{name}_same": same.sum()})
  if "gsrc_rows" in aux:
    valid = aux["gsrc_valid"]
    hit = valid & (pair_pids[aux["gsrc_rows"]] == pids[:, None])
    counts.update({"gsrc_pred": valid.sum(), "gsrc_hit": hit.sum(), "gsrc_anchors": valid.any(1).sum(),
                   "gsrc_weight": jnp.where(valid, aux["gsrc_edges"], 0.0).sum()})
  return counts


def summarize_relations(counts: dict[str, float]) -> dict[str, float]:
  """Precision/recall (percent) and global-relation figures from summed `relation_counts`."""
  out = {}
  for name in ("lrc", "iasc", "gsrc"):
    if f"{name}_pred" in counts:
      out[f"{name}_relations_per_batch_row"] = counts[f"{name}_pred"] / counts["rows"]
      out[f"{name}_precision"] = 100.0 * counts[f"{name}_hit"] / max(counts[f"{name}_pred"], 1)
    if f"{name}_same" in counts:
      out[f"{name}_recall"] = 100.0 * counts[f"{name}_hit"] / max(counts[f"{name}_same"], 1)
  if "gsrc_pred" in counts:
    out["gsrc_anchor_share"] = 100.0 * counts["gsrc_anchors"] / counts["rows"]
    out["gsrc_mean_weight"] = counts["gsrc_weight"] / max(counts["gsrc_pred"], 1)
  return out


def make_train_step(model: clip.CLIP, tx: optax.GradientTransformation, schedule: optax.Schedule, config,
                    steps_per_epoch: int, mask_id: int, state: TrainState, mesh) -> Any:
  """Jitted (state, batch, pair_pids) -> (state, metrics, counts).

  The batch is sharded over `data`; `pair_pids` [N_pad] is sharded like the banks and read
  for measurement (and as relations under `relations.oracle`) only. A step whose loss or
  gradients are not finite changes nothing but the step counter and reports `skipped = 1`.
  """
  base_key = jax.random.key(config.seed)
  starts = {"relations": config.relations.start_epoch, "gsrc": config.gsrc.start_epoch}

  def step(state: TrainState, batch: dict[str, jax.Array], pair_pids: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    active = {name: state.step >= (epoch - 1) * steps_per_epoch for name, epoch in starts.items()}

    def loss_fn(params):
      total, terms, aux = compute_losses(model, params, batch, key, state.bank, pair_pids, active, config,
                                         mask_id, mesh, state.pseudo_ids)
      return total, (terms, aux)

    (total, (terms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    def update(params, opt_state, bank):
      updates, opt_state = tx.update(grads, opt_state, params)
      if bank is not None:
        bank = identity_graph.update_bank(bank, batch["index"], aux["img"], aux["txt"], config.gsrc.alpha, mesh)
      return optax.apply_updates(params, updates), opt_state, bank

    # A non-finite loss or gradient skips the update: parameters, moments and banks stay as they
    # were. A conditional, not a select between new and old values: with the select, XLA copies
    # every parameter and moment first (761 copies per ViT-B/16 step, 1 with the conditional;
    # the step +12 % on CPU, docs/BENCHMARKS.md §1).
    params, opt_state, bank = jax.lax.cond(finite, update, lambda *unchanged: unchanged,
                                           state.params, state.opt_state, state.bank)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank,
                           pseudo_ids=state.pseudo_ids)
    metrics = {"loss": total, **{f"loss_{k}": v for k, v in terms.items()},
               "lr": schedule(state.step), "grad_norm": grad_norm}
    counts = {**relation_counts(aux, batch["index"], pair_pids), "skipped": 1 - finite.astype(jnp.int32)}
    return new_state, metrics, counts

  shardings = state_sharding(state, mesh)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, data, data), out_shardings=(shardings, repl, repl),
                 donate_argnums=0)


def init_state(model: clip.CLIP, tx: optax.GradientTransformation, seed: int, bank_rows: int, mesh,
               params=None, pseudo_rows: int = 0) -> TrainState:
  """Parameters (`params`, e.g. pretrained, or a fresh init), optimizer state, (if `bank_rows`)
  an empty memory bank and (if `pseudo_rows`) pseudo ids, all -1 until the first clustering."""
  cfg = model.cfg

  def init(params):
    if params is None:
      images = jnp.zeros((1, *cfg.vision.image_size, 3), jnp.float32)
      tokens = jnp.zeros((1, cfg.text.context_length), jnp.int32)
      params = model.init(jax.random.key(seed), images, tokens)["params"]
    bank = identity_graph.empty_bank(bank_rows, cfg.embed_dim) if bank_rows else None
    pseudo_ids = jnp.full((pseudo_rows,), -1, jnp.int32) if pseudo_rows else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), bank=bank,
                      pseudo_ids=pseudo_ids)

  shapes = jax.eval_shape(init, params)
  return jax.jit(init, out_shardings=state_sharding(shapes, mesh))(params)


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


def _encode_all(encode, params, batches, key: str, mesh, rows: int, global_batch: int) -> np.ndarray:
  """float32 [rows, D]: `encode` over process-local eval batches, gathered on every process, padding
  dropped; a progress bar on process 0."""
  feats = []
  for batch in tqdm(batches, total=-(-rows // global_batch), desc=f"encode {key}", unit="batch", leave=False,
                    disable=jax.process_index() != 0, mininterval=2.0, dynamic_ncols=True):
    g = parallel.to_global(batch, mesh)
    f = parallel.to_host(encode(params, g[key]))
    feats.append(f[parallel.to_host(g["valid"])])
  return np.concatenate(feats)


def extract_image_features(encoders, params, split: Split, mesh, global_batch: int) -> np.ndarray:
  """float32 [R, D]: one feature per image, in record order, eval transforms."""
  batches = eval_image_batches(split, global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders[0], params, batches, "image", mesh, split.num_images, global_batch)


def encode_tokens(encoders, params, tokens: np.ndarray, mesh, global_batch: int) -> np.ndarray:
  """float32 [N, D]: one feature per row of tokens int32 [N, L] (captions or free-text queries)."""
  batches = token_batches(tokens, global_batch, jax.process_index(), jax.process_count())
  return _encode_all(encoders[1], params, batches, "tokens", mesh, len(tokens), global_batch)


def extract_features(encoders, params, split: Split, mesh, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Text features float32 [P, D] (one per caption) and image features [R, D] (one per image)."""
  txt = encode_tokens(encoders, params, split.tokens, mesh, global_batch)
  return txt, extract_image_features(encoders, params, split, mesh, global_batch)


def evaluate_split(encoders, params, split: Split, mesh, global_batch: int) -> dict[str, dict[str, float]]:
  txt, img = extract_features(encoders, params, split, mesh, global_batch)
  return evaluate.evaluate_retrieval(txt, img, split.pair_person_ids, split.person_ids)


# ---------------------------------------------------------------------------------------
# Pseudo identities (relations.clusters)
# ---------------------------------------------------------------------------------------

def clusters_due(ccfg: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
  """Whether the training images are (re-)clustered before `step` (0-based): at the start of
  epoch `start_epoch` and every `every_epochs` epochs after."""
  if not ccfg.enabled or step % steps_per_epoch:
    return False
  epoch = step // steps_per_epoch + 1
  return epoch >= ccfg.start_epoch and (epoch - ccfg.start_epoch) % ccfg.every_epochs == 0


def pseudo_identities(encoders, params, split: Split, mesh, ccfg: ml_collections.ConfigDict,
                      global_batch: int) -> tuple[np.ndarray, dict[str, float]]:
  """int32 [P] pseudo id of every training pair (its image's cluster, -1: outlier) and the
  quality of the image clusters against the hidden ids (measurement only).

  Every training image is embedded in record order with eval transforms and clustered
  (`clustering.cluster_images`, labels keyed by record); captions inherit their image's label.
  Deterministic, so every process computes the same labels.
  """
  started = time.perf_counter()
  img = extract_image_features(encoders, params, split, mesh, global_batch)
  labels = clustering.cluster_images(img, np.arange(split.num_images), k1=ccfg.k1, k2=ccfg.k2, eps=ccfg.eps,
                                     min_samples=ccfg.min_samples)
  quality = {**clustering.label_quality(labels, split.person_ids), "seconds": time.perf_counter() - started}
  return clustering.pair_labels(labels, split.pair_record).astype(np.int32), quality


# ---------------------------------------------------------------------------------------
# Train and evaluate
# ---------------------------------------------------------------------------------------

class EpochEvaluator:
  """Evaluation after epochs, with model selection on validation identities only.

  The validation split picks the best epoch (`eval.select_metric`, text→image); its
  parameters are kept in `workdir/best`. The test split is evaluated for the curves
  (`eval.test_each_epoch`) and for the final figures, never to select.
  """

  def __init__(self, config, workdir: str, encoders, val: Split | None, test: Split, mesh, history: list[dict],
               writer: reporting.MetricWriter):
    self._config, self._workdir, self._encoders, self._mesh = config, workdir, encoders, mesh
    self._val, self._test, self._history, self._writer = val, test, history, writer
    self._best = checkpointing.Checkpointer(os.path.join(workdir, BEST_DIR), 1, 1, async_save=False)

  def _evaluate(self, params, split: Split, epoch: int, step: int) -> dict:
    metrics = evaluate_split(self._encoders, params, split, self._mesh, self._config.eval.batch_size)
    record = {"kind": "eval", "step": step, "epoch": epoch, "split": split.name, **metrics}
    self._history.append(record)
    self._writer.write(record)
    if jax.process_index() == 0:
      tqdm.write(f"epoch {epoch} {split.name}: t2i {format_metrics(metrics['t2i'])} | "
                 f"i2t {format_metrics(metrics['i2t'])}")
    return record

  def _records(self, split: Split) -> list[dict]:
    return [r for r in self._history if r["kind"] == "eval" and r["split"] == split.name]

  def _score(self, record: dict) -> float:
    return record["t2i"][self._config.eval.select_metric]

  def after_epoch(self, epoch: int, step: int, params, last: bool) -> None:
    if self._val is not None:
      earlier = self._records(self._val)
      record = self._evaluate(params, self._val, epoch, step)
      if not earlier or self._score(record) > max(map(self._score, earlier)):
        self._best.save(step, {"params": params}, force=True)
    if self._config.eval.test_each_epoch or last:
      self._evaluate(params, self._test, epoch, step)
    if jax.process_index() == 0:
      reporting.plot_curves(self._history, os.path.join(self._workdir, CURVES_FILE),
                            title=self._config.get("name", ""))

  def results(self, params, total_steps: int, epochs: int) -> dict:
    """`final` (last epoch, test) and `best_val` (best-on-val epoch, its val and test figures)."""
    tests = {r["step"]: r for r in self._records(self._test)}
    if total_steps not in tests:  # resumed after the last evaluation was lost
      tests[total_steps] = self._evaluate(params, self._test, epochs, total_steps)
    out = {"final": {k: tests[total_steps][k] for k in ("epoch", "split", "t2i", "i2t")},
           "evaluations": [r for r in self._history if r["kind"] == "eval"]}
    if self._val is not None and self._records(self._val):
      best = max(self._records(self._val), key=self._score)
      if best["step"] not in tests:
        _, raw = self._best.restore_raw(best["step"])
        tests[best["step"]] = self._evaluate(raw["params"], self._test, best["epoch"], best["step"])
      out["best_val"] = {"epoch": best["epoch"], "select_metric": f"t2i {self._config.eval.select_metric}",
                         "val": {k: best[k] for k in ("t2i", "i2t")},
                         "test": {k: tests[best["step"]][k] for k in ("t2i", "i2t")}}
    return out

  def close(self) -> None:
    self._best.close()


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint at step `args[0]`."""


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can save and stop at a step boundary."""

  def __init__(self):
    self.raised = False
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True


def build_model(config: ml_collections.ConfigDict, tokenizer) -> clip.CLIP:
  return clip.CLIP(clip.config_from_dict(config.model, tuple(config.data.image_size), tokenizer.vocab_size,
                                         tokenizer.eot_id, tokenizer.context_length))


def is_training_run(path: str) -> bool:
  """Whether `path` is a dgia-jax training workdir: the config the run saved and its checkpoints
  (a Hugging Face CLIP folder has a config.json too)."""
  return bool(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
      os.path.join(path, CHECKPOINT_DIR))


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {CONFIG_FILE} is missing")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def run_tokenizer_path(workdir: str) -> str:
  """The tokenizer file or folder the training run in `workdir` encoded its captions with."""
  return datasets.tokenizer_path(_run_config(workdir).data)


def with_init_tokenizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, with `data.tokenizer` set to the run's when `model.init_from` is a dgia-jax run.

  A model fine-tuned from an earlier run must read token ids as that run did (the synthetic
  set trains its tokenizer on its own captions); the saved config then names the tokenizer,
  so `load_trained` of the new run reads the right one.
  """
  if config.data.tokenizer or not is_training_run(config.model.init_from):
    return config
  config = config.copy_and_resolve_references()
  config.data.tokenizer = run_tokenizer_path(config.model.init_from)
  return config


def init_params(config: ml_collections.ConfigDict, model: clip.CLIP, tokenizer) -> dict:
  """Parameters named by `model.init_from`: a dgia-jax run (its latest checkpoint) or a CLIP checkpoint.

  Raises ValueError naming the run and the first parameter whose shape differs from `model`'s.
  """
  init_from = config.model.init_from
  if not is_training_run(init_from):
    return checkpoint_io.load_clip(init_from, model.cfg, appended_tokens=tokenizer.num_appended,
                                   cache_dir=config.model.init_cache_dir or None)
  step, params = _restore_params(init_from)
  images = jnp.zeros((1, *model.cfg.vision.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.cfg.text.context_length), jnp.int32)
  want = flax.traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"],
                                         sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  for name in sorted(set(want) | set(got)):
    have, need = (got[name].shape if name in got else "missing"), (want[name].shape if name in want else "absent")
    if have != need:
      raise ValueError(f"model.init_from={init_from} (step {step}) does not fit this model: parameter "
                       f"{name} is {have} there, the config's model has {need}")
  return params


def load_trained(workdir: str, step: int | None = None, best: bool = False):
  """(config, tokenizer, model, params, step) of a training run, for inference.

  Reads the config the run saved and the parameters of checkpoint `step` (default: latest);
  with `best`, of the best-on-validation epoch the run kept in `workdir/best`.
  """
  config = _run_config(workdir)
  tokenizer = datasets.get_tokenizer(config.data)
  step, params = _restore_params(workdir, step, best)
  return config, tokenizer, build_model(config, tokenizer), params, step


def _restore_params(workdir: str, step: int | None = None, best: bool = False) -> tuple[int, dict]:
  """(step, parameters) of checkpoint `step` (default: latest) of the run in `workdir`, from
  its best-on-validation checkpoint if `best`."""
  directory = os.path.join(workdir, BEST_DIR if best else CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} has no {os.path.basename(directory)}/ folder"
                            + (": the run evaluated no validation split" if best else " of checkpoints"))
  ckpt = checkpointing.Checkpointer(directory, 1, None)
  try:
    step, raw = ckpt.restore_raw(step)
  finally:
    ckpt.close()
  return step, jax.tree.map(jnp.asarray, raw["params"])


def format_metrics(metrics: dict[str, float]) -> str:
  """`name=value` pairs, two decimals."""
  return " ".join(f"{k}={v:.2f}" for k, v in metrics.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with `config`, evaluating every `eval.every_epochs`; resumes from `workdir`.

  Writes `metrics.jsonl`, `curves.png` and `results.json` to `workdir` and returns the results.
  """
  config = with_init_tokenizer(config)
  tcfg = config.train
  if tcfg.on_nonfinite not in ("skip", "stop"):
    raise ValueError(f"train.on_nonfinite must be 'skip' or 'stop', got {tcfg.on_nonfinite!r}")
  ccfg = config.relations.clusters
  if ccfg.enabled and ccfg.mode not in ("or", "replace"):
    raise ValueError(f"relations.clusters.mode must be 'or' or 'replace', got {ccfg.mode!r}")
  if config.iasc.relations not in ("clean", "perturbed"):
    raise ValueError(f"iasc.relations must be 'clean' or 'perturbed', got {config.iasc.relations!r}")
  mesh = parallel.make_mesh()
  parallel.check_divisible(tcfg.batch_size, mesh)
  parallel.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  dcfg = config.data
  splits_needed = (dcfg.train_split, dcfg.eval_split) + ((dcfg.val_split,) if dcfg.val_split else ())
  if not is_main:  # process 0 prepares missing data; the others wait, then read it
    parallel.barrier("data prepared")
  tokenizer, splits = datasets.load(dcfg, splits_needed)
  if is_main:
    parallel.barrier("data prepared")
  train_split = splits[dcfg.train_split]
  order = EpochOrder(train_split.num_pairs, tcfg.batch_size, config.seed)
  if order.steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={tcfg.batch_size} exceeds the {train_split.num_pairs} training pairs")
  total_steps = tcfg.epochs * order.steps_per_epoch

  model = build_model(config, tokenizer)
  tx, schedule = make_optimizer(tcfg, order.steps_per_epoch)
  padded_pairs = identity_graph.padded_size(train_split.num_pairs, mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint.every_steps,
                                    config.checkpoint.keep)
  pretrained = None
  if config.model.init_from and ckpt.latest_step() is None:  # a resumed run has its own weights
    pretrained = init_params(config, model, tokenizer)
  state = init_state(model, tx, config.seed, padded_pairs if config.loss.gsrc else 0, mesh, pretrained,
                     pseudo_rows=padded_pairs if ccfg.enabled else 0)
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

  train_step = make_train_step(model, tx, schedule, config, order.steps_per_epoch, tokenizer.mask_id, state, mesh)
  # Hidden ids of every training pair, sharded like the banks: measurement (and oracle) only.
  pids = np.full(padded_pairs, -1, np.int32)
  pids[:train_split.num_pairs] = train_split.pair_person_ids
  pair_pids = parallel.global_array(pids, parallel.data_sharding(mesh))
  encoders = make_encoders(model, mesh)
  evaluator = EpochEvaluator(config, workdir, encoders, splits.get(dcfg.val_split),
                             splits[dcfg.eval_split], mesh, history, writer)
  batches = train_batches(train_split, order, start_step=start_step, end_step=total_steps,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          num_threads=config.data.num_threads)
  started = time.time()
  pending: list[tuple[dict, dict]] = []
  epoch_counts: dict[str, float] = {}
  sigterm = _SigtermFlag()
  bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not is_main,
             desc="train", mininterval=2.0, dynamic_ncols=True)
  interval_start, waited = time.perf_counter(), 0.0
  for step in bar:
    if clusters_due(ccfg, step, order.steps_per_epoch):
      labels, quality = pseudo_identities(encoders, state.params, train_split, mesh, ccfg, config.eval.batch_size)
      padded = np.full(padded_pairs, -1, np.int32)
      padded[:train_split.num_pairs] = labels
      state = state.replace(pseudo_ids=parallel.global_array(padded, parallel.data_sharding(mesh)))
      record = {"kind": "clusters", "step": step, "epoch": step // order.steps_per_epoch + 1, **quality}
      history.append(record)
      writer.write(record)
      if is_main:
        tqdm.write(f"epoch {record['epoch']} clusters (vs hidden ids): {format_metrics(quality)}")
      interval_start = time.perf_counter()  # step timing leaves clustering out
    t = time.perf_counter()
    batch = next(batches)
    waited += time.perf_counter() - t
    state, metrics, counts = train_step(state, parallel.to_global(batch, mesh), pair_pids)
    pending.append((metrics, counts))
    done = step + 1
    epoch_end = done % order.steps_per_epoch == 0
    if done % tcfg.log_every == 0 or epoch_end:
      fetched = jax.device_get(pending)
      pending.clear()
      elapsed = time.perf_counter() - interval_start
      timing = {"seconds_per_step": elapsed / len(fetched), "data_wait_fraction": waited / elapsed}
      interval_start, waited = time.perf_counter(), 0.0
      means = {k: float(np.mean([m[k] for m, _ in fetched])) for k in fetched[0][0]}
      sums = {k: float(np.sum([c[k] for _, c in fetched])) for k in fetched[0][1]}
      epoch_counts = {k: epoch_counts.get(k, 0.0) + v for k, v in sums.items()}
      record = {"kind": "train", "step": done, "epoch": done / order.steps_per_epoch, **means,
                **summarize_relations(sums), "skipped_steps": int(sums["skipped"]), **timing}
      history.append(record)
      writer.write(record)
      bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
      if sums["skipped"] and tcfg.on_nonfinite == "stop":
        raise FloatingPointError(f"non-finite loss or gradients in {int(sums['skipped'])} of steps "
                                 f"{done - len(fetched) + 1}..{done} (updates skipped; the last checkpoint is intact). "
                                 "Set --config.train.on_nonfinite=skip to skip such steps and go on.")
    # SIGTERM (preemption): all processes agree on a step (a collective, so only every
    # `log_every` steps when there are several), save it, and stop.
    check_now = jax.process_count() == 1 or done % tcfg.log_every == 0
    if check_now and parallel.any_process(sigterm.raised):
      ckpt.save(done, state, force=True)
      ckpt.close()
      bar.close()
      if is_main:
        print(f"dgia-jax: SIGTERM: saved step {done} and stopped; rerun the same command to resume", flush=True)
      raise Preempted(done)
    ckpt.save(done, state, force=epoch_end)
    epoch = done // order.steps_per_epoch
    if epoch_end and len(epoch_counts) > 1:
      relations = summarize_relations(epoch_counts)
      record = {"kind": "relations", "step": done, "epoch": epoch, **relations}
      history.append(record)
      writer.write(record)
      if is_main:
        tqdm.write(f"epoch {epoch} relations (vs hidden ids): {format_metrics(relations)}")
    if epoch_end:
      epoch_counts = {}
    if epoch_end and (epoch % config.eval.every_epochs == 0 or done == total_steps):
      evaluator.after_epoch(epoch, done, state.params, last=done == total_steps)
      interval_start = time.perf_counter()  # step timing leaves evaluation out
  bar.close()
  ckpt.close()

  results = {
      **evaluator.results(state.params, total_steps, tcfg.epochs),
      "steps": total_steps,
      "train_seconds_this_run": time.time() - started,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "config": config.to_dict(),
  }
  if is_main:
    reporting.write_json(os.path.join(workdir, RESULTS_FILE), results)
    reporting.plot_curves(history, os.path.join(workdir, CURVES_FILE), title=config.get("name", ""))
  evaluator.close()
  return results
