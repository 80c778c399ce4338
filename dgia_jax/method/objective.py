"""The method's objective, built once from config: L = L_itc + L_rc_b + L_rc_h + L_rc_g.

`Objective.embed` runs the towers, the only part that reads parameters: the batch's images and
captions and, with IASC-CL on, their information-asymmetric partners. `Objective.loss` is a
pure function of those embeddings, the memory banks and the step, one small function per term,
each described once in the term table `TERMS` (what it reads); the config's choices are parsed
once into `Options`. No term reads person ids; `pair_pids` are read only as the `relations.oracle`
source and by `relation_counts` (measurement).

Shapes: B batch rows, D embedding width, N_pad bank rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dgia_jax.method import identity_graph, losses, perturb
from dgia_jax.models import clip


@dataclasses.dataclass(frozen=True)
class Options:
  """The objective's config choices, parsed once when it is built: traced code reads these typed
  values, never config strings."""

  seed: int
  temperature: float
  relation_eps: float
  weight: float  # λ: the target logit of a related pair (own partner: 1)
  image_threshold: float
  text_threshold: float
  strict: bool  # related when a cosine is > the threshold (the reference code's), else >=
  top_k: int  # > 0: agreement relations kept only between mutual top-k neighbours of the batch (no collapse)
  oracle: bool  # measurement only: true person ids as the in-batch relations
  clusters_replace: bool  # cluster pseudo ids replace the agreement relations (else OR-ed in)
  partners_own_relations: bool  # the perturbed partners related by their own features (else as their pairs)
  mask_prob: float
  mask_first: bool
  pad: int
  erase_prob: float
  erase_fill: str
  gsrc_k: int
  gsrc_threshold: float
  gsrc_alpha: float
  skip_top1: bool  # candidates are ranks 2 .. k + 1 (the reference code's), else the top k but the pair's own row
  bank_rows: bool  # bank candidates are rows too, B + M (the reference code's), else B rows over extra columns
  raw_banks: bool  # the banks keep raw features (the reference code's), else normalised ones

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Options":
    r, ic, gc = config.relations, config.iasc, config.gsrc
    return cls(seed=config.seed, temperature=config.loss.temperature, relation_eps=config.loss.relation_eps,
               weight=r.weight, image_threshold=r.image_threshold, text_threshold=r.text_threshold,
               strict=r.compare == ">", top_k=r.topk if r.rule == "mutual_topk" else 0, oracle=r.oracle, clusters_replace=r.clusters.mode == "replace",
               partners_own_relations=ic.relations == "perturbed", mask_prob=ic.mask_prob,
               mask_first=ic.mask_first, pad=ic.pad, erase_prob=ic.erase_prob, erase_fill=ic.erase_fill,
               gsrc_k=gc.k, gsrc_threshold=gc.threshold, gsrc_alpha=gc.alpha, skip_top1=gc.candidates == "skip_top1",
               bank_rows=gc.rows == "batch+bank", raw_banks=gc.bank_features == "raw")


def in_batch_relations(img: jax.Array, txt: jax.Array, index: jax.Array, options: Options, *, on: jax.Array,
                       pair_pids: jax.Array | None, pseudo_ids: jax.Array | None) -> jax.Array:
  """bool [B, B]: the pairs of a batch that the in-batch targets relate.

  Sources: the true ids of the pairs (`oracle`, measurement only); otherwise the agreement of both
  modalities (`losses.agreement_relations`, cosines compared to the thresholds; with `top_k`, only
  between mutual top-k neighbours, `losses.mutual_top_k`; only the diagonal until `on`), with cluster
  pseudo ids `pseudo_ids` [N_pad] (-1: none) OR-ed in or replacing it.
  """
  if options.oracle:
    pids = pair_pids[index]
    return pids[:, None] == pids[None, :]
  eye = jnp.eye(img.shape[0], dtype=bool)
  related = losses.agreement_relations(img, txt, options.image_threshold, options.text_threshold,
                                       strict=options.strict) & (on | eye)
  if options.top_k:
    related &= losses.mutual_top_k(img, txt, options.top_k)
  if pseudo_ids is None:
    return related
  cluster = pseudo_ids[index]
  same_cluster = (cluster[:, None] == cluster[None, :]) & (cluster[:, None] >= 0)
  return (same_cluster | eye) if options.clusters_replace else (related | same_cluster)


class _Batch:
  """What the terms read of one batch: embeddings, switches, banks; its clean relations computed once."""

  def __init__(self, objective: "Objective", emb: dict, batch: dict, step: jax.Array, bank, pseudo_ids, pair_pids):
    self.objective, self.emb, self.index = objective, emb, batch["index"]
    self.img, self.txt = emb["img"], emb["txt"]
    self.active = {name: step >= start for name, start in objective.starts.items()}
    self.bank, self.pseudo_ids, self.pair_pids = bank, pseudo_ids, pair_pids

  def relations_of(self, img: jax.Array, txt: jax.Array) -> jax.Array:
    return in_batch_relations(img, txt, self.index, self.objective.options, on=self.active["relations"],
                              pair_pids=self.pair_pids, pseudo_ids=self.pseudo_ids)

  @functools.cached_property
  def relations(self) -> jax.Array:
    """bool [B, B]: the clean pairs' in-batch relations."""
    return self.relations_of(self.img, self.txt)


