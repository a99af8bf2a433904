"""Linear heads on fixed features, and the feature-compression stage of the VQT release.

`fit_head` trains a linear softmax head on a fixed feature matrix with the main training's
protocol (batch 128, linear warm-up then cosine decay stepped once per epoch, the optimisers of
`vqt_jax/optim.py` with weight decay on the kernel only), optionally with a group-lasso penalty
on the head's input columns. The whole run is one jitted `jax.lax.scan` over optimiser steps
with the features resident on the device, so hundreds of epochs take seconds.

`compress` is the release's compression stage: with the queries frozen, a fresh head is
trained on all features ([CLS ; every layer's query outputs]) with
`loss = CE + c * sum_j ||W[:, j]||_2`, each feature is scored by the norm of its group (in
flax's [F, C] kernel layout the group of feature j is row j), the global top `keep_frac` are
kept, and a new head without the penalty is trained on those alone. The same fitter serves the
linear-probe and Head2Toe baselines (see `vqt_jax/training/feature_heads.py`).

Batches follow the main training loop: the examples are read as one endless stream of epochs,
each a fresh permutation (from a jax PRNG derived from the seed), and batch k is positions
[k * B, (k + 1) * B) of that stream. So every batch is full and none is dropped: an epoch whose
size is not a multiple of B ends inside a batch that continues with the next epoch's first
examples. A run is `ceil(epochs * N / B)` steps, and the schedule counts `N / B` steps per
epoch, as in `vqt_jax/train.py`.
"""

from __future__ import annotations

import fractions
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqt_jax.training import optim

Head = dict[str, jax.Array]  # {'kernel': [F, C], 'bias': [C]}

# Flat names of the head's leaves as `optim.decay_mask` expects them (no decay on '/bias').
_KERNEL, _BIAS = "head/kernel", "head/bias"


def num_to_keep(num_features: int, keep_frac: float, *, nearest: bool = False) -> int:
    """How many of `num_features` features a fraction `keep_frac` keeps: at least one.

    Truncated, as the VQT release counts them (`int(F * KEEP_FRAC)` in its
    src/models/build_h2t_model.py: 0.7 of 9,984 keeps 6,988); `nearest` rounds instead
    (Python's `round`, halves to even), Head2Toe's rule here.
    """
    count = round(keep_frac * num_features) if nearest else int(keep_frac * num_features)
    return max(1, count)


