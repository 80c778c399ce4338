"""Losses. Pure, jittable functions of L2-normalised features; none reads person ids.

Shapes: B batch rows, B' candidate columns, D embedding width. Target matrices hold
*logits*: `-inf` marks "not related", so the target distribution is `softmax(target)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NOT_RELATED = -jnp.inf


def itc_loss(img: jax.Array, txt: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE: (CE(image→text) + CE(text→image)) / 2 over img, txt [B, D]."""
  logits = img @ txt.T / temperature
  labels = jnp.arange(img.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def sdm_kl(logits: jax.Array, target_logits: jax.Array, valid: jax.Array | None = None,
           eps: float = 1e-8, row_valid: jax.Array | None = None) -> jax.Array:
  """One direction of similarity-distribution matching, averaged over rows.

  `mean_i Σ_j p_ij (log p_ij − log(q_ij + eps))` with `p = softmax(logits)` and
  `q = softmax(target_logits)` over the columns where `valid` [B, B'] is True (all if None).
  Columns outside `valid` take no probability in either distribution; the mean runs over the
  rows where `row_valid` [B] is True (all if None). Safe when a row has a single related entry
  (q one-hot) and when p underflows.
  """
  if valid is None:
    valid = jnp.ones(logits.shape, bool)
  logp = jax.nn.log_softmax(logits, axis=-1, where=valid)
  q = jax.nn.softmax(jax.lax.stop_gradient(target_logits), axis=-1, where=valid)
  terms = jnp.where(valid, jnp.exp(logp) * (logp - jnp.log(q + eps)), 0.0)
  if row_valid is None:
    return terms.sum(-1).mean()
  return jnp.where(row_valid, terms.sum(-1), 0.0).sum() / jnp.maximum(row_valid.sum(), 1)


def relation_sdm(sim_logits: jax.Array, target_logits: jax.Array, mirror_logits: jax.Array | None = None,
                 valid: jax.Array | None = None, eps: float = 1e-8, row_valid: jax.Array | None = None) -> jax.Array:
  """Similarity-distribution matching to a relation target, both directions, summed.

  Args:
    sim_logits: [B, B'] text→image logits (cos / tau).
    target_logits: [B, B'] relation target; -inf = not related.
    mirror_logits: [B, B'] image→text logits matched to the same target rows. For a square
      batch it defaults to `sim_logits.T` against `target_logits.T`.
    valid: [B, B'] columns that exist (padding excluded); all if None.
    eps: the floor of the target's log, log(q + eps), on unrelated columns.
    row_valid: [B] rows that exist, averaged over (all if None).
  """
  forward = sdm_kl(sim_logits, target_logits, valid, eps, row_valid)
  if mirror_logits is None:
    return forward + sdm_kl(sim_logits.T, target_logits.T, None if valid is None else valid.T, eps, row_valid)
  return forward + sdm_kl(mirror_logits, target_logits, valid, eps, row_valid)


def relation_targets(related: jax.Array, lam: float) -> jax.Array:
  """Target logits `Q = I + lam·(M − I)` [B, B] from a relation matrix M [B, B] (bool).

  The own partner gets logit 1, related pairs `lam`, the rest -inf (not related).
  """
  eye = jnp.eye(related.shape[0], dtype=bool)
  return jnp.where(eye, 1.0, jnp.where(related, lam, NOT_RELATED))


def exceeds(similarity: jax.Array, threshold: float, strict: bool) -> jax.Array:
  """`similarity > threshold` if `strict` (the reference code's rule), else `>=`."""
  return similarity > threshold if strict else similarity >= threshold


def agreement_relations(img: jax.Array, txt: jax.Array, th_v: float, th_t: float, strict: bool = False) -> jax.Array:
  """M_vt [B, B] (bool): pairs whose images AND captions are both similar (≥ threshold, or > if `strict`).

  Intra-modal cosines of img, txt [B, D] under stop-gradient; the diagonal is always True.
  """
  img, txt = jax.lax.stop_gradient(img), jax.lax.stop_gradient(txt)
  related = exceeds(img @ img.T, th_v, strict) & exceeds(txt @ txt.T, th_t, strict)
  return related | jnp.eye(img.shape[0], dtype=bool)


def mutual_top_k(img: jax.Array, txt: jax.Array, k: int) -> jax.Array:
  """bool [B, B]: pairs each among the other's `k` nearest in the batch by their agreement, the lower
  of the image and the text cosine (stop-gradient; ties to the lower index); the diagonal True. A row
  relates to at most `k` others whatever the features, so the relations can never grow to the batch."""
  img, txt = jax.lax.stop_gradient(img), jax.lax.stop_gradient(txt)
  b = img.shape[0]
  eye = jnp.eye(b, dtype=bool)
  score = jnp.where(eye, -jnp.inf, jnp.minimum(img @ img.T, txt @ txt.T))
  _, nearest = jax.lax.top_k(score, min(k, b - 1))
  near = jnp.zeros((b, b), bool).at[jnp.arange(b)[:, None], nearest].set(True)
  return (near & near.T) | eye


def lrc_loss(img: jax.Array, txt: jax.Array, target_logits: jax.Array, temperature: float,
             eps: float = 1e-8) -> jax.Array:
  """L_rc_b: relation SDM with S = T Vᵀ / tau against `target_logits` [B, B] (ε = `eps`)."""
  return relation_sdm(txt @ img.T / temperature, target_logits, eps=eps)