def _itc(o: Options, b: _Batch):
  """L_itc: symmetric InfoNCE over the batch."""
  return losses.itc_loss(b.img, b.txt, o.temperature), {}


def _lrc(o: Options, b: _Batch):
  """L_rc_b: relation SDM of the batch against its in-batch relations."""
  target = losses.relation_targets(b.relations, o.weight)
  return losses.lrc_loss(b.img, b.txt, target, o.temperature, o.relation_eps), {"lrc_related": b.relations}


def _iasc(o: Options, b: _Batch):
  """L_rc_h: the same on the perturbed partners, related as their clean pairs are or by their own
  features (`partners_own_relations`)."""
  p_img, p_txt = b.emb["p_img"], b.emb["p_txt"]
  related = b.relations_of(p_img, p_txt) if o.partners_own_relations else b.relations
  target = losses.relation_targets(related, o.weight)
  return losses.lrc_loss(p_img, p_txt, target, o.temperature, o.relation_eps), {"iasc_related": related}


def _gsrc(o: Options, b: _Batch):
  """L_rc_g: relation SDM over the batch and its image-anchored bank candidates (as extra columns of
  the B rows, or as B + M rows: `bank_rows`); 0 before `gsrc.start_epoch` (the banks only fill)."""
  on, mesh = b.active["gsrc"], b.objective.mesh
  sims, rows, valid = identity_graph.search_neighbours(
      b.bank, b.img, b.index, o.gsrc_k, o.gsrc_threshold, mesh, skip_top1=o.skip_top1, strict=o.strict,
      normalise_rows=o.raw_banks)
  valid = valid & on
  nb_img, nb_txt = identity_graph.gather_rows(b.bank, rows, mesh)
  if o.raw_banks:
    nb_img, nb_txt = identity_graph.unit_rows(nb_img), identity_graph.unit_rows(nb_txt)
  edges = identity_graph.reweight_edges(sims, valid)
  if o.bank_rows:
    loss = identity_graph.gsrc_bank_rows_loss(b.img, b.txt, nb_img, nb_txt, edges, o.temperature, o.relation_eps)
  else:
    own_only = losses.relation_targets(jnp.zeros((b.img.shape[0],) * 2, bool), o.weight)
    target, cols = identity_graph.global_targets(own_only, edges)
    loss = identity_graph.gsrc_loss(b.img, b.txt, nb_img, nb_txt, target, cols, o.temperature, o.relation_eps)
  return jnp.where(on, loss, 0.0), {"gsrc_rows": rows, "gsrc_valid": valid, "gsrc_edges": edges}