def group_norms(kernel: Any) -> np.ndarray:
    """The L2 norm of each input feature's group of head weights.

    Args:
      kernel: [F, C] head kernel (flax layout), so feature j's weights are row j.

    Returns:
      [F] float32 norms.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be [features, classes], got shape {kernel.shape}")
    return np.linalg.norm(kernel, axis=1)


def select_features(kernel: Any, keep_frac: float) -> np.ndarray:
    """Indices of the features with the largest group norms.

    Args:
      kernel: [F, C] head kernel.
      keep_frac: fraction of features to keep, in (0, 1]; see `num_to_keep`.

    Returns:
      Sorted int64 indices of the top `num_to_keep(F, keep_frac)` features by norm; among
      equal norms the lower index wins.
    """
    _check_keep_frac(keep_frac)
    norms = group_norms(kernel)
    k = num_to_keep(len(norms), keep_frac)
    # A stable sort of the negated norms orders ties by index, so the cut is deterministic.
    order = np.argsort(-norms, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def predict(head: Head, features: Any) -> jax.Array:
    """Logits [N, C] of a linear head on features [N, F]."""
    x = jnp.asarray(features, jnp.float32)
    if x.ndim != 2 or x.shape[1] != head["kernel"].shape[0]:
        raise ValueError(f"features must be [N, {head['kernel'].shape[0]}] for this head, "
                         f"got shape {x.shape}")
    return x @ head["kernel"] + head["bias"]


def accuracy(head: Head, features: Any, labels: Any) -> float:
    """Top-1 accuracy of a linear head on features [N, F] with integer labels [N]."""
    labels = np.asarray(labels)
    if len(labels) != np.shape(features)[0]:
        raise ValueError(f"{np.shape(features)[0]} feature rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    predictions = np.asarray(jnp.argmax(predict(head, features), axis=-1))
    return float(np.mean(predictions == labels))


def _check_keep_frac(keep_frac: float) -> None:
    if not 0.0 < keep_frac <= 1.0:
        raise ValueError(f"keep_frac must be in (0, 1], got {keep_frac}")


def _check_data(features: Any, labels: Any, num_classes: int, what: str) -> None:
    """Shape, range and finiteness checks, so bad inputs fail before anything compiles."""
    shape = np.shape(features)
    if len(shape) != 2:
        raise ValueError(f"{what} features must be a 2-D [N, F] array, got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{what} features are empty (shape {shape})")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be integers, got dtype {labels.dtype}")
    if len(labels) != shape[0]:
        raise ValueError(f"{what}: {shape[0]} feature rows but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{what} labels must be in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    xp = np if isinstance(features, np.ndarray) else jnp  # no host/device copy just to check
    if not bool(xp.isfinite(features).all()):
        raise ValueError(f"{what} features contain NaN or infinity")


def _check_hparams(num_classes: int, lr: float, wd: float, epochs: int, batch_size: int,
                   warmup_epochs: float, lasso: float, optimizer: str) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if wd < 0 or lasso < 0:
        raise ValueError(f"wd and lasso must be >= 0, got wd={wd}, lasso={lasso}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose from "
                         f"{', '.join(optim.OPTIMIZERS)}")


def row_norms(kernel: jax.Array) -> jax.Array:
    """Row norms whose gradient at a zero row is 0 (a valid subgradient) instead of NaN.

    The head starts at zero, so the plain sqrt would poison the first gradient.
    """
    sq = jnp.sum(kernel * kernel, axis=1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _batch_indices(key: jax.Array, num_examples: int, batch_size: int,
                   total_steps: int) -> jax.Array:
    """[total_steps, batch_size] example indices: an endless stream of shuffled epochs."""
    num_epochs = math.ceil(total_steps * batch_size / num_examples)
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(num_epochs))
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(keys)
    return perms.reshape(-1)[: total_steps * batch_size].reshape(total_steps, batch_size)


@functools.partial(jax.jit, static_argnames=(
    "num_classes", "batch_size", "total_steps", "epochs", "warmup_epochs", "steps_per_epoch",
    "optimizer"))
def _fit(x: jax.Array, y: jax.Array, key: jax.Array, lr: jax.Array, wd: jax.Array,
         lasso: jax.Array, bias_init: jax.Array, *, num_classes: int, batch_size: int,
         total_steps: int, epochs: int, warmup_epochs: int,
         steps_per_epoch: fractions.Fraction,
         optimizer: str) -> tuple[dict[str, jax.Array], jax.Array]:
    # lr, wd, lasso and bias_init are traced, so a sweep over them compiles once per shape.
    params = {_KERNEL: jnp.zeros((x.shape[1], num_classes), jnp.float32),
              _BIAS: jnp.full((num_classes,), bias_init, jnp.float32)}
    schedule = optim.epoch_warmup_cosine(lr, epochs, warmup_epochs, steps_per_epoch)
    tx = optim.make_optimizer(schedule, wd, params, optimizer)

    def loss_fn(p, xb, yb):
        logits = xb @ p[_KERNEL] + p[_BIAS]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce + lasso * row_norms(p[_KERNEL]).sum()

    def step(carry, idx):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    indices = _batch_indices(key, x.shape[0], batch_size, total_steps)
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), indices)
    return params, losses


def fit_head(
    features: Any,
    labels: Any,
    num_classes: int,
    *,
    lr: float,
    wd: float,
    epochs: int = 100,
    batch_size: int = 128,
    warmup_epochs: float = 10,
    lasso: float = 0.0,
    seed: int = 0,
    optimizer: str = "adam",
    bias_init: float = 0.0,
) -> Head:
    """Trains a linear softmax head on fixed features.

    Loss: mean softmax cross-entropy of the batch plus `lasso * sum_j ||kernel[j, :]||_2`
    (group lasso over input features; the bias is not penalised). The kernel starts at zero
    and the bias at `bias_init`, as the model's head. Weight decay `wd` applies to the kernel
    only. Batches run as in the main loop (see the module docstring: full batches over an
    endless stream of per-epoch shuffles, `ceil(epochs * N / batch_size)` steps).

    Args:
      features: [N, F] float features (numpy or jax).
      labels: [N] integer labels in [0, num_classes).
      num_classes: C.
      lr: peak learning rate.
      wd: weight decay (coupled L2 for 'adam'/'sgd', decoupled for 'adamw'; see optim.py).
      epochs: training epochs.
      batch_size: examples per step.
      warmup_epochs: epochs of linear warm-up before the cosine decay.
      lasso: group-lasso coefficient (0: none).
      seed: seeds the shuffles; the same seed gives the same head.
      optimizer: a name from `optim.OPTIMIZERS`.
      bias_init: constant initial bias.

    Returns:
      {'kernel': [F, C], 'bias': [C]}.

    Raises:
      ValueError: for malformed features/labels or hyper-parameters (before compiling).
      FloatingPointError: if training diverged (non-finite loss).
    """
    _check_hparams(num_classes, lr, wd, epochs, batch_size, warmup_epochs, lasso, optimizer)
    _check_data(features, labels, num_classes, "training")
    n = np.shape(features)[0]
    steps_per_epoch = fractions.Fraction(n, batch_size)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    params, losses = _fit(
        jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32),
        jax.random.key(seed), jnp.float32(lr), jnp.float32(wd), jnp.float32(lasso),
        jnp.float32(bias_init), num_classes=num_classes, batch_size=batch_size,
        total_steps=total_steps, epochs=int(epochs), warmup_epochs=int(warmup_epochs),
        steps_per_epoch=steps_per_epoch, optimizer=optimizer)
    last = float(losses[-1])
    if not math.isfinite(last):
        raise FloatingPointError(f"Head training diverged (final loss {last}); lower lr={lr}")
    return {"kernel": params[_KERNEL], "bias": params[_BIAS]}


def compress(
    train_features: Any,
    train_labels: Any,
    eval_features: Any,
    eval_labels: Any,
    num_classes: int,
    *,
    lr: float,
    wd: float,
    keep_frac: float = 0.7,
    lasso: float = 1e-4,
    epochs: int = 100,
    lr_scale: float = 0.5,
    batch_size: int = 128,
    warmup_epochs: float = 10,
    seed: int = 0,
    optimizer: str = "adam",
) -> dict[str, Any]:
    """The release's feature compression: group-lasso head, keep the top features, refit.

    Stage 1 trains a head on all features with the group-lasso penalty `lasso`; the features
    whose groups have the largest norms (the global top `keep_frac`) are kept; stage 2 trains a
    new head on the kept features without the penalty. Both stages use `lr_scale * lr` and
    `wd`, and the same seed.

    Args:
      train_features: [N, F] training features.
      train_labels: [N] integer labels.
      eval_features: [M, F] evaluation features.
      eval_labels: [M] integer labels.
      num_classes: C.
      lr: the selected learning rate of the main run (scaled by `lr_scale` here).
      wd: the selected weight decay.
      keep_frac: fraction of features kept, in (0, 1]; see `num_to_keep`.
      lasso: group-lasso coefficient of stage 1.
      epochs: epochs of each stage.
      lr_scale: factor on `lr` for both stages.
      batch_size: examples per step.
      warmup_epochs: warm-up epochs of each stage.
      seed: seeds the shuffles.
      optimizer: a name from `optim.OPTIMIZERS`.

    Returns:
      {'top1': eval top-1 of the final head on the kept features, 'top1_all': eval top-1 of
      the stage-1 head on all features, 'num_features': F, 'num_kept': len(kept), 'kept':
      sorted kept indices, 'head': the final head (on the kept features, in `kept` order)}.

    Raises:
      ValueError: for malformed inputs or hyper-parameters (before compiling).
    """
    _check_keep_frac(keep_frac)
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    _check_hparams(num_classes, lr * lr_scale, wd, epochs, batch_size, warmup_epochs, lasso,
                   optimizer)
    _check_data(train_features, train_labels, num_classes, "training")
    _check_data(eval_features, eval_labels, num_classes, "evaluation")
    if np.shape(eval_features)[1] != np.shape(train_features)[1]:
        raise ValueError(f"training features have {np.shape(train_features)[1]} columns but "
                         f"evaluation features {np.shape(eval_features)[1]}")

    fit = functools.partial(fit_head, num_classes=num_classes, lr=lr * lr_scale, wd=wd,
                            epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs,
                            seed=seed, optimizer=optimizer)
    x_train, x_eval = jnp.asarray(train_features, jnp.float32), jnp.asarray(eval_features,
                                                                         jnp.float32)
    lasso_head = fit(x_train, train_labels, lasso=lasso)
    kept = select_features(lasso_head["kernel"], keep_frac)
    head = fit(x_train[:, kept], train_labels, lasso=0.0)
    return {
        "top1": accuracy(head, x_eval[:, kept], eval_labels),
        "top1_all": accuracy(lasso_head, x_eval, eval_labels),
        "num_features": int(x_train.shape[1]),
        "num_kept": len(kept),
        "kept": kept,
        "head": head,
    }
