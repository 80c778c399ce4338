"""The optimizer: Adam with L2 weight decay (torch.optim.Adam semantics), the field's parameter
groups (biases at 2× the rate, undecayed), warm-up then cosine."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from dgia_jax.common import errors

SCHEDULE_UNITS = ("step", "epoch")


def lr_schedule(tcfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from lr·warmup_factor over `warmup_epochs`, then cosine to `min_lr`.

  `schedule_per` "step" moves the rate every step; "epoch" (the reference code's scheduler,
  stepped once an epoch) holds each epoch at the rate of its first step.
  """
  if tcfg.schedule_per not in SCHEDULE_UNITS:
    raise errors.ConfigError(f"train.schedule_per must be one of {SCHEDULE_UNITS}, got {tcfg.schedule_per!r}")
  warm = int(round(tcfg.warmup_epochs * steps_per_epoch))
  total = tcfg.epochs * steps_per_epoch
  cosine = optax.cosine_decay_schedule(tcfg.lr, max(1, total - warm), alpha=tcfg.min_lr / tcfg.lr)
  per_step = cosine if warm == 0 else optax.join_schedules(
      [optax.linear_schedule(tcfg.lr * tcfg.warmup_factor, tcfg.lr, warm), cosine], [warm])
  if tcfg.schedule_per == "epoch":
    return lambda step: per_step(step // steps_per_epoch * steps_per_epoch)
  return per_step


def param_groups(params) -> Any:
  """'bias' for parameters whose path names a bias (2× lr, no decay, as the field does), else 'weight'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "bias" if any("bias" in str(getattr(k, "key", k)) for k in path) else "weight", params)


def make_optimizer(tcfg: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                                                   optax.Schedule]:
  """(Adam with L2 weight decay added to the gradient, as torch.optim.Adam does; its lr schedule)."""
  schedule = lr_schedule(tcfg, steps_per_epoch)
  adam = lambda: optax.scale_by_adam(tcfg.b1, tcfg.b2, tcfg.eps)  # noqa: E731
  groups = {
      "weight": optax.chain(optax.add_decayed_weights(tcfg.weight_decay), adam(),
                            optax.scale_by_learning_rate(schedule)),
      "bias": optax.chain(adam(), optax.scale_by_learning_rate(lambda s: tcfg.bias_lr_factor * schedule(s))),
  }
  tx = optax.multi_transform(groups, param_groups)
  if tcfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), tx)
  return tx, schedule
