"""The optimizer: the field's parameter groups, warm-up and schedule."""

import numpy as np

from dgia_jax.training import optim


def test_optimizer_gives_biases_twice_the_rate_and_no_decay():
  import jax.numpy as jnp
  import ml_collections

  tcfg = ml_collections.ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_epochs=0, warmup_factor=0.1, epochs=1,
                                        weight_decay=0.5, bias_lr_factor=2.0, b1=0.9, b2=0.999, eps=1e-8,
                                        grad_clip=0.0, schedule_per="step"))
  tx, _ = optim.make_optimizer(tcfg, steps_per_epoch=100)
  params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
  grads = {"dense": {"kernel": jnp.zeros(3), "bias": jnp.full(3, 1.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves by lr·sign(g): bias -2·lr, kernel driven only by the decay term.
  np.testing.assert_allclose(updates["dense"]["bias"], -0.2, rtol=1e-4)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1, rtol=1e-4)
