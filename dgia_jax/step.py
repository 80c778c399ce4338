"""The train state and the jitted train step.

Sharding is declared once (`parallel`): the batch is split over the mesh's `data` axis,
parameters and optimizer state are replicated, memory banks and pseudo ids are split over
`data` along their N rows. One jitted step serves one device, many devices and many processes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from dgia_jax import identity_graph, objective as objective_lib, parallel
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
  return jax.jit(init, out_shardings=shardings(shapes, mesh).state)(params)


def make_train_step(objective: objective_lib.Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    layout: StepShardings):
  """Jitted (state, batch, pair_pids) -> (state, metrics, counts).

  The batch is sharded over `data`; `pair_pids` [N_pad] is sharded like the banks and read
  for measurement (and as relations under `relations.oracle`) only. A step whose loss or
  gradients are not finite changes nothing but the step counter and reports `skipped = 1`.
  """

  def step(state: TrainState, batch: dict[str, jax.Array], pair_pids: jax.Array):
    def loss_fn(params):
      total, terms, aux = objective(params, batch, state.step, state.bank, state.pseudo_ids, pair_pids)
      return total, (terms, aux)

    (total, (terms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    def update(params, opt_state, bank):
      updates, opt_state = tx.update(grads, opt_state, params)
      if bank is not None:
        bank = objective.update_bank(bank, batch, aux)
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
    counts = {**objective_lib.relation_counts(aux, batch["index"], pair_pids),
              "skipped": 1 - finite.astype(jnp.int32)}
    return new_state, metrics, counts

  return jax.jit(step, in_shardings=(layout.state, layout.batch, layout.batch),
                 out_shardings=(layout.state, layout.replicated, layout.replicated), donate_argnums=0)
