"""The train state and the jitted train step.

Sharding is declared once (`parallel`): the batch is split over the mesh's `data` axis,
parameters and optimizer state are replicated, memory banks and pseudo ids are split over
`data` along their N rows. One jitted step serves one device, many devices and many processes.

With `micro_batch` the step caches gradients at the embeddings (exactly the full batch's
gradient in the memory of a micro-batch): every loss is a function of the batch's embeddings
plus bank rows that carry no gradient, so the batch is first embedded chunk by chunk without
keeping activations, the objective and its gradient with respect to all embeddings are computed
once, and a scan re-runs each chunk's forward pass to pull its part of that gradient back to
the parameters, one chunk's activations live at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dgia_jax.common import errors, parallel
from dgia_jax.method import identity_graph
from dgia_jax.method import objective as objective_lib
from dgia_jax.models import clip


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


class StepShardings(NamedTuple):
  """How the step's inputs and outputs are laid out: the state's, a batch's, and replicated."""

  state: TrainState
  batch: NamedSharding
  replicated: NamedSharding


def shardings(state: TrainState, mesh: Mesh) -> StepShardings:
  """Replicated parameters and optimizer state; memory banks, pseudo ids and batches split over `data`."""
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  state_sharding = TrainState(step=repl, params=repl, opt_state=repl, bank=None if state.bank is None else data,
                              pseudo_ids=None if state.pseudo_ids is None else data)
  return StepShardings(state_sharding, data, repl)


def init_state(model: clip.CLIP, tx: optax.GradientTransformation, seed: int, bank_rows: int, mesh: Mesh,
               params=None, pseudo_rows: int = 0, abstract: bool = False, bank_dtype: str = "float32") -> TrainState:
  """Parameters (`params`, e.g. pretrained, or a fresh init), optimizer state, (if `bank_rows`)
  an empty memory bank and (if `pseudo_rows`) pseudo ids, all -1 until the first clustering.
  With `abstract`, only their shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s): enough to
  compile a step and read its memory analysis without allocating a state."""
  cfg = model.cfg

  def init(params):
    if params is None:
      images = jnp.zeros((1, *cfg.vision.image_size, 3), jnp.float32)
      tokens = jnp.zeros((1, cfg.text.context_length), jnp.int32)
      params = model.init(jax.random.key(seed), images, tokens)["params"]
    bank = identity_graph.empty_bank(bank_rows, cfg.embed_dim, bank_dtype) if bank_rows else None
    pseudo_ids = jnp.full((pseudo_rows,), -1, jnp.int32) if pseudo_rows else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), bank=bank,
                      pseudo_ids=pseudo_ids)

  shapes = jax.eval_shape(init, params)
  layout = shardings(shapes, mesh).state
  if abstract:  # each sharding of the (prefix) layout onto every array under it
    return jax.tree.map(lambda sharding, sub: jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), sub), layout, shapes)
  return jax.jit(init, out_shardings=layout)(params)


def check_micro_batch(batch_size: int, micro_batch: int, devices: int) -> None:
  """Refuses a micro-batch (0: off) that does not divide the batch or that the devices do not divide."""
  if micro_batch < 0 or (micro_batch and (batch_size % micro_batch or micro_batch % devices)):
    raise errors.ConfigError(f"train.micro_batch={micro_batch} must divide train.batch_size={batch_size} and be a multiple "
                     f"of the {devices} devices (each micro-batch is split over them), or 0 (off)")


def _chunks(x: jax.Array, count: int, layout: StepShardings) -> jax.Array:
  """[B, ...] -> [count, B / count, ...]: chunk c holds the c-th slice of every device's rows, so
  each chunk is split over `data` as the batch is, and no row moves between devices."""
  devices = layout.batch.mesh.devices.size
  b = x.shape[0]
  x = x.reshape(devices, count, b // (devices * count), *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1).reshape(count, b // count, *x.shape[3:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(layout.batch.mesh, P(None, parallel.DATA_AXIS)))


def _unchunk(x: jax.Array, layout: StepShardings) -> jax.Array:
  """[count, B / count, ...] -> [B, ...] in the batch's row order (the inverse of `_chunks`)."""
  devices = layout.batch.mesh.devices.size
  count, m = x.shape[:2]
  x = x.reshape(count, devices, m // devices, *x.shape[2:])
  return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1).reshape(count * m, *x.shape[3:]), layout.batch)


