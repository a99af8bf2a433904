"""What the hosts of a multi-host run (`jax.distributed`) agree on, and who writes.

Every host runs the same program over a shared workdir. Files that describe the whole run
(results, selections, markers) are written by the chief (process 0) alone; a host that then
decides something from those files waits at a `barrier` first, so that every host reads the
same state and takes the same branch (a host that took another branch would wait forever in
the next collective). With one process each function is free and imports no jax until jax
is in use. Every host reaches gs:// through fsspec (gcsfs), also where TensorFlow is installed.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# Set to 1 on every host instead of passing --distributed (main.py, vtab_sweep.py).
ENV_DISTRIBUTED = "VQT_DISTRIBUTED"


def wanted() -> bool:
    """Whether $VQT_DISTRIBUTED asks for a multi-host start (the flags' default)."""
    return os.environ.get(ENV_DISTRIBUTED, "") == "1"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts this process as one host of a multi-host run (`jax.distributed.initialize`).

    On Cloud TPU every argument may stay None (JAX finds the coordinator); elsewhere pass
    the coordinator's host:port, the number of processes and this one's index. Call it
    before anything starts a JAX backend.
    """
    import jax  # noqa: PLC0415

    # CPU devices of different processes talk through gloo (no effect on TPU/GPU); it must be
    # set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def count() -> int:
    """The number of processes (1 while jax is not even imported: nothing distributed)."""
    jax = sys.modules.get("jax")
    return 1 if jax is None else jax.process_count()


def is_chief() -> bool:
    """Whether this process writes the run's shared files (process 0)."""
    # With more than one process, jax is imported.
    return count() == 1 or sys.modules["jax"].process_index() == 0


def barrier(name: str) -> None:
    """Waits until every host reaches the barrier `name` (a no-op with one process)."""
    if count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def all_agree(flag: bool) -> bool:
    """Whether `flag` holds on every host (a collective: every host must call it): decisions
    that choose what every host compiles (cache or not, build or reuse) must be the same."""
    if count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def process_alive(pid: int) -> bool:
    """Whether process `pid` on this host is running (True where that cannot be told, e.g.
    another user's process), for removing what dead processes left behind."""
    try:
        os.kill(pid, 0)
    except (OSError, OverflowError) as e:  # EPERM: alive, someone else's; else: do not guess
        return not isinstance(e, ProcessLookupError)
    return True
