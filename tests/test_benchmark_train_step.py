"""benchmarks.train_step: splitting a step into one layer's cost and the rest from two depths."""

import pytest

from benchmarks import train_step


def _figures(layers: int, jax_seconds: float, torch_seconds: float) -> dict:
  return {"layers": layers, "jax_steps_per_s": 1 / jax_seconds, "torch_steps_per_s": 1 / torch_seconds}


def test_per_layer_recovers_the_layer_and_the_rest():
  # step(L) = rest + (L - 1) * layer: JAX rest 0.25, layer 0.5; torch rest 0.75, layer 0.4.
  split = train_step.per_layer(_figures(1, 0.25, 0.75), _figures(3, 0.25 + 2 * 0.5, 0.75 + 2 * 0.4))
  assert split["jax"] == {"seconds_per_layer": pytest.approx(0.5), "seconds_rest": pytest.approx(0.25)}
  assert split["torch"] == {"seconds_per_layer": pytest.approx(0.4), "seconds_rest": pytest.approx(0.75)}
  assert split["jax_over_torch"] == {"seconds_per_layer": pytest.approx(0.8), "seconds_rest": pytest.approx(3.0)}


def test_per_layer_from_two_deeper_models():
  split = train_step.per_layer(_figures(2, 1.0 + 0.3, 2.0 + 0.6), _figures(4, 1.0 + 3 * 0.3, 2.0 + 3 * 0.6))
  assert split["jax"]["seconds_per_layer"] == pytest.approx(0.3)
  assert split["jax"]["seconds_rest"] == pytest.approx(1.0)
  assert split["jax_over_torch"]["seconds_per_layer"] == pytest.approx(2.0)


def test_with_layers_sets_both_towers_and_keeps_the_preset_by_default():
  deep = train_step.with_layers(train_step.SIZES["small"][0], 2)()
  assert (deep.vision.layers, deep.text.layers) == (2, 2)
  assert train_step.with_layers(train_step.SIZES["small"][0], None)().vision.layers == 4
