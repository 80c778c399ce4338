"""Global granularity: banks, anchor search, edge reweighting, global loss, and their sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgia_jax.common import parallel
from dgia_jax.method import identity_graph as ig
from dgia_jax.method import losses
from tests import helpers


def unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# The bank functions jitted (eagerly, every call of their shard_map is traced and compiled again).
update_bank = jax.jit(ig.update_bank, static_argnames=("mesh", "normalise"))
search_neighbours = jax.jit(ig.search_neighbours,
                            static_argnames=("k", "mesh", "skip_top1", "strict", "normalise_rows", "block_rows"))
gather_rows = jax.jit(ig.gather_rows, static_argnames=("mesh",))


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def filled_bank(feats_img, feats_txt, mesh):
  n = len(feats_img)
  bank = ig.empty_bank(ig.padded_size(n, mesh), feats_img.shape[1])
  return update_bank(bank, jnp.arange(n), jnp.asarray(feats_img), jnp.asarray(feats_txt), 0.9, mesh)


# ---- reweight_edges: properties ------------------------------------------------------------

finite = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, st.booleans()), min_size=1, max_size=6))
def test_edge_weights_finite_where_valid_and_minus_inf_elsewhere(entries):
  sims = jnp.asarray([[s for s, _ in entries]], jnp.float32)
  valid = jnp.asarray([[v for _, v in entries]])
  w = np.asarray(ig.reweight_edges(sims, valid))[0]
  v = np.asarray(valid)[0]
  assert np.isfinite(w[v]).all() and (w[v] > 0).all() and (w[v] < 1).all()
  assert np.isneginf(w[~v]).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=2, max_size=6, unique=True))
def test_edge_weights_decrease_as_similarity_increases(sims):
  w = np.asarray(ig.reweight_edges(jnp.asarray([sims], jnp.float32), jnp.ones((1, len(sims)), bool)))[0]
  order = np.argsort(sims)
  assert (np.diff(w[order]) <= 1e-7).all()


def test_edge_weights_hand_computed():
  w = ig.reweight_edges(jnp.array([[0.9, 0.8, 0.5]]), jnp.array([[True, True, False]]))
  denom = np.exp(1.0) + np.exp(0.9) + np.exp(0.8)
  np.testing.assert_allclose(w[0, :2], [1 - np.exp(0.9) / denom, 1 - np.exp(0.8) / denom], rtol=1e-6)
  assert np.isneginf(w[0, 2])


@jax.jit
def _global_targets(sims, valid, related):
  """Edges [B, k], the local target [B, B] and the global target and columns [B, B + B k], in one program."""
  edges = ig.reweight_edges(sims, valid)
  local = losses.relation_targets(related, 0.1)
  return edges, local, *ig.global_targets(local, edges)


@pytest.mark.slow  # compiles a program per drawn shape
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_anchor_without_neighbours_reduces_to_the_local_target(b, k, seed):
  rng = np.random.default_rng(seed)
  valid = rng.random((b, k)) < 0.5
  valid[0] = False
  edges, local, target, cols = _global_targets(jnp.asarray(rng.uniform(0.7, 1.0, (b, k)), jnp.float32),
                                               jnp.asarray(valid), jnp.asarray(rng.random((b, b)) < 0.3))
  assert target.shape == (b, b + b * k)
  np.testing.assert_array_equal(target[0, :b], local[0])
  assert np.isneginf(np.asarray(target[0, b:])).all()
  # Anchor i relates only to its own neighbours, with their weights.
  for i in range(b):
    own = np.asarray(target[i, b + i * k: b + (i + 1) * k])
    np.testing.assert_array_equal(own, np.asarray(edges[i]))
  np.testing.assert_array_equal(np.asarray(cols[:, b:]), np.broadcast_to(valid.reshape(-1), (b, b * k)))


# ---- banks and search ------------------------------------------------------------------------


def test_bank_first_write_then_ema(mesh):
  rng = np.random.default_rng(0)
  a, b = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(3, 4)))
  bank = ig.empty_bank(ig.padded_size(5, mesh), 4)
  bank = update_bank(bank, jnp.array([4, 0, 2]), jnp.asarray(a), jnp.asarray(b), 0.9, mesh)
  np.testing.assert_array_equal(np.asarray(bank.filled)[:5], [True, False, True, False, True])
  np.testing.assert_allclose(bank.image[4], a[0], rtol=1e-6)
  np.testing.assert_allclose(bank.text[2], b[2], rtol=1e-6)
  assert not np.asarray(bank.image[1]).any()
  c = unit(rng.normal(size=(1, 4)))
  bank = update_bank(bank, jnp.array([4]), jnp.asarray(c), jnp.asarray(c), 0.9, mesh)
  np.testing.assert_allclose(bank.image[4], unit(0.9 * c[0] + 0.1 * a[0]), rtol=1e-5)


def test_search_skips_itself_and_unfilled_rows_and_thresholds(mesh):
  rng = np.random.default_rng(1)
  feats = unit(rng.normal(size=(10, 6)))
  bank = filled_bank(feats[:8], feats[:8], mesh)  # rows 8, 9 never filled
  anchors = feats[[0, 3]]
  sims, rows, valid = search_neighbours(bank, jnp.asarray(anchors), jnp.array([0, 3]), 3, 0.2, mesh)
  ref = anchors @ feats[:8].T
  ref[0, 0] = ref[1, 3] = -np.inf
  np.testing.assert_array_equal(rows, np.argsort(-ref, axis=1, kind="stable")[:, :3])
  np.testing.assert_allclose(sims, np.sort(ref, axis=1)[:, ::-1][:, :3], rtol=1e-5)
  np.testing.assert_array_equal(valid, np.asarray(sims) >= 0.2)


def test_gather_rows_returns_bank_features(mesh):
  rng = np.random.default_rng(2)
  img, txt = unit(rng.normal(size=(7, 4))), unit(rng.normal(size=(7, 4)))
  bank = filled_bank(img, txt, mesh)
  rows = jnp.array([[6, 0], [3, 3]])
  g_img, g_txt = gather_rows(bank, rows, mesh)
  np.testing.assert_allclose(g_img, img[np.asarray(rows)], rtol=1e-6)
  np.testing.assert_allclose(g_txt, txt[np.asarray(rows)], rtol=1e-6)


def test_global_loss_matches_the_formula():
  rng = np.random.default_rng(3)
  b, k, d, tau = 3, 2, 5, 0.1
  img, txt = unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d)))
  nb_img, nb_txt = unit(rng.normal(size=(b, k, d))), unit(rng.normal(size=(b, k, d)))
  valid = np.array([[True, False], [True, True], [False, False]])
  edges = ig.reweight_edges(jnp.asarray(rng.uniform(0.7, 1, (b, k)), jnp.float32), jnp.asarray(valid))
  local = losses.relation_targets(jnp.zeros((b, b), bool), 0.1)
  target, cols = ig.global_targets(local, edges)
  got = float(ig.gsrc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(nb_img), jnp.asarray(nb_txt),
                           target, cols, tau))

  def direction(rows, cols_own, cols_bank):
    total = 0.0
    keep = valid.reshape(-1)
    for i in range(b):
      logits = np.concatenate([rows[i] @ cols_own.T, (rows[i] @ cols_bank.reshape(-1, d).T)[keep]]) / tau
      t = np.concatenate([np.asarray(target[i, :b]), np.asarray(target[i, b:])[keep]])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      q = np.exp(t - t[np.isfinite(t)].max())
      q /= q.sum()
      total += np.sum(p * (np.log(p) - np.log(q + 1e-8)))
    return total / b

  expected = direction(txt, img, nb_img) + direction(img, txt, nb_txt)
  assert got == pytest.approx(expected, rel=1e-4)


# ---- sharding: 8 devices equal 1, and the bank is never gathered ---------------------------


_SHARDED = """
import numpy as np, jax, jax.numpy as jnp
from dgia_jax.common import parallel
from dgia_jax.method import identity_graph as ig, losses
mesh = parallel.make_mesh()
rng = np.random.default_rng(0)
n, b, d, k = 37, 8, 16, 3
unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
bank_img, bank_txt = unit(rng.normal(size=(n, d))).astype(np.float32), unit(rng.normal(size=(n, d))).astype(np.float32)
bank = ig.empty_bank(ig.padded_size(n, mesh), d)
bank = jax.device_put(bank, parallel.data_sharding(mesh))
bank = jax.jit(lambda bank, i, t: ig.update_bank(bank, jnp.arange(n), i, t, 0.9, mesh))(bank, bank_img, bank_txt)
index = jnp.asarray(rng.choice(n, b, replace=False))
img = jnp.asarray(unit(bank_img[np.asarray(index)] + 0.3 * rng.normal(size=(b, d))), jnp.float32)
txt = jnp.asarray(unit(rng.normal(size=(b, d))), jnp.float32)


