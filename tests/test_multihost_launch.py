"""tests/multihost.launch when the coordinator's port is taken: jax's coordinator cannot bind
it, process 0 dies and process 1 would wait for it until the launch's timeout. The launch
sees the coordinator's bind failure, stops both processes and starts again on another port."""

from __future__ import annotations

import socket
import sys
import time

from tests import multihost


def _worker(process_id: int, port: int) -> None:
    import jax  # noqa: PLC0415

    multihost.initialize(process_id, port)
    assert jax.process_count() == 2
    print(f"process {process_id} of {jax.process_count()}", flush=True)


def test_a_taken_port_is_given_up_and_the_launch_repeated_on_another(monkeypatch):
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port])
        draw = multihost._free_port
        monkeypatch.setattr(multihost, "_free_port", lambda: next(ports, None) or draw())
        start = time.monotonic()
        proc = multihost.launch("test_multihost_launch", timeout=120)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "process 0 of 2" in proc.stdout and "process 1 of 2" in proc.stdout
    assert proc.args[3] != str(taken_port)
    assert time.monotonic() - start < 60


if __name__ == "__main__":
    multihost.run_two(_worker, int(sys.argv[1]))
