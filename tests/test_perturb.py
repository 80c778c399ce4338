"""Information-asymmetric partners: masked captions and perturbed images, pure functions of (key, pair)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dgia_jax.method import perturb
from dgia_jax.models import clip


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(3, 15), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_masking_never_touches_start_end_or_padding(lengths, seed):
  length = 16
  sot, eot, mask, pad = 1, 2, 3, 0
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), length), pad, np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 0] = sot
    tokens[i, 1:n - 1] = rng.integers(4, 50, size=n - 2)
    tokens[i, n - 1] = eot
  out = np.asarray(perturb.mask_tokens(jax.random.key(seed), jnp.asarray(tokens), jnp.arange(len(lengths)),
                                       eot_id=eot, mask_id=mask, prob=0.5))
  changed = out != tokens
  assert (out[changed] == mask).all()
  for i, n in enumerate(lengths):
    assert not changed[i, 0] and not changed[i, n - 1:].any()


def test_masking_rate_follows_prob():
  tokens = np.concatenate([[1], np.full(998, 7), [2]]).astype(np.int32)[None].repeat(4, 0)
  out = perturb.mask_tokens(jax.random.key(0), jnp.asarray(tokens), jnp.arange(4), eot_id=2, mask_id=3, prob=0.5)
  assert abs(float(np.mean(np.asarray(out)[:, 1:-1] == 3)) - 0.5) < 0.03


def test_perturbations_are_deterministic_per_pair_whatever_the_batch_position():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, size=(4, 24, 12, 3)), jnp.uint8)
  index = jnp.array([10, 11, 12, 13])
  key = jax.random.key(5)
  a = perturb.perturb_images(key, images, index, pad=3)
  b = perturb.perturb_images(key, images[::-1], index[::-1], pad=3)
  np.testing.assert_array_equal(a, b[::-1])
  c = perturb.perturb_images(jax.random.key(6), images, index, pad=3)
  assert a.shape == (4, 24, 12, 3) and a.dtype == jnp.float32
  assert not np.array_equal(a, c)


def test_random_erasing_fills_a_box_with_the_mean_colour():
  img = jnp.ones((40, 20, 3))
  args = (1.0, (0.02, 0.4), (np.log(0.3), np.log(3.3)))
  erased = [perturb._random_erase(jax.random.key(i), img, *args, jnp.zeros(3)) for i in range(20)]
  fractions = [float(np.mean(np.asarray(e) == 0.0)) for e in erased]
  assert all(0.0 < f <= 0.45 for f in fractions)
  never = perturb._random_erase(jax.random.key(0), img, 0.0, *args[1:], jnp.zeros(3))
  np.testing.assert_array_equal(never, img)


def test_erase_fill_mean_writes_the_normalisation_means_into_the_box():
  """The reference code's RandomErasing(value=mean) after Normalize: the box holds 0.481, 0.458, 0.408."""
  images = jnp.full((6, 24, 12, 3), 255, jnp.uint8)  # white: 1.93 .. 2.15 after normalising, never the fill
  zero, mean = (np.asarray(perturb.perturb_images(jax.random.key(3), images, jnp.arange(6), pad=0, erase_prob=1.0,
                                                  erase_fill=fill)) for fill in ("zero", "mean"))
  boxes = np.all(zero == 0.0, axis=-1)
  assert boxes.any(axis=(1, 2)).all()  # every image erased, the same boxes in both
  np.testing.assert_allclose(mean[boxes], np.broadcast_to(clip.CLIP_MEAN, mean[boxes].shape))
  np.testing.assert_array_equal(mean[~boxes], zero[~boxes])


def test_the_reference_codes_rule_masks_the_first_content_token_of_every_caption():
  tokens = jnp.asarray([[1, 7, 8, 9, 2, 0], [1, 7, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]], jnp.int32)  # the last: no content
  kwargs = dict(eot_id=2, mask_id=3)
  np.testing.assert_array_equal(perturb.mask_tokens(jax.random.key(0), tokens, jnp.arange(3), prob=0.0, **kwargs),
                                tokens)
  out = perturb.mask_tokens(jax.random.key(0), tokens, jnp.arange(3), prob=0.0, first=True, **kwargs)
  np.testing.assert_array_equal(out, [[1, 3, 8, 9, 2, 0], [1, 3, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
  # With draws, the first content token is masked whatever was drawn for it; the others as drawn.
  long = jnp.asarray([[1, *range(10, 40), 2, 0]], jnp.int32)
  with_first = perturb.mask_tokens(jax.random.key(5), long, jnp.arange(1), prob=0.5, first=True, **kwargs)
  without = perturb.mask_tokens(jax.random.key(5), long, jnp.arange(1), prob=0.5, **kwargs)
  assert int(with_first[0, 1]) == 3
  np.testing.assert_array_equal(with_first[0, 2:], without[0, 2:])
