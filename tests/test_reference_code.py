"""Parity with the code that produced the paper's numbers (`syl6312/DGCMIA`, PyTorch).

Each `_code_*` function below is a NumPy transcription, written for this test from what that
code does (its `model/objectives.py`, `model/build.py`, `solver/`), not a copy of it: loops and
masks as the code has them, float64. Our jitted terms, with the switches the benchmark configs
set, must give the same values on the same features to 1e-5 (float32).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dgia_jax.common import parallel
from dgia_jax.method import identity_graph, objective
from dgia_jax.models import clip
from dgia_jax.training import optim
from tests import helpers

LOGIT_SCALE = 50.0  # the code's 1 / temperature 0.02
EPS = 1e-6  # the code's ε of log(q + ε)


def _normalised(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x):
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  top = np.max(np.where(finite, x, -np.inf), axis=1, keepdims=True)
  e = np.where(finite, np.exp(x - top), 0.0)
  return e / e.sum(1, keepdims=True)


def _code_sdm_against(labels, image_feats, text_feats):
  """The code's SDM against a label matrix: zeros are 'not related' (-inf), the rest are target
  logits; both directions use the same label rows."""
  img, txt = _normalised(image_feats), _normalised(text_feats)
  q = _softmax(np.where(labels != 0, labels, -np.inf))
  total = 0.0
  for logits in (LOGIT_SCALE * txt @ img.T, LOGIT_SCALE * img @ txt.T):
    p = _softmax(logits)
    log_p = np.log(p)
    total += np.mean(np.sum(p * (log_p - np.log(q + EPS)), axis=1))
  return total


def _code_in_batch(image_feats, text_feats, th_image=0.7, th_text=0.7):
  """The in-batch relation loss (`itc1`), and, on perturbed features, the consistency loss (`cons`)."""
  img, txt = _normalised(image_feats), _normalised(text_feats)
  labels = ((img @ img.T > th_image) & (txt @ txt.T > th_text)).astype(np.float64)
  eye = np.eye(len(img))
  labels = (labels - eye) * 0.1 + eye
  return _code_sdm_against(labels, image_feats, text_feats)


def _code_memory(i_feats, t_feats, img_memory, txt_memory, threshold=0.7):
  """The global loss (`memory_soft`, epoch 2 on): ranks 2-4 of each batch image's similarities to
  the whole normalised image memory, kept above the threshold, weighted 1 - softmax([1, s...]);
  the kept memory rows join the batch as B + M rows of their anchor's group."""
  sims = _normalised(i_feats) @ _normalised(img_memory).T
  picked, groups, weights = [], list(range(len(i_feats))), {}
  for n in range(len(i_feats)):
    order = np.argsort(-sims[n], kind="stable")
    candidates = [int(j) for j in order[1:4] if sims[n, j] > threshold]
    if candidates:
      w = _softmax(np.array([[1.0] + [sims[n, j] for j in candidates]]))[0]
      weights[n] = 1.0 - w[1:]
    picked += candidates
    groups += [n] * len(candidates)
  new_img = np.concatenate([i_feats, img_memory[picked]])
  new_txt = np.concatenate([t_feats, txt_memory[picked]])
  groups = np.array(groups)
  labels = (groups[:, None] == groups[None, :]).astype(np.float64)
  for n, w in weights.items():
    related = np.flatnonzero(labels[n])[1:]  # after the anchor's own column: its memory rows
    labels[n, related] = w
  return _code_sdm_against(labels, new_img, new_txt), len(picked)


def _benchmark_objective(terms, batch_size, **sections):
  """Our objective with the benchmark config's switches, only `terms` on, on a tiny model; `sections`
  ({"relations": {...}}) are set before it is built (its options are read once)."""
  config = helpers.load_config("cuhk_pedes")
  config.loss.update({t: t in terms for t in objective.TERM_NAMES})
  config.gsrc.start_epoch = 1
  for section, values in sections.items():
    config[section].update(values)
  model = clip.CLIP(clip.CLIPConfig(16, clip.VisionConfig((16, 16), 8, 16, 1, 2),
                                    clip.TextConfig(32, 8, 16, 1, 2, 31)))
  return objective.Objective.from_config(config, model, 30, 10, parallel.make_mesh()), config


def _batch(b):
  return {"index": jnp.arange(b, dtype=jnp.int32)}


