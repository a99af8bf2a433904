"""Wall-clock timing of device work, as the benchmarks in experiments/ measure it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one untimed call (it compiles).

    Each call waits for what `fn` returns (`jax.block_until_ready`): JAX dispatches
    asynchronously, so without the wait a call would time only its dispatch.
    """
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)