@dataclasses.dataclass(frozen=True)
class Term:
  """One term of the objective, switched by `config.loss.<name>`.

  Attributes:
    name: its switch, and the prefix of its metrics and relation counts.
    loss: (options, batch) -> (loss [], aux): the term on one batch's embeddings.
    partners: it reads the information-asymmetric partners (`embed` makes them).
    banks: it reads the memory banks (the train state holds them); its candidates are counted as
      global relations.
    relations: its in-batch relations are counted (aux `<name>_related`).
  """

  name: str
  loss: Callable
  partners: bool = False
  banks: bool = False
  relations: bool = False


# L = L_itc + L_rc_b + L_rc_h + L_rc_g, summed in this order.
TERMS = (Term("itc", _itc), Term("lrc", _lrc, relations=True), Term("iasc", _iasc, partners=True, relations=True),
         Term("gsrc", _gsrc, banks=True))
TERM_NAMES = tuple(t.name for t in TERMS)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms switched on in `config.loss`, over `model`'s embeddings.

  Attributes:
    model: the two towers.
    terms: the terms switched on, in `TERMS` order.
    options: the config's choices, parsed (`Options`).
    mask_id: the tokenizer's mask token, for the masked caption partners.
    starts: first step of the in-batch relations (`relations`) and of the global loss (`gsrc`).
    mesh: the mesh the banks are sharded over.
  """

  model: clip.CLIP
  terms: tuple[Term, ...]
  options: Options
  mask_id: int
  starts: dict[str, int]
  mesh: Mesh

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: clip.CLIP, mask_id: int, steps_per_epoch: int,
                  mesh: Mesh) -> "Objective":
    starts = {"relations": (config.relations.start_epoch - 1) * steps_per_epoch,
              "gsrc": (config.gsrc.start_epoch - 1) * steps_per_epoch}
    terms = tuple(t for t in TERMS if config.loss[t.name])
    return cls(model, terms, Options.from_config(config), mask_id, starts, mesh)

  @property
  def partners(self) -> bool:
    return any(t.partners for t in self.terms)

  @property
  def banks(self) -> bool:
    """Whether a term reads the memory banks (the state must hold them)."""
    return any(t.banks for t in self.terms)

  def embed(self, params, batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    """Embeddings float32 [B, D] of the batch: `img`, `txt` and, when a term reads them, the partners
    `p_img` (flipped, padded and cropped, erased) and `p_txt` (masked), drawn from (seed, step,
    pair index), so a pair's partner is the same wherever it lands."""
    o = self.options
    apply = functools.partial(self.model.apply, {"params": params})
    images = clip.normalize_images(batch["image"])
    if o.raw_banks:  # the banks keep raw features (`update_bank`)
      raw_img, raw_txt = apply(images, batch["tokens"], method=clip.CLIP.raw_features)
      emb = {"img": clip.l2_normalize(raw_img), "txt": clip.l2_normalize(raw_txt), "raw_img": raw_img,
             "raw_txt": raw_txt}
    else:
      img, txt = apply(images, batch["tokens"])
      emb = {"img": img, "txt": txt}
    if self.partners:
      key_img, key_txt = jax.random.split(jax.random.fold_in(jax.random.key(o.seed), step))
      images = perturb.perturb_images(key_img, batch["image"], batch["index"], pad=o.pad, erase_prob=o.erase_prob,
                                      erase_fill=o.erase_fill)
      tokens = perturb.mask_tokens(key_txt, batch["tokens"], batch["index"], eot_id=self.model.cfg.text.eot_token_id,
                                   mask_id=self.mask_id, prob=o.mask_prob, first=o.mask_first)
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
    for term in self.terms:
      terms[term.name], extra = term.loss(self.options, b)
      aux.update(extra)
    return sum(terms.values()), terms, aux

  def __call__(self, params, batch: dict[str, jax.Array], step: jax.Array, bank=None,
               pseudo_ids: jax.Array | None = None, pair_pids: jax.Array | None = None):
    """`loss` of `embed`: (total, terms, aux)."""
    return self.loss(self.embed(params, batch, step), batch, step, bank, pseudo_ids, pair_pids)

  def update_bank(self, bank: identity_graph.MemoryBank, batch: dict[str, jax.Array], aux: dict):
    """The banks with the batch's features written into its pairs' rows (EMA, `gsrc.alpha`): the
    normalised features, renormalised after mixing; or (`raw_banks`, the code's) the raw features,
    mixed raw."""
    o = self.options
    if o.raw_banks:
      return identity_graph.update_bank(bank, batch["index"], aux["raw_img"], aux["raw_txt"], o.gsrc_alpha, self.mesh,
                                        normalise=False)
    return identity_graph.update_bank(bank, batch["index"], aux["img"], aux["txt"], o.gsrc_alpha, self.mesh)