def step(bank, img, txt, index):
  sims, rows, valid = ig.search_neighbours(bank, img, index, k, 0.45, mesh)
  nb_img, nb_txt = ig.gather_rows(bank, rows, mesh)
  target, cols = ig.global_targets(losses.relation_targets(jnp.zeros((b, b), bool), 0.1),
                                   ig.reweight_edges(sims, valid))
  loss_fn = lambda i, t: ig.gsrc_loss(i, t, nb_img, nb_txt, target, cols, 0.02)
  loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(img, txt)
  new = ig.update_bank(bank, index, img, txt, 0.9, mesh)
  return sims, rows, valid, loss, grads, new


def code_step(bank, img, txt, index):  # the reference code's variant: ranks 2-4, strict, raw banks, B + M rows
  sims, rows, valid = ig.search_neighbours(bank, img, index, k, 0.45, mesh, skip_top1=True, strict=True,
                                           normalise_rows=True)
  nb_img, nb_txt = (ig.unit_rows(x) for x in ig.gather_rows(bank, rows, mesh))
  edges = ig.reweight_edges(sims, valid)
  loss_fn = lambda i, t: ig.gsrc_bank_rows_loss(i, t, nb_img, nb_txt, edges, 0.02, 1e-6)
  loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(img, txt)
  new = ig.update_bank(bank, index, 3.0 * img, 2.0 * txt, 0.9, mesh, normalise=False)
  return sims, rows, valid, loss, grads, new


