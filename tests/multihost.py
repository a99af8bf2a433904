"""Running a function as 2 jax processes (jax.distributed on 127.0.0.1) for the tests.

`run_two(worker, *args)` runs ``worker(process_id, port, *args)`` as process 0 here and as
process 1 in a fork. The fork happens after the caller's imports (tensorflow's, through
vqt_jax.data, is most of a multi-process test's time) and before jax starts any backend, so
both processes are fresh jax runtimes that share the imported modules. Call it from a script
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D devices per process).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from tests import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]


# The coordinator binds its port on every address ("[::]:PORT"). A port from the kernel's
# ephemeral range can be handed to another test's outgoing connection before the coordinator
# binds it; ports are therefore drawn below that range, and a launch whose coordinator still
# cannot bind is retried on another port instead of waiting out its timeout.
_PORTS = (20000, 32000)
_BIND_FAILED = "Failed to add port to server"


def _in_use(family: int, host: str, port: int) -> bool:
    try:
        with socket.socket(family) as s:
            s.bind((host, port))
    except OSError as e:  # a machine without IPv6 answers another errno: not in use
        return e.errno == errno.EADDRINUSE
    return False


def _free_port() -> int:
    """A port below the ephemeral range that nothing holds now, on IPv4 or IPv6."""
    while True:
        port = random.randrange(*_PORTS)
        if not any(_in_use(*address, port) for address in
                   ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::"))):
            return port


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """`cmd`'s completed process, or None when its coordinator could not bind its port (the
    process group is then stopped at once)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=xla_env.env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    bind_failed = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if _BIND_FAILED in line:
                bind_failed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not bind_failed.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)
    running = proc.poll() is None
    # The whole group: process 1 outlives a process 0 that died (as it does when its
    # coordinator cannot bind), and would keep the output open.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    if bind_failed.is_set():
        return None
    if running:
        raise subprocess.TimeoutExpired(cmd, timeout, output="".join(lines))
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines))


def launch(module: str, *args: str, timeout: float,
           attempts: int = 3) -> subprocess.CompletedProcess:
    """Runs ``python -m tests.MODULE PORT ARGS`` (a script that calls `run_two` with that
    port) from the repository root with 2 simulated CPU devices per process; its stdout and
    stderr together, as text. A launch whose coordinator cannot bind its port, before either
    process did any work, is stopped and repeated on another port."""
    for _ in range(attempts):
        cmd = [sys.executable, "-m", f"tests.{module}", str(_free_port()), *args]
        proc = _run(cmd, timeout)
        if proc is not None:
            return proc
    raise AssertionError(f"{attempts} ports in a row could not be bound for {module}")


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
