"""The loss and the jittable train step shared by training, benchmarks and tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqt_jax import trainable as trainable_lib

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Mean softmax cross-entropy over the (unmasked) examples."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return losses.mean()
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_loss_fn(model: nn.Module) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """loss(trainable, frozen, batch, rng) -> (loss, logits); differentiate the first argument."""

    def loss_fn(trainable: dict, frozen: dict, batch: Batch, rng: jax.Array):
        variables = trainable_lib.merge(trainable, frozen)
        logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng})
        return cross_entropy(logits, batch["label"]), logits

    return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
    """Returns step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics).

    Only `trainable` is differentiated and updated; `frozen` goes in as a constant.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)

    def step(trainable: dict, opt_state: Any, frozen: dict, batch: Batch, rng: jax.Array):
        (loss, logits), grads = grad_fn(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    return step