def loss_and_grads(objective: objective_lib.Objective, state: TrainState, batch: dict, pair_pids: jax.Array,
                   layout: StepShardings, micro_batch: int = 0):
  """((total, (terms, aux)), grads) of the objective at `state.params` on the whole batch, computed
  `micro_batch` rows at a time when that is smaller than the batch (module docstring)."""
  count = batch["index"].shape[0] // micro_batch if micro_batch else 1
  if count == 1:
    def loss_fn(params):
      total, terms, aux = objective(params, batch, state.step, state.bank, state.pseudo_ids, pair_pids)
      return total, (terms, aux)

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, step = state.params, state.step
  parts = jax.tree.map(lambda x: _chunks(x, count, layout), batch)
  embed = lambda p, part: objective.embed(p, part, step)  # noqa: E731
  emb = jax.tree.map(lambda x: _unchunk(x, layout), jax.lax.map(lambda part: embed(params, part), parts))

  def loss_of_embeddings(emb):
    total, terms, aux = objective.loss(emb, batch, step, state.bank, state.pseudo_ids, pair_pids)
    return total, (terms, aux)

  value, emb_grad = jax.value_and_grad(loss_of_embeddings, has_aux=True)(emb)

  def pull_back(grads, part_and_cotangent):
    part, cotangent = part_and_cotangent
    _, vjp = jax.vjp(lambda p: embed(p, part), params)
    return jax.tree.map(jnp.add, grads, vjp(cotangent)[0]), None

  cotangents = jax.tree.map(lambda x: _chunks(x, count, layout), emb_grad)
  grads, _ = jax.lax.scan(pull_back, jax.tree.map(jnp.zeros_like, params), (parts, cotangents))
  return value, grads


def make_train_step(objective: objective_lib.Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    layout: StepShardings, micro_batch: int = 0):
  """Jitted (state, batch, pair_pids) -> (state, metrics, counts).

  The batch is sharded over `data`; `pair_pids` [N_pad] is sharded like the banks and read
  for measurement (and as relations under `relations.oracle`) only. A step whose loss, gradients or
  update are not finite changes nothing but the step counter and reports `skipped = 1`.
  With `micro_batch` (rows, a divisor of the batch and a multiple of the devices), the gradient
  is the full batch's, computed a micro-batch at a time (module docstring).
  """

  def step(state: TrainState, batch: dict[str, jax.Array], pair_pids: jax.Array):
    (total, (terms, aux)), grads = loss_and_grads(objective, state, batch, pair_pids, layout, micro_batch)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    def update(params, opt_state, bank):
      updates, new_opt_state = tx.update(grads, opt_state, params)

      def apply(params, opt_state, bank):
        del opt_state
        if bank is not None:
          bank = objective.update_bank(bank, batch, aux)
        return optax.apply_updates(params, updates), new_opt_state, bank, jnp.bool_(True)

      # Finite gradients can still make a non-finite update (an overflowing rate or moment): it is
      # skipped as well, so the parameters never become non-finite.
      return jax.lax.cond(jnp.isfinite(optax.global_norm(updates)), apply,
                          lambda *unchanged: (*unchanged, jnp.bool_(False)), params, opt_state, bank)

    # A non-finite loss, gradient or update skips the update: parameters, moments and banks stay as
    # they were. Conditionals, not a select between new and old values: with the select, XLA copies
    # every parameter and moment first (761 copies per ViT-B/16 step, 1 with the conditional;
    # the step +12 % on CPU, docs/BENCHMARKS.md §1).
    params, opt_state, bank, applied = jax.lax.cond(
        finite, update, lambda *unchanged: (*unchanged, jnp.bool_(False)), state.params, state.opt_state, state.bank)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank,
                           pseudo_ids=state.pseudo_ids)
    metrics = {"loss": total, **{f"loss_{k}": v for k, v in terms.items()},
               "lr": schedule(state.step), "grad_norm": grad_norm}
    counts = {**objective_lib.relation_counts(aux, batch["index"], pair_pids),
              "skipped": 1 - applied.astype(jnp.int32)}
    return new_state, metrics, counts

  return jax.jit(step, in_shardings=(layout.state, layout.batch, layout.batch),
                 out_shardings=(layout.state, layout.replicated, layout.replicated), donate_argnums=0)