padded = ig.padded_size(n, mesh)
out = {}
for name, fn in (("", step), ("code_", code_step)):
  compiled = jax.jit(fn).lower(bank, img, txt, index).compile()  # run, and its program read
  sims, rows, valid, loss, grads, new = compiled(bank, img, txt, index)
  hlo = compiled.as_text()
  gathers = [l for l in hlo.splitlines() if "all-gather" in l and "=" in l]
  assert not any(f"[{padded},{d}]" in l for l in gathers), gathers
  out.update({name + key: value for key, value in dict(
      sims=sims, rows=rows, valid=valid, loss=loss, g_img=grads[0], g_txt=grads[1], image=np.asarray(new.image)[:n],
      text=np.asarray(new.text)[:n], filled=np.asarray(new.filled)[:n]).items()})
np.savez(OUT_PATH, devices=jax.device_count(), shard=np.asarray(new.image.addressable_shards[0].data.shape), **out)
"""


@pytest.mark.slow  # starts a program
def test_sharded_search_loss_grads_and_update_equal_one_device(tmp_path):
  results = {}
  for devices in (1, 8):
    out = str(tmp_path / f"d{devices}.npz")
    helpers.run_python(_SHARDED.replace("OUT_PATH", repr(out)), devices=devices)
    results[devices] = dict(np.load(out))
  one, eight = results[1], results[8]
  assert int(eight["devices"]) == 8 and tuple(eight["shard"]) == (40 // 8, 16)  # 37 rows padded to 40
  for mode in ("", "code_"):  # the paper's reading, and the reference code's
    np.testing.assert_array_equal(eight[mode + "rows"], one[mode + "rows"])
    np.testing.assert_array_equal(eight[mode + "valid"], one[mode + "valid"])
    np.testing.assert_array_equal(eight[mode + "filled"], one[mode + "filled"])
    for key in ("sims", "loss", "g_img", "g_txt", "image", "text"):
      np.testing.assert_allclose(eight[mode + key], one[mode + key], atol=1e-5, err_msg=mode + key)
    assert one[mode + "valid"].any() and not one[mode + "valid"].all()


def test_bfloat16_banks_take_half_the_memory_and_compute_in_float32(mesh):
  rng = np.random.default_rng(3)
  img, txt = unit(rng.normal(size=(12, 8))), unit(rng.normal(size=(12, 8)))
  rows = ig.padded_size(12, mesh)
  banks = {}
  for dtype in ("float32", "bfloat16"):
    bank = update_bank(ig.empty_bank(rows, 8, dtype), jnp.arange(12), jnp.asarray(img), jnp.asarray(txt), 0.9, mesh)
    banks[dtype] = update_bank(bank, jnp.array([2, 5]), jnp.asarray(txt[:2]), jnp.asarray(img[:2]), 0.9, mesh)
  b32, b16 = banks["float32"], banks["bfloat16"]
  assert b16.image.dtype == jnp.bfloat16 and b16.image.nbytes * 2 == b32.image.nbytes
  # The running mean is taken in float32 from the widened rows and rounded once as it is stored.
  old = np.asarray(ig.empty_bank(rows, 8, "bfloat16").image.at[:12].set(jnp.asarray(img, jnp.bfloat16)), np.float32)
  mixed = 0.9 * txt[:2] + 0.1 * old[[2, 5]]
  expected = np.asarray(jnp.asarray(unit(mixed)).astype(jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.asarray(b16.image, np.float32)[[2, 5]], expected, rtol=1e-2, atol=1e-3)
  anchors, index = jnp.asarray(img[[0, 7]]), jnp.array([0, 7])
  s32, r32, v32 = search_neighbours(b32, anchors, index, 3, 0.0, mesh)
  s16, r16, v16 = search_neighbours(b16, anchors, index, 3, 0.0, mesh)
  stored = np.asarray(b16.image, np.float32)
  assert s16.dtype == jnp.float32
  np.testing.assert_allclose(s16, np.take_along_axis(np.asarray(anchors) @ stored.T, np.asarray(r16), 1), rtol=1e-6)
  assert np.abs(np.asarray(s16) - np.asarray(s32)).max() < 2e-2
  g_img, g_txt = gather_rows(b16, r16, mesh)
  assert g_img.dtype == g_txt.dtype == jnp.float32
  np.testing.assert_array_equal(g_img, stored[np.asarray(r16)])


@pytest.mark.parametrize("skip_top1", [False, True])
def test_a_bfloat16_bank_searched_in_blocks_finds_what_the_whole_shard_search_finds(mesh, skip_top1):
  """37 rows in blocks of 8: four whole blocks and a last one overlapping the fourth (rows 29-36)."""
  rng = np.random.default_rng(5)
  feats = unit(rng.normal(size=(37, 16)))
  feats[30] = feats[3]  # a tie between rows of two blocks: the lower row first, as a whole-shard top-k
  bank = update_bank(ig.empty_bank(ig.padded_size(37, mesh), 16, "bfloat16"), jnp.arange(37), jnp.asarray(feats),
                     jnp.asarray(feats), 0.9, mesh)
  anchors, index = jnp.asarray(unit(feats[[3, 12, 33]] + 0.1 * rng.normal(size=(3, 16)))), jnp.array([3, 12, 33])
  whole = search_neighbours(bank, anchors, index, 4, 0.1, mesh, skip_top1=skip_top1)
  blocks = search_neighbours(bank, anchors, index, 4, 0.1, mesh, skip_top1=skip_top1, block_rows=8)
  for a, b in zip(whole, blocks):
    np.testing.assert_array_equal(a, b)
  assert np.asarray(whole[2]).any()


def test_a_bfloat16_bank_is_never_widened_whole_by_the_search_or_the_update(mesh):
  """XLA's CPU backend widens a bfloat16 operand of a gather, scatter or slice whole to float32 (the
  search and the update, each 2 × a float32 bank in temporaries before): the compiled search holds
  less than one float32 bank, the update at most the two banks' bits."""
  rows, dim = 1 << 20, 64
  f32_bank = rows * dim * 4
  bank = ig.MemoryBank(*(jax.ShapeDtypeStruct((rows, dim), jnp.bfloat16) for _ in range(2)),
                       jax.ShapeDtypeStruct((rows,), jnp.bool_))
  feats, index = jax.ShapeDtypeStruct((64, dim), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.int32)
  search = jax.jit(lambda b, a, i: ig.search_neighbours(b, a, i, 3, 0.7, mesh)).lower(bank, feats, index)
  assert search.compile().memory_analysis().temp_size_in_bytes < 0.7 * f32_bank  # measured: 0.63 (the bits, a block)
  update = jax.jit(lambda b, i, x: ig.update_bank(b, i, x, x, 0.9, mesh), donate_argnums=0).lower(bank, index, feats)
  assert update.compile().memory_analysis().temp_size_in_bytes <= 1.05 * f32_bank


