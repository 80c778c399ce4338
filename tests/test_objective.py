"""The objective: its terms from the term table, in-batch relation sources, relation counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgia_jax.common import parallel
from dgia_jax.data import datasets, pipeline
from dgia_jax.inference import rebuild
from dgia_jax.method import objective
from dgia_jax.training import build, config_domains
from dgia_jax.training import step as step_lib

pytestmark = pytest.mark.slow  # trains or starts programs


# One training build (a traced and compiled step) per config, shared by the tests here: the
# step donates its state, so each call starts from a host copy of the initial one.
_BUILT: dict[str, tuple] = {}


def _built(cfg, tokenizer, split, order, mesh):
  key = cfg.to_json()
  if key not in _BUILT:
    built = build.training(cfg, tokenizer, order.steps_per_epoch, split.num_pairs, mesh)
    _BUILT[key] = built, jax.device_get(built.state), step_lib.shardings(built.state, mesh)
  return _BUILT[key]


def _one_step(cfg, pair_pids_of, pseudo_ids_of=None):
  """Parameters and counts after one step of the tiny config's second epoch (all losses on).

  `pseudo_ids_of(split)`, if given, sets the pairs' pseudo identities (relations.clusters)."""
  mesh = parallel.make_mesh()
  tokenizer, splits = datasets.load(cfg.data, ("train",))
  split = splits["train"]
  order = pipeline.EpochOrder(split.num_pairs, cfg.train.batch_size, cfg.seed)
  built, initial, layout = _built(cfg, tokenizer, split, order, mesh)
  state = jax.device_put(initial, layout.state)
  rows = state.bank.size
  if pseudo_ids_of is not None:
    pseudo = np.full(rows, -1, np.int32)
    pseudo[:split.num_pairs] = pseudo_ids_of(split)
    state = state.replace(pseudo_ids=jax.device_put(pseudo, layout.state.pseudo_ids))
  pids = np.full(rows, -1, np.int32)
  pids[:split.num_pairs] = pair_pids_of(split)
  start = order.steps_per_epoch  # epoch 2: the global loss is on
  state = state.replace(step=jax.device_put(np.int32(start), layout.state.step))
  batches = pipeline.train_batches(split, order, start_step=start, end_step=start + 2, num_threads=2)
  for batch in batches:
    state, metrics, counts = built.step(state, parallel.to_global(batch, mesh), jnp.asarray(pids))
  return state, metrics, counts


def test_losses_read_person_ids_only_as_the_oracle(tiny_config):
  true = lambda s: s.pair_person_ids  # noqa: E731
  shuffled = lambda s: np.random.default_rng(0).permutation(s.pair_person_ids)  # noqa: E731
  a, metrics, _ = _one_step(tiny_config, true)
  b, _, _ = _one_step(tiny_config, shuffled)
  assert {"loss_itc", "loss_lrc", "loss_iasc", "loss_gsrc"} <= set(metrics) and float(metrics["loss_gsrc"]) > 0
  for x, y in zip(jax.tree.leaves((a.params, a.bank)), jax.tree.leaves((b.params, b.bank))):
    np.testing.assert_array_equal(x, y)
  tiny_config.relations.oracle = True
  c, _, counts = _one_step(tiny_config, true)
  d, _, _ = _one_step(tiny_config, shuffled)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(c.params), jax.tree.leaves(d.params)))
  # With true ids as the relations, every same-person pair is related and nothing else.
  assert counts["lrc_pred"] == counts["lrc_hit"] == counts["lrc_same"]


def test_cluster_relations_replace_or_join_the_agreement_relations(tiny_config):
  true = lambda s: s.pair_person_ids  # noqa: E731
  tiny_config.relations.clusters.enabled = True
  tiny_config.relations.clusters.mode = "replace"
  _, _, counts = _one_step(tiny_config, true, pseudo_ids_of=true)
  assert counts["lrc_pred"] == counts["lrc_hit"] == counts["lrc_same"] > 0  # exactly the clusters
  _, _, none = _one_step(tiny_config, true, pseudo_ids_of=lambda s: np.full(s.num_pairs, -1))
  assert none["lrc_pred"] == 0  # outliers (-1) relate to nothing
  tiny_config.relations.clusters.mode = "or"
  tiny_config.relations.image_threshold = tiny_config.relations.text_threshold = -1.0  # agreement: all related
  _, _, both = _one_step(tiny_config, true, pseudo_ids_of=true)
  assert both["lrc_pred"] == 16 * 15


