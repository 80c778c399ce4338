"""The method's objective, built once from config: L = L_itc + L_rc_b + L_rc_h + L_rc_g.

`Objective.embed` runs the towers, the only part that reads parameters: the batch's images and
captions and, with IASC-CL on, their information-asymmetric partners. `Objective.loss` is a
pure function of those embeddings, the memory banks and the step, one small function per term
(`TERMS`). No term reads person ids; `pair_pids` are read only as the `relations.oracle`
source and by `relation_counts` (measurement).

Shapes: B batch rows, D embedding width, N_pad bank rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dgia_jax import identity_graph, losses, perturb
from dgia_jax.models import clip

TERMS = ("itc", "lrc", "iasc", "gsrc")  # config.loss switches, summed in this order


def in_batch_relations(img: jax.Array, txt: jax.Array, index: jax.Array, relations: ml_collections.ConfigDict, *,
                       on: jax.Array, pair_pids: jax.Array | None, pseudo_ids: jax.Array | None) -> jax.Array:
  """bool [B, B]: the pairs of a batch that the in-batch targets relate.

  Sources, from `relations`: the true ids of the pairs (`oracle`, measurement only); otherwise
  the agreement of both modalities (`losses.agreement_relations`, cosines `compare`d to the
  thresholds; only the diagonal until `on`), with cluster pseudo ids `pseudo_ids` [N_pad]
  (-1: none) OR-ed in or replacing it (`clusters.mode`).
  """
  if relations.oracle:
    pids = pair_pids[index]
    return pids[:, None] == pids[None, :]
  eye = jnp.eye(img.shape[0], dtype=bool)
  related = losses.agreement_relations(img, txt, relations.image_threshold, relations.text_threshold,
                                       strict=relations.compare == ">") & (on | eye)
  if pseudo_ids is None:
    return related
  cluster = pseudo_ids[index]
  same_cluster = (cluster[:, None] == cluster[None, :]) & (cluster[:, None] >= 0)
  return (same_cluster | eye) if relations.clusters.mode == "replace" else (related | same_cluster)


class _Batch:
  """What the terms read of one batch: embeddings, switches, banks; its clean relations computed once."""

  def __init__(self, objective: "Objective", emb: dict, batch: dict, step: jax.Array, bank, pseudo_ids, pair_pids):
    self.objective, self.emb, self.index = objective, emb, batch["index"]
    self.img, self.txt = emb["img"], emb["txt"]
    self.active = {name: step >= start for name, start in objective.starts.items()}
    self.bank, self.pseudo_ids, self.pair_pids = bank, pseudo_ids, pair_pids

  def relations_of(self, img: jax.Array, txt: jax.Array) -> jax.Array:
    return in_batch_relations(img, txt, self.index, self.objective.config.relations, on=self.active["relations"],
                              pair_pids=self.pair_pids, pseudo_ids=self.pseudo_ids)

  @functools.cached_property
  def relations(self) -> jax.Array:
    """bool [B, B]: the clean pairs' in-batch relations."""
    return self.relations_of(self.img, self.txt)


def _itc(o: "Objective", b: _Batch):
  """L_itc: symmetric InfoNCE over the batch."""
  return losses.itc_loss(b.img, b.txt, o.temperature), {}


def _lrc(o: "Objective", b: _Batch):
  """L_rc_b: relation SDM of the batch against its in-batch relations."""
  target = losses.relation_targets(b.relations, o.config.relations.weight)
  return losses.lrc_loss(b.img, b.txt, target, o.temperature, o.relation_eps), {"lrc_related": b.relations}


def _iasc(o: "Objective", b: _Batch):
  """L_rc_h: the same on the perturbed partners, related as their clean pairs are (`iasc.relations`
  "clean") or by their own features ("perturbed")."""
  p_img, p_txt = b.emb["p_img"], b.emb["p_txt"]
  related = b.relations if o.config.iasc.relations == "clean" else b.relations_of(p_img, p_txt)
  target = losses.relation_targets(related, o.config.relations.weight)
  return losses.lrc_loss(p_img, p_txt, target, o.temperature, o.relation_eps), {"iasc_related": related}


def _gsrc(o: "Objective", b: _Batch):
  """L_rc_g: relation SDM over the batch and its image-anchored bank candidates (`gsrc.rows`: as
  extra columns of the B rows, or as B + M rows); 0 before `gsrc.start_epoch` (the banks only fill)."""
  gc, on, raw = o.config.gsrc, b.active["gsrc"], o.config.gsrc.bank_features == "raw"
  sims, rows, valid = identity_graph.search_neighbours(
      b.bank, b.img, b.index, gc.k, gc.threshold, o.mesh, skip_top1=gc.candidates == "skip_top1",
      strict=o.config.relations.compare == ">", normalise_rows=raw)
  valid = valid & on
  nb_img, nb_txt = identity_graph.gather_rows(b.bank, rows, o.mesh)
  if raw:
    nb_img, nb_txt = identity_graph.unit_rows(nb_img), identity_graph.unit_rows(nb_txt)
  edges = identity_graph.reweight_edges(sims, valid)
  if gc.rows == "batch+bank":
    loss = identity_graph.gsrc_bank_rows_loss(b.img, b.txt, nb_img, nb_txt, edges, o.temperature, o.relation_eps)
  else:
    own_only = losses.relation_targets(jnp.zeros((b.img.shape[0],) * 2, bool), o.config.relations.weight)
    target, cols = identity_graph.global_targets(own_only, edges)
    loss = identity_graph.gsrc_loss(b.img, b.txt, nb_img, nb_txt, target, cols, o.temperature, o.relation_eps)
  return jnp.where(on, loss, 0.0), {"gsrc_rows": rows, "gsrc_valid": valid, "gsrc_edges": edges}


