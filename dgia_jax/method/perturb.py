"""Information-asymmetric partners (IASC-CL): perturbed images and masked captions, on device.

Every perturbation is a pure function of (step key, pair index), so a pair's partner is
the same whatever batch position, device or process it lands on, and a resumed run
reproduces it. Nothing here touches the input pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgia_jax.models import clip


def _pair_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


ERASE_FILLS = ("zero", "mean")


def _random_erase(key: jax.Array, img: jax.Array, prob: float, area: tuple[float, float],
                  log_ratio: tuple[float, float], fill: jax.Array, attempts: int = 10) -> jax.Array:
  """torchvision-style RandomErasing of one normalised image [H, W, C], the box set to `fill` [C].

  With probability `prob`, draws up to `attempts` boxes (area fraction ~ U(area), log aspect
  ~ U(log_ratio)) and erases the first that fits.
  """
  h, w, _ = img.shape
  k_apply, k_area, k_ratio, k_y, k_x = jax.random.split(key, 5)
  frac = jax.random.uniform(k_area, (attempts,), minval=area[0], maxval=area[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=log_ratio[0], maxval=log_ratio[1]))
  eh = jnp.round(jnp.sqrt(frac * h * w * ratio)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(frac * h * w / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits)
  eh, ew = eh[first], ew[first]
  y0 = jax.random.randint(k_y, (), 0, jnp.maximum(h - eh, 0) + 1)
  x0 = jax.random.randint(k_x, (), 0, jnp.maximum(w - ew, 0) + 1)
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew)
  erase = jax.random.bernoulli(k_apply, prob) & fits.any()
  return jnp.where(erase & box[:, :, None], fill, img)


def perturb_images(key: jax.Array, images: jax.Array, index: jax.Array, *, pad: int, erase_prob: float = 0.5,
                   erase_area: tuple[float, float] = (0.02, 0.4), erase_fill: str = "zero") -> jax.Array:
  """Perturbed partners of uint8 images [B, H, W, 3] as CLIP-normalised float32 [B, H, W, 3].

  Per pair: horizontal flip (p = 0.5), zero-pad by `pad` pixels and randomly crop back,
  then random erasing after normalisation, the box filled with 0 (`erase_fill` "zero": the mean
  colour) or with the normalisation mean's values ("mean": torchvision's `value=mean`, as the
  reference code passes it, light grey in normalised units). `index` [B] (pair indices) seeds
  each pair from `key`.
  """
  b, h, w, c = images.shape
  fill = jnp.asarray(clip.CLIP_MEAN if erase_fill == "mean" else jnp.zeros(3), jnp.float32)

  def one(k, img):
    k_flip, k_crop, k_erase = jax.random.split(k, 3)
    img = img.astype(jnp.float32)
    img = jnp.where(jax.random.bernoulli(k_flip, 0.5), img[:, ::-1], img)
    padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    oy, ox = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
    img = jax.lax.dynamic_slice(padded, (oy, ox, 0), (h, w, c))
    img = clip.normalize_images(img)
    return _random_erase(k_erase, img, erase_prob, erase_area, (jnp.log(0.3), jnp.log(3.3)), fill)

  return jax.vmap(one)(_pair_keys(key, index), images)


def mask_tokens(key: jax.Array, tokens: jax.Array, index: jax.Array, *, eot_id: int, mask_id: int,
                prob: float, first: bool = False) -> jax.Array:
  """Masked partners of captions int32 [B, L]: each content token -> `mask_id` with probability `prob`.

  Content tokens lie strictly between the start token (position 0) and the first end-of-text
  token; start, end and padding are never touched. With `first` (the reference code's rule), the
  first content token is masked as well, always: the code's "if none was masked, mask the first"
  tests a list that never receives a token, so it fires for every caption. `index` [B] seeds each
  pair from `key`.
  """
  positions = jnp.arange(tokens.shape[1])
  eot_pos = jnp.argmax(tokens == eot_id, axis=1)
  content = (positions[None, :] > 0) & (positions[None, :] < eot_pos[:, None])
  draws = jax.vmap(lambda k: jax.random.bernoulli(k, prob, (tokens.shape[1],)))(_pair_keys(key, index))
  masked = content & draws
  if first:
    masked |= content & (positions[None, :] == 1)
  return jnp.where(masked, mask_id, tokens)
