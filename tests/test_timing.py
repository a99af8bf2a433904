"""vqt_jax.timing: the benchmarks' median of repeated calls."""

import time

import pytest

from vqt_jax import timing


def test_median_seconds_leaves_out_the_first_call_and_takes_the_median():
    sleeps = [0.3, 0.06, 0.01, 0.03]  # the first call (compiling) is the slowest: untimed
    calls = []

    def fn():
        calls.append(None)
        time.sleep(sleeps[len(calls) - 1])

    assert timing.median_seconds(fn, 3) == pytest.approx(0.03, abs=0.015)
    assert len(calls) == 4


def test_median_seconds_waits_for_what_fn_returns():
    """A call is timed until its result is ready, not only dispatched."""
    class Pending:
        def block_until_ready(self):
            time.sleep(0.05)
            return self

    assert timing.median_seconds(Pending, 2) >= 0.05


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
"""


def test_machine_names_the_cpu_and_its_isa():
    info = timing.machine(CPUINFO)
    assert info["cpu_model"] == "AMD EPYC 9B14"
    assert info["isa_flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni",
                                 "avx512_bf16"]
    assert info["cpu_count"] >= 1 and info["jax"]
    # An ARM CPU lists 'Features'; a machine without /proc/cpuinfo still records something.
    arm = timing.machine("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert arm["isa_flags"] == ["asimd", "sve"] and arm["cpu_model"]
    assert timing.machine("")["isa_flags"] == []
    # This machine's own.
    assert isinstance(timing.machine()["cpu_model"], str)
