"""The order of the training stream: which example fills each slot of each global batch.

One definition serves every way of training: the image pipeline (`data.train_dataset`), the
host cache (`cache.train_batches`) and the device-resident cache, whose compiled loop draws
the permutations and gathers on the device (`device_cache`). It needs only jax and numpy.

Every epoch is a fresh permutation of the N examples, drawn by ``(seed, epoch)`` with
`jax.random.permutation` under the threefry PRNG, whose bits and sort-based shuffle are the
same on every backend, so a run's batches do not depend on where they are computed.

* 'stream' batching (big_vision): global batch k is stream positions ``[k B, (k + 1) B)``;
  position p is entry ``p mod N`` of epoch ``p div N``'s permutation, so a batch may straddle
  epochs and every batch is full.
* 'epoch' batching (the VQT release's ``drop_last=False``): each epoch is ``S = ceil(N / B)``
  batches; batch k is batch ``k mod S`` of epoch ``k div S`` and the slots past the epoch's
  end are padding (mask 0; they repeat the epoch's last entry so the gather stays in range).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BATCHINGS = ("stream", "epoch")


def check_batching(batching: str) -> None:
    """Raises ValueError for a batching that is not 'stream' or 'epoch'."""
    if batching not in BATCHINGS:
        raise ValueError(f"Unknown batching {batching!r}; choose from {', '.join(BATCHINGS)}.")


def steps_per_epoch(num_examples: int, global_batch_size: int, batching: str) -> float:
    """Optimiser steps per epoch: ceil(N / B) with 'epoch' batching, N / B with 'stream'."""
    check_batching(batching)
    per_epoch = num_examples / global_batch_size
    return math.ceil(per_epoch) if batching == "epoch" else per_epoch


def epoch_permutation(seed: int | jax.Array, epoch: int | jax.Array,
                      num_examples: int) -> jax.Array:
    """The permutation of epoch `epoch` (int32 [N]); jittable, `epoch` may be traced."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), epoch)
    return jax.random.permutation(key, num_examples).astype(jnp.int32)


def batch_indices(step: int | jax.Array, seed: int | jax.Array, *, num_examples: int,
                  batch_size: int, batching: str) -> tuple[jax.Array, jax.Array]:
    """(example index int32 [B], mask float32 [B]) of global batch `step`; jittable.

    `step` and `seed` may be traced; the sizes and the batching are static.
    """
    check_batching(batching)
    n, b = num_examples, batch_size
    slots = jnp.arange(b, dtype=jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    if batching == "epoch":
        per_epoch = -(-n // b)
        offset = (step % per_epoch) * b + slots
        index = epoch_permutation(seed, step // per_epoch, n)[jnp.minimum(offset, n - 1)]
        return index, (offset < n).astype(jnp.float32)
    # A batch of B positions touches at most B // N + 2 consecutive epochs (static).
    positions = step * b + slots
    first = positions[0] // n
    perms = jax.vmap(lambda e: epoch_permutation(seed, first + e, n))(jnp.arange(b // n + 2))
    index = perms[positions // n - first, positions % n]
    return index.astype(jnp.int32), jnp.ones((b,), jnp.float32)


_batch_indices_jit = jax.jit(batch_indices,
                             static_argnames=("num_examples", "batch_size", "batching"))


def host_batch_indices(step: int, num_examples: int, *, global_batch_size: int, seed: int = 0,
                       rows: slice | None = None,
                       batching: str = "stream") -> tuple[np.ndarray, np.ndarray]:
    """`batch_indices` computed on the host's CPU, as numpy, for this host's rows.

    Args:
      step: the global step.
      num_examples: N.
      global_batch_size: B over all hosts.
      seed: the run's seed.
      rows: the slots of the global batch this host feeds (default: all).
      batching: 'stream' or 'epoch'.

    Returns:
      (int64 example indices, float32 mask: 1 real, 0 padding), one entry per row.
    """
    if num_examples <= 0:
        raise ValueError("The training set is empty.")
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        index, mask = _batch_indices_jit(step, seed, num_examples=num_examples,
                                         batch_size=global_batch_size, batching=batching)
        index, mask = np.asarray(index, np.int64), np.asarray(mask)
    return index[rows or slice(None)], mask[rows or slice(None)]


def process_rows(global_batch_size: int) -> slice:
    """This process's equal share of a global batch's slots, in process order."""
    local = global_batch_size // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def host_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The slots of a global batch that this host's devices hold under `sharding`.

    Read from the sharding rather than assumed from the process index, so any device order
    works as long as each host's devices hold one contiguous block of the batch (as meshes
    over `jax.devices()` do).

    Raises:
      ValueError: this host's slots are not one contiguous block.
    """
    indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    covered = sorted({i for idx in indices for i in range(*idx[0].indices(global_batch_size))})
    lo, hi = covered[0], covered[-1] + 1
    if len(covered) != hi - lo:
        raise ValueError(f"This host's devices hold slots {covered} of the global batch, not one "
                         "contiguous block; build the mesh with each host's devices together")
    return slice(lo, hi)
