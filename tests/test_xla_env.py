"""The test session's XLA flags reach the session and the processes tests start."""

import os

from tests import xla_env


def test_session_flags_add_what_is_missing_and_keep_what_is_set():
    assert xla_env.session_flags("") == ("--xla_force_host_platform_device_count=8 "
                                         "--xla_backend_optimization_level=0 "
                                         "--xla_cpu_use_fusion_emitters=false")
    assert xla_env.session_flags("--xla_backend_optimization_level=2 --xla_dump_to=/d") == (
        "--xla_backend_optimization_level=2 --xla_dump_to=/d "
        "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false")


def test_the_session_sets_its_flags_and_children_keep_them(monkeypatch):
    # conftest.py applied them (a level the caller set stays the caller's).
    assert xla_env.session_flags(os.environ["XLA_FLAGS"]) == os.environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                    "--xla_backend_optimization_level=0")
    assert xla_env.env(2)["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 "
                                           "--xla_force_host_platform_device_count=2")
    assert xla_env.env(None)["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
