"""Losses. Pure, jittable functions of L2-normalised features; none reads person ids.

Shapes: B batch rows, D embedding width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def itc_loss(img: jax.Array, txt: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE: (CE(image→text) + CE(text→image)) / 2 over img, txt [B, D]."""
  logits = img @ txt.T / temperature
  labels = jnp.arange(img.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
