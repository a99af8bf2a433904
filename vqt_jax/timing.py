"""Wall-clock timing of device work, as the benchmarks in experiments/ measure it."""

from __future__ import annotations

import os
import platform
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


# The CPU features that decide XLA:CPU's matmul kernels (vector width, bfloat16 and AMX
# units): figures from two CPUs with different sets are not comparable.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "asimd", "sve")


def machine(cpuinfo: str | None = None) -> dict[str, Any]:
    """What a benchmark's JSON records of the machine it ran on.

    Args:
      cpuinfo: the text of /proc/cpuinfo (read here by default; '' where there is none).

    Returns:
      {'cpu_model', 'isa_flags' (those of `ISA_FLAGS` the CPU has), 'cpu_count', 'jax'};
      nothing that starts a JAX backend, so a parent of timed processes can call it.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    # Reversed, so that a field repeated for every processor keeps its first value.
    fields = {key.strip().lower(): value.strip() for key, sep, value in
              reversed([line.partition(":") for line in cpuinfo.splitlines()]) if sep}
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }
