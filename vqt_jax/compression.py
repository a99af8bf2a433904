"""The feature selection of the VQT release's compression stage, and linear heads' scores.

The release compresses a trained VQT model (see `vqt_jax/training/compression_stage.py`, which
trains its two stages): a head trained with a group lasso on its input features scores each
feature by the norm of its group (in flax's [F, C] kernel layout, feature j's group is row j),
and the global top `keep_frac` are kept (`select_features`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Head = dict[str, jax.Array]  # {'kernel': [F, C], 'bias': [C]}


def num_to_keep(num_features: int, keep_frac: float, *, nearest: bool = False) -> int:
    """How many of `num_features` features a fraction `keep_frac` keeps: at least one.

    Truncated, as the VQT release counts them (`int(F * KEEP_FRAC)` in its
    src/models/build_h2t_model.py: 0.7 of 9,984 keeps 6,988); `nearest` rounds instead
    (Python's `round`, halves to even), Head2Toe's rule here.
    """
    return max(1, round(keep_frac * num_features) if nearest else int(keep_frac * num_features))


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
    if not 0.0 < keep_frac <= 1.0:
        raise ValueError(f"keep_frac must be in (0, 1], got {keep_frac}")
    norms = group_norms(kernel)
    # A stable sort of the negated norms orders ties by index, so the cut is deterministic.
    order = np.argsort(-norms, kind="stable")
    return np.sort(order[:num_to_keep(len(norms), keep_frac)]).astype(np.int64)


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
    return float(np.mean(np.asarray(jnp.argmax(predict(head, features), axis=-1)) == labels))


def row_norms(kernel: jax.Array) -> jax.Array:
    """Row norms whose gradient at a zero row is 0 (a valid subgradient) instead of NaN.

    The head starts at zero, so the plain sqrt would poison the first gradient.
    """
    sq = jnp.sum(kernel * kernel, axis=1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