_TERM_FNS = {"itc": _itc, "lrc": _lrc, "iasc": _iasc, "gsrc": _gsrc}


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms switched on in `config.loss`, over `model`'s embeddings.

  Attributes:
    model: the two towers.
    config: the experiment config (its loss, relations, iasc, gsrc and seed are read).
    mask_id: the tokenizer's mask token, for the masked caption partners.
    starts: first step of the in-batch relations (`relations`) and of the global loss (`gsrc`).
    mesh: the mesh the banks are sharded over.
  """

  model: clip.CLIP
  config: ml_collections.ConfigDict
  mask_id: int
  starts: dict[str, int]
  mesh: Mesh

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: clip.CLIP, mask_id: int, steps_per_epoch: int,
                  mesh: Mesh) -> "Objective":
    starts = {"relations": (config.relations.start_epoch - 1) * steps_per_epoch,
              "gsrc": (config.gsrc.start_epoch - 1) * steps_per_epoch}
    return cls(model, config, mask_id, starts, mesh)

  @property
  def terms(self) -> tuple[str, ...]:
    return tuple(name for name in TERMS if self.config.loss[name])

  @property
  def temperature(self) -> float:
    return self.config.loss.temperature

  @property
  def relation_eps(self) -> float:
    return self.config.loss.relation_eps

  def embed(self, params, batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    """Embeddings float32 [B, D] of the batch: `img`, `txt` and, with IASC-CL on, the partners
    `p_img` (flipped, padded and cropped, erased) and `p_txt` (masked), drawn from (seed, step,
    pair index), so a pair's partner is the same wherever it lands."""
    apply = functools.partial(self.model.apply, {"params": params})
    images = clip.normalize_images(batch["image"])
    if self.config.gsrc.bank_features == "raw":  # the banks keep raw features (`update_bank`)
      raw_img, raw_txt = apply(images, batch["tokens"], method=clip.CLIP.raw_features)
      emb = {"img": clip.l2_normalize(raw_img), "txt": clip.l2_normalize(raw_txt), "raw_img": raw_img,
             "raw_txt": raw_txt}
    else:
      img, txt = apply(images, batch["tokens"])
      emb = {"img": img, "txt": txt}
    if "iasc" in self.terms:
      ic = self.config.iasc
      key_img, key_txt = jax.random.split(jax.random.fold_in(jax.random.key(self.config.seed), step))
      images = perturb.perturb_images(key_img, batch["image"], batch["index"], pad=ic.pad, erase_prob=ic.erase_prob,
                                      erase_fill=ic.erase_fill)
      tokens = perturb.mask_tokens(key_txt, batch["tokens"], batch["index"], eot_id=self.model.cfg.text.eot_token_id,
                                   mask_id=self.mask_id, prob=ic.mask_prob, at_least_one=ic.mask_at_least_one)
      emb["p_img"] = apply(images, method=clip.CLIP.encode_image)
      emb["p_txt"] = apply(tokens, method=clip.CLIP.encode_text)
    return emb

  def loss(self, emb: dict[str, jax.Array], batch: dict[str, jax.Array], step: jax.Array, bank=None,
           pseudo_ids: jax.Array | None = None, pair_pids: jax.Array | None = None) -> tuple[jax.Array, dict, dict]:
    """(total, {term: loss}, aux) of embeddings `emb` (`embed`). `bank` is read by the global loss,
    `pseudo_ids` [N_pad] by cluster relations, `pair_pids` [N_pad] by the oracle. `aux` holds `img`,
    `txt` and each term's relations (`relation_counts` reads them)."""
    b = _Batch(self, emb, batch, step, bank, pseudo_ids, pair_pids)
    terms, aux = {}, {k: emb[k] for k in ("img", "txt", "raw_img", "raw_txt") if k in emb}
    for name in self.terms:
      terms[name], extra = _TERM_FNS[name](self, b)
      aux.update(extra)
    return sum(terms.values()), terms, aux

  def __call__(self, params, batch: dict[str, jax.Array], step: jax.Array, bank=None,
               pseudo_ids: jax.Array | None = None, pair_pids: jax.Array | None = None):
    """`loss` of `embed`: (total, terms, aux)."""
    return self.loss(self.embed(params, batch, step), batch, step, bank, pseudo_ids, pair_pids)

  def update_bank(self, bank: identity_graph.MemoryBank, batch: dict[str, jax.Array], aux: dict):
    """The banks with the batch's features written into its pairs' rows (EMA, `gsrc.alpha`): the
    normalised features, renormalised after mixing; or (`gsrc.bank_features` "raw", the code's)
    the raw features, mixed raw."""
    if self.config.gsrc.bank_features == "raw":
      return identity_graph.update_bank(bank, batch["index"], aux["raw_img"], aux["raw_txt"], self.config.gsrc.alpha,
                                        self.mesh, normalise=False)
    return identity_graph.update_bank(bank, batch["index"], aux["img"], aux["txt"], self.config.gsrc.alpha, self.mesh)


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
