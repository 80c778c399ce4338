"""In-batch relation losses (LRC, IASC-CL) and their building block, against hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgia_jax.method import losses

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


def test_agreement_threshold_is_inclusive_or_strict():
  img = jnp.array([[1.0, 0.0], [0.75, 0.5]])  # dot 0.75 exactly
  txt = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  assert bool(losses.agreement_relations(img, txt, 0.75, 0.75)[0, 1])
  assert not bool(losses.agreement_relations(img, txt, 0.75, 0.75, strict=True)[0, 1])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 6), st.booleans())
def test_mutual_top_k_relates_a_row_to_at_most_k_others_even_when_the_features_collapse(seed, b, k, collapsed):
  rng = np.random.default_rng(seed)
  img, txt = unit(rng.normal(size=(b, 4))), unit(rng.normal(size=(b, 4)))
  if collapsed:  # every pair as similar as can be: the paper's thresholds relate the whole batch
    img, txt = np.repeat(img[:1], b, 0), np.repeat(txt[:1], b, 0)
  related = np.asarray(losses.mutual_top_k(jnp.asarray(img), jnp.asarray(txt), k))
  assert related.diagonal().all() and (related == related.T).all()
  assert (related.sum(1) - 1 <= k).all()
  score = np.minimum(img @ img.T, txt @ txt.T)
  np.fill_diagonal(score, -np.inf)
  top = np.argsort(-score, axis=1, kind="stable")[:, :min(k, b - 1)]
  near = np.zeros((b, b), bool)
  np.put_along_axis(near, top, True, 1)
  np.testing.assert_array_equal(related, (near & near.T) | np.eye(b, dtype=bool))


def test_mutual_top_k_hand_computed():
  # 0 and 1 are each other's nearest; 2's nearest is 1, but 1's is 0: with k = 1 only 0-1 is related.
  img = jnp.asarray(unit([[1.0, 0.0], [0.9, 0.1], [0.6, 0.4]]))
  related = np.asarray(losses.mutual_top_k(img, img, 1))
  np.testing.assert_array_equal(related, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  assert np.asarray(losses.mutual_top_k(img, img, 2)).all()
