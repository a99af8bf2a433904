"""Inference passes over a data-parallel mesh: a function whose every output row depends on
its input row alone (a forward), run with each device's rows in steps (`in_steps`), jitted
with the batch sharded (`forward_fn`), and its outputs fetched to the host in global row
order (`fetch_rows`). Cache builds, evaluations, the feature heads and serving run theirs here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Rows per device that an inference pass runs at a time on CPU (`in_steps`): XLA:CPU runs a
# few rows' small activations faster than a whole batch's (docs/performance.md).
CPU_ROWS_PER_STEP = 8


def in_steps(fn: Callable[[Any], Any], x: Any, mesh: Mesh, rows_per_step: int | None = None) -> Any:
    """`fn(x)` (inside a jitted program) for a batch pytree `x` whose rows are sharded over
    `mesh`'s data axis and for an `fn` whose every output row depends on its input row alone
    (an inference forward): each device runs its rows in steps of a few rows, a loop inside
    the program, with no rows moved between devices.

    Args:
      fn: batch pytree -> pytree of [B, ...] outputs.
      x: pytree of [B, ...] arrays.
      mesh: the data-parallel mesh `x` is sharded over.
      rows_per_step: rows per device per step (a step takes the largest count that divides
        the device's rows); 0 runs them all at once. Default: `CPU_ROWS_PER_STEP` on CPU, 0
        elsewhere.
    """
    if rows_per_step is None:
        rows_per_step = CPU_ROWS_PER_STEP if mesh.devices.flat[0].platform == "cpu" else 0
    d = mesh.shape["data"]
    b = jax.tree.leaves(x)[0].shape[0]
    c = math.gcd(b // d, rows_per_step)
    if c in (0, b // d):
        return fn(x)
    n = b // d // c
    steps = NamedSharding(mesh, P(None, "data"))

    def split(a: jax.Array) -> jax.Array:  # [B, ...] -> [n, D c, ...]: step i holds each
        a = a.reshape(d, n, c, *a.shape[1:]).swapaxes(0, 1)  # device's rows [i c, (i + 1) c)
        return jax.lax.with_sharding_constraint(a.reshape(n, d * c, *a.shape[3:]), steps)

    def join(a: jax.Array) -> jax.Array:
        a = a.reshape(n, d, c, *a.shape[2:]).swapaxes(0, 1)
        return a.reshape(b, *a.shape[3:])

    return jax.tree.map(join, jax.lax.map(fn, jax.tree.map(split, x)))


def forward_fn(fn: Callable, mesh: Mesh, rows_per_step: int | None = None, *,
               out_sharding: NamedSharding | None = None) -> Callable:
    """`fn(variables, batch)` jitted data-parallel: variables replicated, batch and outputs
    sharded over the batch, so each device's output is its own rows (a replicated output
    would hold the whole batch on every device, growing with the device count; pass
    `out_sharding` for another). Each row's output depends on that row alone: the rows run
    `in_steps` (`rows_per_step`)."""
    batch = NamedSharding(mesh, P("data"))
    return jax.jit(lambda v, x: in_steps(functools.partial(fn, v), x, mesh, rows_per_step),
                   in_shardings=(NamedSharding(mesh, P()), batch),
                   out_shardings=out_sharding or batch)


def fetch_rows(tree: Any) -> Any:
    """The full value of every array of `tree` on this host, as numpy, in global row order.

    A replicated or fully addressable array is read directly; one sharded over other hosts'
    devices (which `jax.device_get` cannot read) is all-gathered (`process_allgather`): every
    process must then call this for the same arrays, in the same order.
    """
    def one(x: jax.Array) -> np.ndarray:
        if x.is_fully_replicated or x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
