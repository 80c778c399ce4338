"""Global granularity (GSRC-FR): memory banks, image-anchored relation search, edge reweighting.

Two banks hold one feature per training pair (image `B_v`, text `B_t`), both sharded over the
mesh's `data` axis along N: L2-normalised, or (`normalise=False`) the raw features' running
mean as the reference code keeps them, normalised whenever they are read. Per batch, each image
anchors a search of the image bank: its k candidates are the top k rows with its own row
excluded, or (`skip_top1`, the code's rule) ranks 2 to k + 1 whatever rank 1 is; unfilled rows
never count, and a candidate with cosine over the threshold becomes related to the anchor.
The global loss then matches identity both ways with target weights from the
confidence-based adjustment `reweight_edges`: over B rows with the candidates as extra
columns (`global_targets`, `gsrc_loss`; the paper's Eq. 17), or over B + M rows, the selected
bank rows being queries too (`bank_row_targets`, `gsrc_bank_rows_loss`; the code's).

The search is a per-shard top-k merged across shards, the neighbour lookup a masked local
gather summed across shards, and the EMA update a local scatter: no step ever gathers a
bank (see tests/test_identity_graph.py, which checks the compiled HLO).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dgia_jax.common.parallel import DATA_AXIS
from dgia_jax.method import losses


@flax.struct.dataclass
class MemoryBank:
  """Banks [N_pad, D] (float32, or bfloat16 to halve their memory: `gsrc.bank_dtype`) and `filled`
  bool [N_pad]; rows past N are padding, never filled. Whatever the storage, every computation on
  bank rows is float32 (bfloat16 rows are widened as they are read)."""

  image: jax.Array
  text: jax.Array
  filled: jax.Array

  @property
  def size(self) -> int:
    return self.filled.shape[0]


def padded_size(num_pairs: int, mesh: Mesh) -> int:
  n = mesh.devices.size
  return -(-num_pairs // n) * n


def empty_bank(rows: int, dim: int, dtype: str = "float32") -> MemoryBank:
  """An unfilled bank of `rows` rows of `dtype` (use `padded_size` so every shard holds as many)."""
  return MemoryBank(image=jnp.zeros((rows, dim), dtype), text=jnp.zeros((rows, dim), dtype),
                    filled=jnp.zeros((rows,), bool))


def _shard_offset(rows_per_shard: int) -> jax.Array:
  return jax.lax.axis_index(DATA_AXIS) * rows_per_shard


def _bits(bank_rows: jax.Array) -> jax.Array:
  """A float32 bank as it is; a bfloat16 one as its bits (uint16). XLA's CPU backend computes a
  bfloat16 gather, scatter or slice by widening the whole operand to float32 (a shard-sized
  temporary, measured: 0.95 GiB a device for 2 M × 512 rows on 8); integers it moves as they are."""
  return bank_rows if bank_rows.dtype == jnp.float32 else jax.lax.bitcast_convert_type(bank_rows, jnp.uint16)


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
  """The inverse of `_bits` for a bank of `dtype`."""
  return bits if dtype == jnp.float32 else jax.lax.bitcast_convert_type(bits, dtype)


def _widened(bits: jax.Array, dtype) -> jax.Array:
  """float32 rows from `_bits` of a bank of `dtype`."""
  return _from_bits(bits, dtype).astype(jnp.float32)


def update_bank(bank: MemoryBank, index: jax.Array, img: jax.Array, txt: jax.Array, alpha: float,
                mesh: Mesh, normalise: bool = True) -> MemoryBank:
  """Writes batch features img, txt [B, D] into rows `index` [B] (distinct pair indices).

  A row seen before becomes `normalise(alpha·f + (1 − alpha)·b)` (without the normalisation if
  not `normalise`); a row seen for the first time is written as is (so the first epoch only fills).
  """
  img, txt = jax.lax.stop_gradient(img), jax.lax.stop_gradient(txt)

  def local(image, text, filled, index, img, txt):
    n = filled.shape[0]
    rows = index - _shard_offset(n)
    owned = (rows >= 0) & (rows < n)
    rows = jnp.where(owned, rows, n)  # out of range: dropped by the scatter

    def ema(bank_rows, new):
      bits = _bits(bank_rows)
      old = _widened(bits[jnp.minimum(rows, n - 1)], bank_rows.dtype)
      seen = filled[jnp.minimum(rows, n - 1)][:, None]
      mixed = jnp.where(seen, alpha * new + (1.0 - alpha) * old, new)
      if normalise:
        mixed = mixed / jnp.maximum(jnp.linalg.norm(mixed, axis=-1, keepdims=True), 1e-12)
      return _from_bits(bits.at[rows].set(_bits(mixed.astype(bank_rows.dtype)), mode="drop"), bank_rows.dtype)

    return ema(image, img), ema(text, txt), filled.at[rows].set(True, mode="drop")

  data, rep = P(DATA_AXIS), P()
  image, text, filled = jax.shard_map(local, mesh=mesh, in_specs=(data, data, data, rep, rep, rep),
                                      out_specs=(data, data, data))(bank.image, bank.text, bank.filled, index, img, txt)
  return MemoryBank(image=image, text=text, filled=filled)


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows [..., D] scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


WIDEN_BLOCK_ROWS = 65_536  # rows of a bfloat16 bank shard widened to float32 at a time by the search


def search_neighbours(bank: MemoryBank, anchors: jax.Array, index: jax.Array, k: int, threshold: float,
                      mesh: Mesh, *, skip_top1: bool = False, strict: bool = False,
                      normalise_rows: bool = False,
                      block_rows: int = WIDEN_BLOCK_ROWS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k image-bank candidates of each anchor image, among filled rows.

  Args:
    anchors: [B, D] batch image features (stop-gradient).
    index: [B] the anchors' own bank rows: excluded, unless `skip_top1`, where instead the
      most similar row (whatever it is) is dropped and ranks 2 .. k + 1 are the candidates.
    strict: related when the cosine is > `threshold` (else ≥).
    normalise_rows: the bank holds raw features; cosines use its rows normalised.
    block_rows: a bank stored in bfloat16 is searched `block_rows` rows of a shard at a time, each
      block widened to float32 as it is read, so the search's float32 temporaries stay [block_rows, D]
      instead of a widened copy of the whole shard (a float32 bank is searched whole, as it is).
  Returns:
    sims float32 [B, k] (descending), rows int32 [B, k], valid bool [B, k] (a filled row over the
    threshold). Ties go to the lower row, as in a single-device top-k.
  """
  anchors = jax.lax.stop_gradient(anchors)
  top = k + 1 if skip_top1 else k

  def block_top(image, filled, anchors, index, offset, rows, first):
    """Top candidates (values [B, t], shard rows [B, t]) among rows `rows` [n] of the shard whose
    first row is bank row `offset` (`image` float32 rows [n, D]), those before shard row `first`
    left out (an overlapping block)."""
    sims = anchors @ (unit_rows(image) if normalise_rows else image).T
    keep = filled[None, :] & (rows >= first)[None, :]
    if not skip_top1:
      keep &= (offset + rows)[None, :] != index[:, None]
    vals, idx = jax.lax.top_k(jnp.where(keep, sims, -jnp.inf), min(top, rows.shape[0]))
    return vals, rows[idx]

  def local(image, filled, anchors, index):
    n, offset = filled.shape[0], _shard_offset(filled.shape[0])
    if image.dtype == jnp.float32 or n <= block_rows:
      vals, rows = block_top(image.astype(jnp.float32), filled, anchors, index, offset, jnp.arange(n), 0)
    else:  # blocks of block_rows rows; the last one ends at the shard's end, overlapping the one before
      starts, bits = jnp.arange(-(-n // block_rows)) * block_rows, _bits(image)

      def one(start):
        at = jnp.minimum(start, n - block_rows)
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, at, block_rows)  # noqa: E731
        return block_top(_widened(part(bits), image.dtype), part(filled), anchors, index, offset,
                         at + jnp.arange(block_rows), start)

      vals, rows = jax.lax.map(one, starts)  # [blocks, B, top], in row order
      vals, rows = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) for x in (vals, rows))
      vals, pick = jax.lax.top_k(vals, top)
      rows = jnp.take_along_axis(rows, pick, axis=1)
    vals = jax.lax.all_gather(vals, DATA_AXIS, axis=1, tiled=True)  # [B, top·shards], shard order
    idx = jax.lax.all_gather(offset + rows, DATA_AXIS, axis=1, tiled=True)
    vals, pick = jax.lax.top_k(vals, top)
    return vals[:, top - k:], jnp.take_along_axis(idx, pick, axis=1)[:, top - k:]

  data, rep = P(DATA_AXIS), P()
  sims, rows = jax.shard_map(local, mesh=mesh, in_specs=(data, data, rep, rep), out_specs=(rep, rep),
                             check_vma=False)(bank.image, bank.filled, anchors, index)
  return sims, rows, losses.exceeds(sims, threshold, strict)


