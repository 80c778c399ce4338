"""In-batch relation losses (LRC, IASC-CL) and their building block, against hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dgia_jax import losses, perturb
from dgia_jax.models import clip

EPS = 1e-8


def unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def kl_row(logits, target):
  p, q = softmax(logits), softmax(target)
  return float(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q + EPS)), 0.0)))


def test_no_relations_is_sdm_against_the_identity():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 4)).astype(np.float32) * 5
  target = losses.relation_targets(jnp.zeros((4, 4), bool), lam=0.1)
  np.testing.assert_array_equal(np.isfinite(target), np.eye(4, dtype=bool))
  expected = np.mean([kl_row(s[i], target[i]) for i in range(4)]) + np.mean(
      [kl_row(s.T[i], np.asarray(target).T[i]) for i in range(4)])
  assert float(losses.relation_sdm(jnp.asarray(s), target)) == pytest.approx(expected, rel=1e-5)


def test_pairs_agreeing_in_both_modalities_get_a_soft_row():
  img = unit(np.eye(4)[[0, 0, 1, 2]] + 0.01 * np.arange(16).reshape(4, 4) / 16)  # pairs 0 and 1 look alike
  txt = unit(np.eye(4)[[3, 3, 0, 1]])  # and are described alike
  target = losses.relation_targets(losses.agreement_relations(jnp.asarray(img), jnp.asarray(txt), 0.7, 0.7), 0.1)
  np.testing.assert_allclose(jax.nn.softmax(target[0]), softmax([1.0, 0.1, -np.inf, -np.inf]), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.softmax(target[1]), softmax([0.1, 1.0, -np.inf, -np.inf]), rtol=1e-6)
  np.testing.assert_array_equal(np.isfinite(target[2:]), np.eye(4, dtype=bool)[2:])


def test_agreement_in_one_modality_only_is_no_relation():
  img = unit(np.eye(3)[[0, 0, 1]])  # images 0 and 1 identical
  txt = unit(np.eye(3))  # captions all different
  related = losses.agreement_relations(jnp.asarray(img), jnp.asarray(txt), 0.7, 0.7)
  np.testing.assert_array_equal(related, np.eye(3, dtype=bool))


def test_gradients_are_finite_for_identical_features():
  feats = jnp.asarray(unit(np.ones((5, 8))))

  def loss(img, txt):
    target = losses.relation_targets(losses.agreement_relations(img, txt, 0.7, 0.7), 0.1)
    return losses.lrc_loss(img, txt, target, 0.02) + losses.itc_loss(img, txt, 0.02)

  grads = jax.grad(loss, argnums=(0, 1))(feats, feats)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_sdm_is_safe_with_one_related_entry_and_underflowing_probabilities():
  logits = jnp.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-1e4, 1e4, 0.0]])
  target = losses.relation_targets(jnp.zeros((3, 3), bool), 0.1)
  value, grad = jax.value_and_grad(losses.relation_sdm)(logits, target)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  assert float(value) >= 0


def test_invalid_columns_take_no_probability():
  s = jnp.array([[2.0, 1.0, 50.0]])
  t = jnp.array([[1.0, 0.1, -jnp.inf]])
  valid = jnp.array([[True, True, False]])
  assert float(losses.sdm_kl(s, t, valid)) == pytest.approx(kl_row([2.0, 1.0], [1.0, 0.1]), abs=1e-6)


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


def test_masking_at_least_one_token_masks_the_first_when_none_was_drawn():
  tokens = jnp.asarray([[1, 7, 8, 9, 2, 0], [1, 7, 2, 0, 0, 0]], jnp.int32)
  kwargs = dict(eot_id=2, mask_id=3, prob=0.0)
  np.testing.assert_array_equal(perturb.mask_tokens(jax.random.key(0), tokens, jnp.arange(2), **kwargs), tokens)
  out = perturb.mask_tokens(jax.random.key(0), tokens, jnp.arange(2), at_least_one=True, **kwargs)
  np.testing.assert_array_equal(out, [[1, 3, 8, 9, 2, 0], [1, 3, 2, 0, 0, 0]])
  drawn = perturb.mask_tokens(jax.random.key(0), tokens, jnp.arange(2), eot_id=2, mask_id=3, prob=1.0,
                              at_least_one=True)
  np.testing.assert_array_equal(drawn, [[1, 3, 3, 3, 2, 0], [1, 3, 2, 0, 0, 0]])  # nothing added when drawn


def test_agreement_threshold_is_inclusive_or_strict():
  img = jnp.array([[1.0, 0.0], [0.75, 0.5]])  # dot 0.75 exactly
  txt = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  assert bool(losses.agreement_relations(img, txt, 0.75, 0.75)[0, 1])
  assert not bool(losses.agreement_relations(img, txt, 0.75, 0.75, strict=True)[0, 1])
