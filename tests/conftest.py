"""Shared test set-up, before jax is imported anywhere: 8 simulated CPU devices, compiled for
speed of compiling (tests/xla_env.py says how and why).

Compiled programs go to one persistent XLA cache per test session (shared by the xdist workers
and the subprocesses tests start): many tests compile the same tiny programs, and compilation is
most of their time on a 2-core machine. The session's controller removes the cache at the end.
"""

import gc
import os
import shutil
import signal
import tempfile

import pytest

from tests import absl_verbosity, xla_env  # no jax: XLA_FLAGS is set below

os.environ["XLA_FLAGS"] = xla_env.session_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="vqt_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Runs cache the frozen backbone in $VQT_JAX_CACHE/features by default (caching.default_cache_dir):
# one directory per session keeps the tests' caches out of the user's ~/.cache/vqt_jax. Tests
# that need their own set $VQT_JAX_CACHE themselves (monkeypatch).
_OWN_VQT_JAX_CACHE = None
if "VQT_JAX_CACHE" not in os.environ:
    _OWN_VQT_JAX_CACHE = tempfile.mkdtemp(prefix="vqt_jax_test_cache_")
    os.environ["VQT_JAX_CACHE"] = _OWN_VQT_JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    if "PYTEST_XDIST_WORKER" in os.environ:
        # A worker still busy 5 s after the controller ends the session gets a SIGINT from
        # execnet; here that is pytest's final garbage collections (a large JAX heap on a busy
        # machine), where the KeyboardInterrupt lands in jax's gc callback and is reported as
        # a PytestUnraisableExceptionWarning. Collect now, while the controller still waits
        # for this worker, and let execnet's later os._exit end a worker that is still slow.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.collect()
    else:
        for own in (_OWN_CACHE, _OWN_VQT_JAX_CACHE):
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(autouse=True)
def _absl_info():
    """Every test runs at absl's INFO verbosity (what the scripts' `main()` set), restored
    afterwards: the verbosity is process-wide, and tests that read INFO records passed or
    failed by which tests had run before them in their xdist worker."""
    with absl_verbosity.info():
        yield
