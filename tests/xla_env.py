"""The XLA flags of the test session, and the environment of the processes tests start.

The session (conftest.py) runs on 8 simulated CPU devices and compiles for speed of compiling:
the tests' shapes are tiny, so compiling, not running, is most of the suite's time on a 2-core
machine (docs/development.md gives the suite's time). The LLVM backend runs at optimisation
level 0, and fusions go through XLA's older elemental emitters instead of its MLIR fusion
emitters, which take longer to compile a fusion. Every test passes with and without both (XLA's
own HLO passes all still run). A flag already in XLA_FLAGS wins."""

from __future__ import annotations

import os

DEVICES = "--xla_force_host_platform_device_count"
SESSION_FLAGS = {DEVICES: "8", "--xla_backend_optimization_level": "0",
                 "--xla_cpu_use_fusion_emitters": "false"}


def _without(flags: str, name: str) -> list[str]:
    return [f for f in flags.split() if f.split("=", 1)[0] != name]


def session_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with each of `SESSION_FLAGS` it does not set added."""
    have = {f.split("=", 1)[0] for f in flags.split()}
    return " ".join([*flags.split(), *(f"{k}={v}" for k, v in SESSION_FLAGS.items()
                                       if k not in have)])


def env(devices: int | None) -> dict[str, str]:
    """This process's environment for a child process with `devices` simulated CPU devices
    (None: one, as an accelerator host has), keeping the session's other XLA flags."""
    flags = _without(os.environ.get("XLA_FLAGS", ""), DEVICES)
    if devices is not None:
        flags.append(f"{DEVICES}={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}
