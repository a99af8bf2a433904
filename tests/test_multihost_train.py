"""Multi-host training end to end: main.py's command line on 2 processes x 2 CPU devices,
killed, resumed, equal to 1 process x 8 devices.

Each process has its own local cache directory and both share the workdir (a shared file
system, as docs/multihost.md's pod recipe asks). The run trains VQT, then fits the linear
baseline and compression on the trained model's features, once from the backbone cache and
once through the backbone (`cache=off`); a first launch stops both hosts right after the
checkpoint of step KILL_STEP, as a kill would leave them, a second resumes, and the results
of both must equal one process's uninterrupted run from the cache. This module is also the
worker script (`python -m tests.test_multihost_train ...`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tests import multihost, train_utils

CACHES = ("on", "off")
KILL_STEP = 4


def _argv(folder: str, workdir: str, cache: str, cache_dir: str) -> list[str]:
    return ["main.py", f"--config=tests/tiny_config.py:{folder}", f"--workdir={workdir}",
            "--config.epochs=2", f"--config.cache={cache}", f"--config.cache_dir={cache_dir}",
            "--config.baselines=('linear',)", "--config.compression.enabled=True",
            "--config.compression.keep_frac=0.5", "--config.compression.epochs=10"]


def _worker(process_id: int, port: int, root: str, folder: str, mode: str) -> None:
    """mode 'first': each run stops right after its checkpoint of step KILL_STEP; 'resume':
    the same commands again. The first command starts jax.distributed (main.py's flags)."""
    from vqt_jax import cli  # noqa: PLC0415

    distributed = ["--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={process_id}"]
    for cache in CACHES:
        argv = _argv(folder, os.path.join(root, f"two_{cache}"), cache,
                     os.path.join(root, "local", cache, f"host{process_id}"))
        try:
            with multihost.killed_after_checkpoint(KILL_STEP if mode == "first" else None):
                assert cli.run([*argv, *distributed]) == 0, cache
        except multihost.Killed:
            open(os.path.join(root, "local", f"killed_{cache}{process_id}"), "w").close()
        distributed = []  # jax.distributed starts once per process


def _launch(root, folder, mode):
    return multihost.launch("test_multihost_train", str(root), folder, mode, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


def test_two_hosts_killed_and_resumed_equal_one_host(folder, tmp_path):
    from vqt_jax import cli  # noqa: PLC0415

    (tmp_path / "local").mkdir()
    killed = _launch(tmp_path, folder, "first")
    assert killed.returncode == 0, killed.stdout[-5000:]
    assert sorted(os.listdir(tmp_path / "local"))[:4] == [
        f"killed_{c}{i}" for c in ("off", "on") for i in (0, 1)]
    for cache in CACHES:
        two = tmp_path / f"two_{cache}"
        assert not (two / "results.json").exists()
        assert sorted(os.listdir(two / "checkpoints")) == [str(KILL_STEP)]
    resumed = _launch(tmp_path, folder, "resume")
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    # One reference for both: a run from the cache ends as one through the backbone does
    # (tests/test_cache.py), so each two-host run must equal the one-host cached run.
    assert cli.run(_argv(folder, str(tmp_path / "one"), "on", str(tmp_path / "one_cache"))) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["cached"]
    for cache in CACHES:
        two = json.loads((tmp_path / f"two_{cache}" / "results.json").read_text())
        assert two["cached"] == (cache == "on"), cache
        if cache == "on":  # each host built and kept its own copy, in its own directory
            for host in ("host0", "host1"):
                assert len(os.listdir(tmp_path / "local" / cache / host)) == 1, host
        assert two["num_eval_examples"] == one["num_eval_examples"] == 15
        assert two["top1"] == one["top1"], cache
        np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-4)
        np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
        assert two["baselines"]["linear"]["top1"] == one["baselines"]["linear"]["top1"]
        for key in ("top1", "top1_all", "num_kept"):
            assert two["compression"][key] == pytest.approx(one["compression"][key], rel=1e-4)


if __name__ == "__main__":
    from vqt_jax import cli  # noqa: F401  (imported once, for both processes)

    port, root_arg, folder_arg, mode_arg = sys.argv[1:5]
    multihost.run_two(_worker, int(port), root_arg, folder_arg, mode_arg)
