"""The limit on an image's size, for every image read: a benchmark's, the synthetic set's, a user's own.

PIL only warns below twice its decompression-bomb threshold; here an image over `MAX_PIXELS` is a
named bad record (or an unreadable file), refused from its header before any pixel is decoded.
"""

import warnings

from PIL import Image

MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: a 9459 x 9459 image; person crops are far smaller
MAX_SIDE = 65_535


class TooLarge(ValueError):
  """An image over the size limit."""


def size_problem(size: tuple[int, int]) -> str | None:
  """Why an image of `size` (width, height) is refused, or None."""
  w, h = size
  if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
    return f"is {w}x{h} pixels, outside the limit ({MAX_PIXELS:,} pixels, sides 1 to {MAX_SIDE:,})"
  return None


def open_checked(source) -> Image.Image:
  """`Image.open(source)` (a path or a binary stream), its header read only; TooLarge over the limit.
  PIL's own errors (not an image, damaged) pass through."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      img = Image.open(source)
    except Image.DecompressionBombError as e:  # over twice PIL's limit
      raise TooLarge(f"is over the limit ({MAX_PIXELS:,} pixels): {e}") from e
  problem = size_problem(img.size)
  if problem:
    img.close()
    raise TooLarge(problem)
  return img
