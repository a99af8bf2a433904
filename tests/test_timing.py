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