_AT_MILLIONS = """
import re
import jax, jax.numpy as jnp
from dgia_jax.common import parallel
from dgia_jax.method import identity_graph
from dgia_jax.training import build
from tests import helpers

class Tokenizer:
  vocab_size, eot_id, context_length, mask_id = 1000, 999, 16, 998

mesh = parallel.make_mesh()
data = parallel.data_sharding(mesh)
for n, dtype in ((68_126, "bfloat16"), (5_000_000, "float32")):  # both ends, both storage dtypes
  c = helpers.tiny_config("unused")
  c.model.embed_dim = 512  # the banks' width; the towers stay the tiny ones (what is checked is the banks)
  c.data.context_length, c.data.image_size, c.train.batch_size, c.gsrc.bank_dtype = 16, (32, 16), 16, dtype
  c.relations.start_epoch = c.gsrc.start_epoch = 1
  c.relations.clusters.enabled = True
  built = build.training(c, Tokenizer, 100, n, mesh, abstract=True)  # nothing allocated
  padded = identity_graph.padded_size(n, mesh)
  batch = {"image": jax.ShapeDtypeStruct((16, 32, 16, 3), jnp.uint8, sharding=data),
           "tokens": jax.ShapeDtypeStruct((16, 16), jnp.int32, sharding=data),
           "index": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=data)}
  pids = jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=data)
  hlo = built.step.lower(built.state, batch, pids).compile().as_text()
  shapes = {s for s in re.findall(r"\\[([0-9,]+)\\]", hlo)}
  whole = sorted(s for s in shapes if str(padded) in s.split(","))
  local = [s for s in shapes if str(padded // 8) in s.split(",")]
  assert not whole and local, (n, dtype, whole[:5])
  print(n, dtype, "per-device rows", padded // 8, "ok")
"""


@pytest.mark.slow
def test_the_step_holds_no_bank_sized_array_on_one_device_at_millions_of_rows():
  """The compiled step (8 devices; banks, filled flags, pseudo ids and pair ids sharded along N) has
  no array with all N_pad rows, at CUHK-PEDES's 68 k pairs and at 5 M, in both storage dtypes."""
  proc = helpers.run_python(_AT_MILLIONS, devices=8)
  assert proc.stdout.count(" ok") == 2, proc.stdout
