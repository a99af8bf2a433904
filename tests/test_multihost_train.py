"""Multi-host training end to end: 2 processes x 2 CPU devices, killed, resumed, equal to 1.

Each process has its own local cache directory and both share the workdir (a shared file
system, as docs/multihost.md's pod recipe asks). The run trains VQT, then fits the linear
baseline and compression on the trained model's features; a first launch is killed at step 6
(the last checkpoint is step 4), a second resumes it, and its results must equal one
process's uninterrupted run. This module is also the worker script (`python -m
tests.test_multihost_train ...`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tests import multihost, train_utils


class _Kill(Exception):
    pass


def _config(folder: str, cache: str, cache_dir: str):
    c = train_utils.tiny_config(data_dir=folder, epochs=2, cache=cache, cache_dir=cache_dir,
                                baselines=("linear",))
    c.compression.enabled = True
    c.compression.keep_frac = 0.5
    c.compression.epochs = 10
    return c


def _worker(process_id: int, port: int, workdir: str, folder: str, cache_root: str,
            cache: str, kill_at: int) -> None:
    multihost.initialize(process_id, port)
    from vqt_jax.training import train  # noqa: PLC0415

    def kill(step, _):
        if step == kill_at:
            raise _Kill()

    config = _config(folder, cache, os.path.join(cache_root, f"host{process_id}"))
    try:
        train.run(config, workdir, callbacks=[kill] if kill_at else [])
    except _Kill:  # as a kill would: nothing after step `kill_at` ran
        os.makedirs(cache_root, exist_ok=True)
        open(os.path.join(cache_root, f"killed{process_id}"), "w").close()


def _launch(tmp_path, folder, cache, kill_at):
    return multihost.launch("test_multihost_train", str(multihost.free_port()),
                            str(tmp_path / "two"), folder, str(tmp_path / "local"), cache,
                            str(kill_at), timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.mark.parametrize("cache", ["on", "off"])
def test_two_hosts_killed_and_resumed_equal_one_host(folder, tmp_path, cache):
    from vqt_jax.training import train  # noqa: PLC0415

    one, _ = train.run(_config(folder, cache, str(tmp_path / "one_cache")),
                       str(tmp_path / "one"))
    killed = _launch(tmp_path, folder, cache, kill_at=6)
    assert killed.returncode == 0, killed.stdout[-5000:]
    assert sorted(os.listdir(tmp_path / "local"))[-2:] == ["killed0", "killed1"]
    assert not (tmp_path / "two" / "results.json").exists()
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4"]
    resumed = _launch(tmp_path, folder, cache, kill_at=0)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["cached"] == one["cached"] == (cache == "on")
    if cache == "on":  # each host built and kept its own copy, in its own directory
        for host in ("host0", "host1"):
            assert len(os.listdir(tmp_path / "local" / host)) == 1, host
    assert two["num_eval_examples"] == one["num_eval_examples"] == 15
    assert two["top1"] == one["top1"]
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
    assert two["baselines"]["linear"]["top1"] == one["baselines"]["linear"]["top1"]
    for key in ("top1", "top1_all", "num_kept"):
        assert two["compression"][key] == pytest.approx(one["compression"][key], rel=1e-4)


if __name__ == "__main__":
    from vqt_jax.training import train  # noqa: F401  (imported once, for both processes)

    port, workdir, folder_arg, cache_root, cache_arg, kill_at_arg = sys.argv[1:7]
    multihost.run_two(_worker, int(port), workdir, folder_arg, cache_root, cache_arg,
                      int(kill_at_arg))
