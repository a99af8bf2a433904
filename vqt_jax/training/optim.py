"""Optimisers and learning-rate schedule of the VQT/VPT releases, in optax.

The VQT release trains with torch Adam, whose `weight_decay` is coupled L2 (wd * param is added
to the gradient before the Adam moments), not decoupled AdamW; biases are not decayed. The VPT
release trains prompts and linear probes with SGD (momentum 0.9, coupled L2 as well) and fully
fine-tunes with AdamW (decoupled decay). The learning rate warms up linearly and then follows a
half cosine to zero, and the releases step that schedule once per epoch (so the whole first
epoch runs at lr 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def warmup_cosine(
    base_lr: float,
    total_steps: int,
    warmup_steps: float,
    *,
    steps_per_epoch: float | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up from 0, then cosine decay to 0.

    Args:
      base_lr: peak learning rate.
      total_steps: optimiser steps of the whole run.
      warmup_steps: steps of the linear warm-up.
      steps_per_epoch: if given, the schedule advances once per epoch, as in the release
        (step -> floor(step / steps_per_epoch) epochs; total and warm-up counted in epochs).

    Returns:
      An optax schedule: step -> learning rate.
    """

    def schedule(step: jax.Array) -> jax.Array:
        t, total, warm = jnp.asarray(step, jnp.float32), float(total_steps), float(warmup_steps)
        if steps_per_epoch is not None:
            t = jnp.floor(t / steps_per_epoch)
            total = math.ceil(total / steps_per_epoch)
            warm = round(warm / steps_per_epoch)
        warmup = t / max(1.0, warm)
        progress = (t - warm) / max(1.0, total - warm)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return base_lr * jnp.where(t < warm, warmup, cosine)

    return schedule


def decay_mask(trainable: dict) -> dict:
    """Which trainable leaves get weight decay: all but biases (flat '/'-joined keys; a leaf
    named `bias` or `*_bias`, e.g. an adapter's `down_bias`)."""
    return {k: not k.rsplit("/", 1)[-1].endswith("bias") for k in trainable}


def _adam(schedule, weight_decay, mask) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))


def _sgd(schedule, weight_decay, mask) -> optax.GradientTransformation:
    # torch SGD: buf = 0.9 * buf + (g + wd * p); p -= lr * buf (optax.trace is the same).
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.trace(decay=0.9), optax.scale_by_learning_rate(schedule))


def _adamw(schedule, weight_decay, mask) -> optax.GradientTransformation:
    return optax.adamw(schedule, weight_decay=weight_decay, mask=mask)


# Optimisers by name: each takes (schedule, weight_decay, decay mask).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": _adam,
    "sgd": _sgd,
    "adamw": _adamw,
}


def make_optimizer(
    schedule: Callable[[jax.Array], jax.Array], weight_decay: float, trainable: dict,
    name: str = "adam",
) -> optax.GradientTransformation:
    """The named optimiser (see OPTIMIZERS) with weight decay on all but biases.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](schedule, weight_decay, decay_mask(trainable))