def gather_rows(bank: MemoryBank, rows: jax.Array, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """Bank rows `rows` [B, k] -> image and text features [B, k, D] (a masked local gather + psum)."""

  def local(image, text, rows):
    n = image.shape[0]
    local_rows = rows - _shard_offset(n)
    owned = ((local_rows >= 0) & (local_rows < n))[..., None]
    safe = jnp.clip(local_rows, 0, n - 1)
    pick = lambda b: jax.lax.psum(jnp.where(owned, _widened(_bits(b)[safe], b.dtype), 0.0), DATA_AXIS)  # noqa: E731
    return pick(image), pick(text)

  data, rep = P(DATA_AXIS), P()
  return jax.shard_map(local, mesh=mesh, in_specs=(data, data, rep), out_specs=(rep, rep),
                       check_vma=False)(bank.image, bank.text, rows)


def reweight_edges(anchor_sims: jax.Array, valid: jax.Array) -> jax.Array:
  """Confidence-based dynamic adjustment: target logits [B, k] for the selected neighbours.

  `w_j = 1 − exp(s_j) / (exp(1) + Σ_{valid m} exp(s_m))` — the anchor enters at similarity 1,
  so the less similar (weakly associated) a neighbour, the larger its weight. Invalid
  entries are -inf (not related).
  """
  logits = jnp.where(valid, anchor_sims, -jnp.inf)
  shifted = jnp.concatenate([jnp.ones_like(logits[:, :1]), logits], axis=1)
  share = jax.nn.softmax(shifted, axis=1)[:, 1:]
  return jnp.where(valid, 1.0 - share, losses.NOT_RELATED)


def global_targets(local_target: jax.Array, edge_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Target logits Q' [B, B + B·k] and column validity [B, B + B·k].

  The batch block is `local_target` [B, B]; in the bank block, row i relates only to its own
  k neighbours (columns i·k … i·k + k − 1) with `edge_logits` [B, k]. A column whose
  neighbour is invalid exists for no row.
  """
  b, k = edge_logits.shape
  own = jnp.arange(b)[:, None] == jnp.repeat(jnp.arange(b), k)[None, :]
  bank_block = jnp.where(own, jnp.tile(edge_logits, (1, b)), losses.NOT_RELATED)
  col_valid = jnp.isfinite(edge_logits).reshape(-1)
  valid = jnp.concatenate([jnp.ones((b, b), bool), jnp.broadcast_to(col_valid, (b, b * k))], axis=1)
  return jnp.concatenate([local_target, bank_block], axis=1), valid


def gsrc_loss(img: jax.Array, txt: jax.Array, neighbour_img: jax.Array, neighbour_txt: jax.Array,
              target_logits: jax.Array, valid: jax.Array, temperature: float, eps: float = 1e-8) -> jax.Array:
  """L_rc_g on S' = [T Vᵀ | T B_v[J]ᵀ] / tau and its mirror [V Tᵀ | V B_t[J]ᵀ] / tau.

  img, txt [B, D]; neighbour_img, neighbour_txt [B, k, D] (bank rows, constants);
  target_logits, valid [B, B + B·k] from `global_targets`.
  """
  d = img.shape[-1]
  bank_img, bank_txt = neighbour_img.reshape(-1, d), neighbour_txt.reshape(-1, d)
  t2v = jnp.concatenate([txt @ img.T, txt @ bank_img.T], axis=1) / temperature
  v2t = jnp.concatenate([img @ txt.T, img @ bank_txt.T], axis=1) / temperature
  return losses.relation_sdm(t2v, target_logits, mirror_logits=v2t, valid=valid, eps=eps)


def bank_row_targets(edge_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Target logits [R, R] and row/column existence [R] over R = B + B·k rows: the batch, then
  each anchor's k candidates (anchor i's at B + i·k … B + i·k + k − 1).

  Each row belongs to its anchor's group; rows of one group are related (1), others not
  (-inf) — except in an anchor's own row, where its candidates take their confidence weights
  `edge_logits` [B, k] (`reweight_edges`) and the anchor's own column stays 1. An invalid
  candidate (its edge -inf) exists as neither row nor column.
  """
  b, k = edge_logits.shape
  group = jnp.concatenate([jnp.arange(b), jnp.repeat(jnp.arange(b), k)])
  edges = jnp.concatenate([jnp.ones((b,)), edge_logits.reshape(-1)])  # by column
  exists = jnp.isfinite(edges)
  anchor_row = (jnp.arange(b + b * k) < b)[:, None]
  same = group[:, None] == group[None, :]
  target = jnp.where(same, jnp.where(anchor_row, edges[None, :], 1.0), losses.NOT_RELATED)
  return target, exists


def gsrc_bank_rows_loss(img: jax.Array, txt: jax.Array, neighbour_img: jax.Array, neighbour_txt: jax.Array,
                        edge_logits: jax.Array, temperature: float, eps: float = 1e-8) -> jax.Array:
  """L_rc_g as the reference code computes it: relation SDM over the B + M rows V' = [V ; B_v[J]],
  T' = [T ; B_t[J]], S' = T' V'ᵀ / tau and its mirror V' T'ᵀ / tau, both against the targets of
  `bank_row_targets` row for row, averaged over the B + M rows that exist.

  img, txt [B, D]; neighbour_img, neighbour_txt [B, k, D] (bank rows, constants, normalised);
  edge_logits [B, k]. The selected candidates are padded to B·k rows and masked, so shapes do
  not depend on how many were selected.
  """
  d = img.shape[-1]
  images = jnp.concatenate([img, neighbour_img.reshape(-1, d)])
  texts = jnp.concatenate([txt, neighbour_txt.reshape(-1, d)])
  target, exists = bank_row_targets(edge_logits)
  cols = jnp.broadcast_to(exists[None, :], target.shape)
  return losses.relation_sdm(texts @ images.T / temperature, target, mirror_logits=images @ texts.T / temperature,
                             valid=cols, eps=eps, row_valid=exists)
