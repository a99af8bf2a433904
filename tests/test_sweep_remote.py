"""A sweep on a gs:// workdir writes there and nowhere else, and resumes from there on every host.

The bucket is fake (`tests.test_multihost_io.fake_gcs`): epath's backends are redirected to a
local directory and every local-only call on a gs: path raises, so nothing reaches the network.
One writer does not go through epath and is mapped to the same directory by the test, after
checking that it was handed a gs:// path: orbax's checkpoints (TensorStore writes their arrays;
`checkpointing.checkpoint_dir` of a gs:// workdir must be gs://..., and its files then go to
the fake bucket's directory); TensorBoard's event files go through epath (`metrics_io`). The
backbone cache stays on each host's own disk (`cache_dir`), as a memory-mapped cache must.

Every test runs in an empty current directory and checks that it stays empty: a gs:// path
joined with pathlib ('gs:/bucket/...') would land there. The real trainer's sweep on a bucket,
2 processes x 2 CPU devices, killed and resumed, is tests/test_stacked.py's two-host test.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import ml_collections
import pytest
from etils import epath

from tests.test_multihost_io import fake_gcs
from vqt_jax import sweep as sweep_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import checkpointing, stacked

SWEEP = "gs://bucket/sweep"
TASK_GROUPS = {"folder": sweep_lib.FOLDER_GROUP}


@contextlib.contextmanager
def remote(root: str | os.PathLike) -> Iterator[None]:
    """The fake bucket under ROOT, with orbax's checkpoints mapped into it."""
    with fake_gcs(root) as local:
        checkpoint_dir = checkpointing.checkpoint_dir

        def mapped_checkpoint_dir(workdir):
            path = checkpoint_dir(workdir)
            assert str(path).startswith("gs://bucket/"), f"checkpoints outside the bucket: {path}"
            return epath.Path(local(path))

        with mock.patch.object(checkpointing, "checkpoint_dir", mapped_checkpoint_dir):
            epath.Path("gs://bucket").mkdir(parents=True, exist_ok=True)
            yield


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --- the sweep's own files, with a fake trainer ------------------------------------------------


def _standin(task: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "task": task, "method": "vqt", "split": "test", "lr": 0.1, "wd": 0.0, "seed": 0,
        "batch_size": 8, "data_dir": None, "image_size": 32, "protocol": "release",
        "normalization": "imagenet"})


def test_sweep_files_land_in_the_bucket_and_a_rerun_reads_them(tmp_path, monkeypatch):
    """Every file the sweep and its runs write lands in the bucket, each run is handed its
    gs:// directory, and a re-run trains nothing: it reads every result back from there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    calls: list[str] = []

    grid = sweep_lib.grid_for("vqt").points(8)
    top_lr = max(lr for lr, _ in grid)

    def train_fn(config: ml_collections.ConfigDict, workdir: str) -> Mapping[str, Any]:
        calls.append(workdir)
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # as the trainer does
        workdir_lib.record(workdir, config, None, 0)
        if config.split == "val" and config.lr == top_lr:  # the top of the grid diverges
            raise FloatingPointError("loss is nan")
        results = {"top1": 0.5 + config.lr, "config": workdir_lib.as_dict(config)}
        workdir_lib.write_results(workdir, results)
        return results

    bucket = tmp_path / "gcs" / "bucket" / "sweep"
    with remote(tmp_path / "gcs"):
        first = sweep_lib.run_sweep(["folder"], SWEEP, base_config_fn=_standin, num_seeds=2,
                                   task_groups=TASK_GROUPS, train_fn=train_fn)
        assert len(calls) == len(grid) + 2
        assert all(c.startswith(f"{SWEEP}/folder/") for c in calls), calls
        diverged = [(lr, wd) for lr, wd in grid if lr == top_lr]
        expected = ["folder/selection.json", "folder/sweep.json", "results.csv", "results.md"]
        for lr, wd in grid:
            run_dir = f"folder/val/lr={lr!r},wd={wd!r}/"
            outcome = sweep_lib.FAILED_MARKER if (lr, wd) in diverged else "results.json"
            expected += [run_dir + "config.json", run_dir + outcome]
        expected += [f"folder/test/seed={s}/{name}" for s in range(2)
                     for name in ("config.json", "results.json")]
        assert files_under(bucket) == sorted(expected)
        selection = json.loads((bucket / "folder" / "selection.json").read_text())
        assert selection["lr"] == max(lr for lr, _ in grid if lr != top_lr)
        calls.clear()
        lines: list[str] = []
        again = sweep_lib.run_sweep(["folder"], SWEEP, base_config_fn=_standin, num_seeds=2,
                                   task_groups=TASK_GROUPS, train_fn=train_fn, log=lines.append)
        assert calls == [] and again == first
        runs = len(grid) + 2
        assert f"{runs} runs, {runs} finished earlier, 0 to train" in lines[0], lines[0]
        # A diverged run's protocol line comes from its config.json, in the bucket.
        line = sweep_lib.run_protocol(sweep_lib.val_run_dir(SWEEP, "folder", *diverged[0]))
        assert line.startswith("protocol release: 32 px"), line
    assert not os.listdir(cwd)


def test_a_gs_url_that_lost_a_slash_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mangled in ("gs:/bucket/sweep", os.path.abspath("gs:/bucket/sweep")):
        with pytest.raises(ValueError, match=f"{mangled}: a remote URL that lost a slash"):
            sweep_lib.run_sweep(["folder"], mangled, base_config_fn=_standin,
                               task_groups=TASK_GROUPS, train_fn=lambda c, w: {})
    with pytest.raises(ValueError, match="Config file gs://b/c.py: .* must be a local file"):
        sweep_lib.load_config_fn("gs://b/c.py")
    assert not os.listdir(tmp_path)


def test_a_stage_directory_of_a_bucket_stays_in_the_bucket():
    member = stacked.Member(ml_collections.ConfigDict({"lr": 0.1, "wd": 0.0, "seed": 0}),
                            "gs://b/s/task/val/lr=0.1,wd=0.0")
    assert stacked.stage_dir([member]).startswith("gs://b/s/task/val/" + stacked.STAGE_PREFIX)
