"""The loss and the jittable train step shared by training, benchmarks and tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqt_jax import trainable as trainable_lib

Batch = dict[str, jax.Array]
# What `ViT.from_cache` reads from a cached batch.
CACHE_INPUTS = ("k", "v", "cls", "pre_logits")


def _mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The mean of `x` over the examples whose `mask` is 1 (all of them without a mask)."""
    return x.mean() if mask is None else (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Mean softmax cross-entropy over the (unmasked) examples."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return _mean(losses, mask)


def forward(model: nn.Module, variables: Any, batch: Batch, rng: jax.Array, *, train: bool,
            from_cache: bool) -> jax.Array:
    """The model on a batch of images (`image`), or of cached features (`CACHE_INPUTS`, read by
    `ViT.from_cache`), with `rng` as its dropout key."""
    rngs = {"dropout": rng}
    if from_cache:
        inputs = {k: v for k, v in batch.items() if k in CACHE_INPUTS}
        return model.apply(variables, inputs, train=train, rngs=rngs, method=model.from_cache)
    return model.apply(variables, batch["image"], train=train, rngs=rngs)


def make_loss_fn(model: nn.Module,
                 from_cache: bool = False) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """loss(trainable, frozen, batch, rng) -> (loss, logits); differentiate the first argument.

    Args:
      model: the ViT.
      from_cache: the batch holds cached features (`ViT.from_cache`: k/v/cls or pre_logits)
        instead of images.
    """

    def loss_fn(trainable: dict, frozen: dict, batch: Batch, rng: jax.Array):
        logits = forward(model, trainable_lib.merge(trainable, frozen), batch, rng, train=True,
                         from_cache=from_cache)
        # The mask zeroes the padding of an epoch's partial last batch: the loss is the mean
        # over the real examples, as torch's over a short batch.
        return cross_entropy(logits, batch["label"], batch.get("mask")), logits

    return loss_fn


def make_train_step(loss_fn: Callable[..., tuple[jax.Array, jax.Array]],
                    tx: optax.GradientTransformation):
    """Returns step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics).

    `loss_fn(trainable, frozen, batch, rng) -> (loss, logits)` (e.g. `make_loss_fn`); only
    `trainable` is differentiated and updated, `frozen` goes in as a constant.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable: dict, opt_state: Any, frozen: dict, batch: Batch, rng: jax.Array):
        (loss, logits), grads = grad_fn(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        metrics = {"loss": loss, "accuracy": _mean(correct, batch.get("mask")),
                   "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    return step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: the step, the trainable leaves and their optimiser state."""

    step: jax.Array
    trainable: dict
    opt_state: Any


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a device scalar)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_state_step(step: Callable, schedule: Callable[[jax.Array], jax.Array]):
    """The training loop's step on a `TrainState`: state_step(state, frozen, batch, rng).

    Args:
      step: from `make_train_step`.
      schedule: the lr schedule (reported as metric 'lr').

    Returns:
      state_step(state, frozen, batch, rng) -> (state, metrics): the dropout key is the run's
      key folded with the step, so a step's randomness depends only on (seed, step) and a
      resumed run continues exactly.
    """

    def state_step(state: TrainState, frozen: dict, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        trainable, opt_state, metrics = step(state.trainable, state.opt_state, frozen, batch, rng)
        metrics["lr"] = schedule(state.step)
        # Whether the new state (parameters and optimiser moments) is finite: a state with an
        # inf anywhere can never recover, whatever the lr, so it is never checkpointed.
        metrics["state_finite"] = all_finite((trainable, opt_state))
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return state_step