def _features(rng, b, d, clusters=3, spread=0.6):
  """Features [b, d] in a few tight clusters, so that thresholds at 0.7 both keep and drop pairs."""
  centres = rng.normal(size=(clusters, d))
  return (centres[rng.integers(0, clusters, b)] + spread * rng.normal(size=(b, d))).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_reference_code_in_batch_and_consistency_losses(seed):
  rng = np.random.default_rng(seed)
  b, d = 12, 16
  img, txt, p_img, p_txt = (_features(rng, b, d) for _ in range(4))
  obj, _ = _benchmark_objective(("lrc", "iasc"), b)
  emb = {k: clip.l2_normalize(jnp.asarray(v)) for k, v in dict(img=img, txt=txt, p_img=p_img, p_txt=p_txt).items()}
  _, terms, aux = obj.loss(emb, _batch(b), jnp.int32(0))
  related = np.asarray(aux["lrc_related"]).sum() - b
  assert 0 < related < b * (b - 1), "the case must hold related and unrelated pairs"
  assert float(terms["lrc"]) == pytest.approx(_code_in_batch(img, txt), abs=1e-5)
  # Consistency: the perturbed pairs' relations come from the perturbed features themselves.
  assert float(terms["iasc"]) == pytest.approx(_code_in_batch(p_img, p_txt), abs=1e-5)
  assert not np.array_equal(aux["iasc_related"], aux["lrc_related"])


def test_reference_code_in_batch_threshold_is_strict():
  img = jnp.array([[1.0, 0.0], [0.75, 0.5], [0.0, 1.0]])  # img0 · img1 = 0.75 exactly
  txt = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])

  def related(**compare):
    obj, config = _benchmark_objective(("lrc",), 3, relations=dict(image_threshold=0.75, text_threshold=0.75, **compare))
    return config.relations.compare, np.asarray(obj.loss({"img": img, "txt": txt}, _batch(3), jnp.int32(0))[2]["lrc_related"])

  compare, pairs = related()
  assert compare == ">" and not pairs[0, 1]  # the code's: 0.75 is not > 0.75
  assert related(compare=">=")[1][0, 1]


def _memory_case(rng, b, n, d, own_not_first=()):
  """Batch features and filled raw memories; anchor i's own memory row is i (as the bank's rows of
  the batch's pairs). For anchors in `own_not_first`, another row is made closer than its own."""
  memory_img = _features(rng, n, d, clusters=4, spread=0.5) * rng.uniform(2, 8, size=(n, 1)).astype(np.float32)
  memory_txt = _features(rng, n, d, clusters=4, spread=0.5) * rng.uniform(2, 8, size=(n, 1)).astype(np.float32)
  i_feats = (memory_img[:b] + 0.3 * rng.normal(size=(b, d))).astype(np.float32)
  t_feats = _features(rng, b, d)
  for i in own_not_first:
    memory_img[b + i] = 5.0 * i_feats[i]  # the most similar row, before the pair's own
  return i_feats, t_feats, memory_img, memory_txt


# The bank update jitted (eagerly, every call of its shard_map is traced and compiled again).
_update_bank = jax.jit(identity_graph.update_bank, static_argnames=("mesh", "normalise"))


@pytest.mark.parametrize("case", ["some", "none", "all", "own_row_not_first"])
def test_reference_code_memory_loss(case):
  rng = np.random.default_rng(["some", "none", "all", "own_row_not_first"].index(case))
  b, n, d = 8, 40, 16
  i_feats, t_feats, memory_img, memory_txt = _memory_case(rng, b, n, d,
                                                          own_not_first=(1, 4) if case == "own_row_not_first" else ())
  ranked = -np.sort(-(_normalised(i_feats) @ _normalised(memory_img).T), axis=1)[:, 1:4]
  threshold = {"none": 0.999, "all": -1.0}.get(case, float(np.median(ranked)))  # else: half of them kept
  expected, picked = _code_memory(i_feats, t_feats, memory_img, memory_txt, threshold)
  assert {"none": picked == 0, "all": picked == 3 * b}.get(case, 0 < picked < 3 * b), (picked, threshold)

  obj, _ = _benchmark_objective(("gsrc",), b, gsrc=dict(threshold=threshold))
  mesh = obj.mesh
  bank = identity_graph.empty_bank(identity_graph.padded_size(n, mesh), d)
  bank = _update_bank(bank, jnp.arange(n), jnp.asarray(memory_img), jnp.asarray(memory_txt), 0.9, mesh, normalise=False)
  emb = {"img": clip.l2_normalize(jnp.asarray(i_feats)), "txt": clip.l2_normalize(jnp.asarray(t_feats)),
         "raw_img": jnp.asarray(i_feats), "raw_txt": jnp.asarray(t_feats)}
  _, terms, aux = jax.jit(obj.loss)(emb, _batch(b), jnp.int32(0), bank)  # eagerly, its shard_maps compile per call
  assert int(np.asarray(aux["gsrc_valid"]).sum()) == picked
  if case == "own_row_not_first":  # rank 1 is skipped whatever it is: the pair's own row is then a candidate
    rows = np.asarray(aux["gsrc_rows"])
    assert all(i in rows[i] and b + i not in rows[i] for i in (1, 4))
  assert float(terms["gsrc"]) == pytest.approx(expected, abs=1e-5)


