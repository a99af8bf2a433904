"""Running a function as 2 jax processes (jax.distributed on 127.0.0.1) for the tests.

`run_two(worker, *args)` runs ``worker(process_id, port, *args)`` as process 0 here and as
process 1 in a fork. The fork happens after the caller's imports (tensorflow's, through
vqt_jax.data, is most of a multi-process test's time) and before jax starts any backend, so
both processes are fresh jax runtimes that share the imported modules. Call it from a script
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D devices per process).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from tests import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``python -m tests.MODULE ARGS`` (a script that calls `run_two`) from the repository
    root with 2 simulated CPU devices per process; its stdout and stderr together, as text."""
    return subprocess.run([sys.executable, "-m", f"tests.{module}", *args], cwd=REPO,
                          env=xla_env.env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def initialize(process_id: int, port: int, num_processes: int = 2) -> None:
    """jax.distributed on localhost, CPU collectives through gloo (before any backend)."""
    from vqt_jax import hosts  # noqa: PLC0415

    hosts.initialize(f"127.0.0.1:{port}", num_processes, process_id)


class Killed(BaseException):
    """Raised on every host right after the same checkpoint, as a kill of all of them would
    leave them (the checkpoint complete, nothing after it). Not an Exception: main.py's error
    handling (`except Exception`) lets it through, as it would a kill."""


@contextlib.contextmanager
def killed_after_checkpoint(step: int | None, where: str = "") -> Iterator[None]:
    """Within it, a checkpoint save of `step` into a directory whose path holds `where`
    completes, then raises `Killed` (None: saves run as they are)."""
    from vqt_jax.training import checkpointing  # noqa: PLC0415

    save = checkpointing.save

    def save_then_stop(manager, at, state):
        save(manager, at, state)
        if at == step and where in str(manager.directory):
            manager.wait_until_finished()
            raise Killed()

    checkpointing.save = save_then_stop
    try:
        yield
    finally:
        checkpointing.save = save


def run_two(worker: Callable[..., Any], port: int, *args: Any) -> int:
    """The exit status of ``worker(process_id, port, *args)`` in 2 processes (0: both ok)."""
    child = os.fork()
    process_id = 1 if child == 0 else 0
    try:
        worker(process_id, port, *args)
        code = 0
    except BaseException:  # noqa: BLE001  (reported, then the status says it failed)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if child == 0:
        os._exit(code)
    _, status = os.waitpid(child, 0)
    code = code or int(os.waitstatus_to_exitcode(status) != 0)
    # Skip jax's exit-time shutdown: it would wait out the coordination service's heartbeat
    # timeout for a process that already left.
    os._exit(code)