def relation_counts(aux: dict, index: jax.Array, pair_pids: jax.Array) -> dict[str, jax.Array]:
  """Counts for relation precision/recall against the hidden ids (measurement only).

  In-batch (each term with `relations`): predicted off-diagonal relations, how many are the same
  person, and how many same-person pairs the batch holds. Global (each term with `banks`): selected
  neighbours, how many are the same person, anchors with at least one, and the summed edge weight.
  """
  pids = pair_pids[index]
  off_diagonal = ~jnp.eye(pids.shape[0], dtype=bool)
  same = (pids[:, None] == pids[None, :]) & off_diagonal & (pids[:, None] >= 0)  # -1: no id, never the same
  counts = {"rows": jnp.asarray(pids.shape[0])}
  for t in TERMS:
    if t.relations and f"{t.name}_related" in aux:
      pred = aux[f"{t.name}_related"] & off_diagonal
      counts.update({f"{t.name}_pred": pred.sum(), f"{t.name}_hit": (pred & same).sum(), f"{t.name}_same": same.sum()})
    if t.banks and f"{t.name}_rows" in aux:
      valid = aux[f"{t.name}_valid"]
      hit = valid & (pair_pids[aux[f"{t.name}_rows"]] == pids[:, None]) & (pids[:, None] >= 0)
      counts.update({f"{t.name}_pred": valid.sum(), f"{t.name}_hit": hit.sum(), f"{t.name}_anchors": valid.any(1).sum(),
                     f"{t.name}_weight": jnp.where(valid, aux[f"{t.name}_edges"], 0.0).sum()})
  return counts


def summarize_relations(counts: dict[str, float], with_ids: bool = True) -> dict[str, float]:
  """Relations per batch row, precision/recall against the hidden ids (percent; only `with_ids`: a
  data set without ids cannot measure them) and global-relation figures from summed `relation_counts`."""
  out = {}
  for t in TERMS:
    name = t.name
    if f"{name}_pred" in counts:
      out[f"{name}_relations_per_batch_row"] = counts[f"{name}_pred"] / counts["rows"]
      if with_ids:
        out[f"{name}_precision"] = 100.0 * counts[f"{name}_hit"] / max(counts[f"{name}_pred"], 1)
    if f"{name}_same" in counts and with_ids:
      out[f"{name}_recall"] = 100.0 * counts[f"{name}_hit"] / max(counts[f"{name}_same"], 1)
  for t in TERMS:
    if t.banks and f"{t.name}_pred" in counts:
      out[f"{t.name}_anchor_share"] = 100.0 * counts[f"{t.name}_anchors"] / counts["rows"]
      out[f"{t.name}_mean_weight"] = counts[f"{t.name}_weight"] / max(counts[f"{t.name}_pred"], 1)
  return out