def test_reference_code_bank_update_is_a_raw_running_mean():
  rng = np.random.default_rng(0)
  obj, _ = _benchmark_objective(("gsrc",), 4)
  mesh = obj.mesh
  old = rng.normal(size=(6, 16)).astype(np.float32) * 4
  new = rng.normal(size=(4, 16)).astype(np.float32) * 3
  bank = identity_graph.empty_bank(6, 16)
  bank = _update_bank(bank, jnp.arange(6), jnp.asarray(old), jnp.asarray(old), 0.9, mesh, normalise=False)
  aux = {"raw_img": jnp.asarray(new), "raw_txt": jnp.asarray(new)}
  updated = jax.jit(obj.update_bank)(bank, {"index": jnp.array([0, 2, 3, 5])}, aux)
  expected = old.copy()
  expected[[0, 2, 3, 5]] = 0.9 * new + 0.1 * old[[0, 2, 3, 5]]  # the code's b <- 0.9 f + 0.1 b, not renormalised
  np.testing.assert_allclose(updated.image, expected, rtol=1e-6)


def _code_lr(base_lr, epoch, warmup_factor=0.1, warmup_epochs=5, total_epochs=40, target_lr=0.0):
  """The code's LRSchedulerWithWarmup ('linear' warm-up, 'cosine'), stepped once an epoch."""
  if epoch < warmup_epochs:
    alpha = epoch / warmup_epochs
    return base_lr * (warmup_factor * (1 - alpha) + alpha)
  ratio = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
  return target_lr + (base_lr - target_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def test_reference_code_schedule_is_stepped_per_epoch():
  tcfg = helpers.load_config("cuhk_pedes").train
  steps_per_epoch = 7
  schedule = optim.lr_schedule(tcfg, steps_per_epoch)
  for epoch in range(tcfg.epochs):
    for within in (0, 3, 6):
      assert float(schedule(epoch * steps_per_epoch + within)) == pytest.approx(_code_lr(1e-5, epoch), rel=1e-5)


def test_reference_code_adam_step_with_its_parameter_groups():
  """One step of the benchmark recipe's optimizer against torch.optim.Adam(eps=1e-3) with the code's
  groups: a parameter whose name holds 'bias' at 2x the rate and no weight decay, the rest decayed."""
  tcfg = helpers.load_config("cuhk_pedes").train
  rng = np.random.default_rng(0)
  params = {"visual": {"ln_pre": {"scale": rng.normal(size=8), "bias": rng.normal(size=8)},
                       "proj": rng.normal(size=(8, 4))},
            "text": {"c_fc": {"kernel": rng.normal(size=(4, 6)), "bias": rng.normal(size=6)}}}
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  # Small gradients, as in fine-tuning, and large ones: eps 1e-3 matters for the first.
  grads = jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape) * rng.choice([1e-4, 1.0], size=x.shape),
                                            np.float32), params)
  tx, schedule = optim.make_optimizer(tcfg, steps_per_epoch=100)
  updates, _ = tx.update(grads, tx.init(params), params)

  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_g = jax.tree.leaves(grads)
  tensors, groups = [], []
  lr = float(schedule(0))  # the rate of epoch 1 (warm-up from lr x 0.1)
  for (path, p), g in zip(flat_p, flat_g):
    name = ".".join(str(getattr(k, "key", k)) for k in path)
    t = torch.tensor(p.astype(np.float64), requires_grad=True)  # float64: the step itself is the reference
    t.grad = torch.tensor(g.astype(np.float64))
    tensors.append(t)
    bias = "bias" in name
    groups.append({"params": [t], "lr": lr * (tcfg.bias_lr_factor if bias else 1.0),
                   "weight_decay": 0.0 if bias else tcfg.weight_decay})
  torch.optim.Adam(groups, lr=lr, betas=(tcfg.b1, tcfg.b2), eps=1e-3).step()
  for (path, p), t, update in zip(flat_p, tensors, jax.tree.leaves(updates)):
    np.testing.assert_allclose(update, t.detach().numpy() - p.astype(np.float64), rtol=1e-5, atol=1e-13,
                               err_msg=jax.tree_util.keystr(path))
  assert tcfg.eps == 1e-3 and lr == pytest.approx(1e-6)
  # The regime eps = 1e-3 makes: a gradient of 1e-4 moves its weight by lr / 11, not by lr.
  kernel, step = grads["text"]["c_fc"]["kernel"], np.asarray(updates["text"]["c_fc"]["kernel"])
  small = np.abs(kernel) < 1e-3
  assert small.any() and np.all(np.abs(step[small]) < 0.3 * lr)