def _relation_aux(cfg):
  """The objective's aux on one training batch of the tiny set, relations switched on."""
  mesh = parallel.make_mesh()
  tokenizer, splits = datasets.load(cfg.data, ("train",))
  split = splits["train"]
  order = pipeline.EpochOrder(split.num_pairs, cfg.train.batch_size, cfg.seed)
  batch = next(pipeline.train_batches(split, order, start_step=0, end_step=1, num_threads=2))
  model = rebuild.build_model(cfg, tokenizer)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, *cfg.data.image_size, 3), np.float32),
                              np.zeros((1, cfg.data.context_length), np.int32))["params"]
  obj = objective.Objective.from_config(cfg, model, tokenizer.mask_id, order.steps_per_epoch, mesh)
  aux_of = jax.jit(lambda p, b, pids: obj(p, b, jnp.int32(0), pair_pids=pids)[2])
  return aux_of(params, jax.tree.map(jnp.asarray, batch), jnp.asarray(split.pair_person_ids))


def test_perturbed_partners_take_the_clean_pairs_relations_or_their_own(tiny_config):
  from dgia_jax.method import losses

  tiny_config.loss.update(dict(lrc=False, gsrc=False))
  aux = _relation_aux(tiny_config)
  sims = np.asarray(aux["img"] @ aux["img"].T)
  # Thresholds at the median cosine: about half the clean pairs are related.
  th_v, th_t = float(np.median(sims)), float(np.median(np.asarray(aux["txt"] @ aux["txt"].T)))
  tiny_config.relations.update(dict(image_threshold=th_v, text_threshold=th_t))
  tiny_config.iasc.relations = "clean"
  aux = _relation_aux(tiny_config)
  clean = np.asarray(losses.agreement_relations(aux["img"], aux["txt"], th_v, th_t))
  np.testing.assert_array_equal(aux["iasc_related"], clean)
  assert 0 < clean.sum() < clean.size
  tiny_config.iasc.relations = "perturbed"
  assert not np.array_equal(_relation_aux(tiny_config)["iasc_related"], clean)
  tiny_config.iasc.relations = "masked"
  with pytest.raises(ValueError, match="iasc.relations"):
    config_domains.check(tiny_config)


def test_relation_counts_hand_computed():
  aux = {"lrc_related": jnp.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], bool),
         "gsrc_rows": jnp.array([[3, 4], [0, 2], [4, 1]]), "gsrc_valid": jnp.array([[1, 1], [0, 0], [1, 0]], bool),
         "gsrc_edges": jnp.array([[0.7, 0.8], [-jnp.inf, -jnp.inf], [0.6, -jnp.inf]])}
  pair_pids = jnp.array([5, 5, 6, 5, 6])
  counts = jax.device_get(objective.relation_counts(aux, jnp.array([0, 1, 2]), pair_pids))
  # In batch: pids 5, 5, 6. Predicted off-diagonal: (0,1), (1,0), (1,2), (2,1) -> 2 hits of 2 same.
  assert (counts["lrc_pred"], counts["lrc_hit"], counts["lrc_same"]) == (4, 2, 2)
  # Global: anchor 0 (pid 5) -> rows 3 (5), 4 (6); anchor 2 (pid 6) -> row 4 (6).
  assert (counts["gsrc_pred"], counts["gsrc_hit"], counts["gsrc_anchors"]) == (3, 2, 2)
  summary = objective.summarize_relations(counts)
  assert summary["lrc_precision"] == 50.0 and summary["lrc_recall"] == 100.0
  assert summary["gsrc_precision"] == pytest.approx(200 / 3) and summary["gsrc_mean_weight"] == pytest.approx(0.7)
