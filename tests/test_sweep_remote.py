"""A sweep on a gs:// workdir writes there and nowhere else, and resumes from there on every host.

The bucket is fake (`tests.test_multihost_io.fake_gcs`): epath's backends are redirected to a
local directory and every local-only call on a gs: path raises, so nothing reaches the network.
One writer does not go through epath and is mapped to the same directory by the test, after
checking that it was handed a gs:// path: orbax's checkpoints (TensorStore writes their arrays;
`checkpointing.checkpoint_dir` of a gs:// workdir must be gs://..., and its files then go to
the fake bucket's directory); TensorBoard's event files go through epath (`metrics_io`). The
backbone cache stays on each host's own disk (`cache_dir`), as a memory-mapped cache must.

Every test runs in an empty current directory and checks that it stays empty: a gs:// path
joined with pathlib ('gs:/bucket/...') would land there. The two-process test runs this module
as a script (`python -m tests.test_sweep_remote ...`), 2 processes x 2 CPU devices.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import ml_collections
import pytest
from etils import epath

from tests import multihost, train_utils
from tests.test_multihost_io import fake_gcs
from vqt_jax import export, resolve
from vqt_jax import sweep as sweep_lib
from vqt_jax.training import checkpointing, stacked
from vqt_jax.training import workdir as workdir_lib

SWEEP, REFERENCE = "gs://bucket/sweep", "gs://bucket/reference"
TASK_GROUPS = {"folder": sweep_lib.FOLDER_GROUP}
# The test stage's run is stopped right after its checkpoint of this step is written.
KILL_STEP = 4


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


# --- 2 processes x 2 CPU devices, the real trainer: killed, resumed, equal to uninterrupted --


class _Killed(Exception):
    """Raised on every host right after the same checkpoint, as a kill of both would leave
    them (the checkpoint complete, nothing after it)."""


def base_config(data: str) -> ml_collections.ConfigDict:
    c = train_utils.tiny_config(data_dir=data, batching="epoch", epochs=2, warmup_epochs=1)
    c.task, c.method = "folder", "vqt"
    c = resolve.resolve(c)
    c.batch_size = 8
    return c


def _sweep(process_id: int, port: int, workdir: str, data: str, cache: str, *,
           start: bool = True) -> None:
    """One host's `experiments/vtab_sweep.py --distributed` on the tiny task, 1 seed;
    `start=False` for a second sweep in the process (jax.distributed starts once)."""
    from tests.scripts import load_script  # noqa: PLC0415

    distributed = [] if not start else [
        "--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={process_id}"]
    load_script("vtab_sweep").main(
        [*distributed, "--tasks=folder", f"--workdir={workdir}", "--seeds=1",
         "--set", f"cache_dir={cache}"],
        base_config_fn=lambda task: base_config(data), task_groups=TASK_GROUPS)


def _worker(process_id: int, port: int, root: str, data: str, mode: str) -> None:
    """mode 'first': the uninterrupted reference sweep, then the sweep stopped at KILL_STEP of
    its test run; 'resume': that sweep again."""
    cache = os.path.join(root, "local", f"host{process_id}")  # each host's own disk
    save = checkpointing.save
    stop = [False]  # armed for the sweep that is stopped

    def save_then_stop(manager, step, state):
        save(manager, step, state)
        if stop[0] and step == KILL_STEP and "/test/" in str(manager.directory):
            manager.wait_until_finished()
            raise _Killed()

    with remote(os.path.join(root, "gcs")), \
            mock.patch.object(checkpointing, "save", save_then_stop):
        if mode == "resume":
            _sweep(process_id, port, SWEEP, data, cache)
            return
        _sweep(process_id, port, REFERENCE, data, cache)
        stop[0] = True
        try:
            _sweep(process_id, port, SWEEP, data, cache, start=False)
        except _Killed:
            open(os.path.join(root, "local", f"killed{process_id}"), "w").close()


def _launch(root: Path, data: str, mode: str) -> subprocess.CompletedProcess:
    return multihost.launch("test_sweep_remote", str(multihost.free_port()), str(root), data,
                            mode, timeout=600)


def test_a_stage_directory_of_a_bucket_stays_in_the_bucket():
    member = stacked.Member(ml_collections.ConfigDict({"lr": 0.1, "wd": 0.0, "seed": 0}),
                            "gs://b/s/task/val/lr=0.1,wd=0.0")
    assert stacked.stage_dir([member]).startswith("gs://b/s/task/val/" + stacked.STAGE_PREFIX)


def test_two_hosts_sweep_on_a_bucket_killed_and_resumed_equals_uninterrupted(tmp_path):
    """`vtab_sweep.py --distributed` on 2 processes x 2 CPU devices with a gs:// workdir: the
    grid trains as one program, the test run on its own. Both hosts are stopped right after
    the test run's checkpoint of step KILL_STEP; the re-run reads the grid's results from the
    bucket on both hosts, resumes the test run from that checkpoint, and its table, selection
    and results equal those of an uninterrupted sweep. Every file is in the bucket, none in
    the current directory."""
    data = train_utils.make_image_folder(tmp_path / "data")
    gcs, cwd = tmp_path / "gcs", tmp_path / "cwd"
    cwd.mkdir()
    first = _launch(tmp_path, data, "first")
    assert first.returncode == 0, first.stdout[-5000:]
    assert sorted(os.listdir(tmp_path / "local"))[-2:] == ["killed0", "killed1"]
    sweep, reference = gcs / "bucket" / "sweep", gcs / "bucket" / "reference"
    test_run = Path("folder/test/seed=0")
    assert not (sweep / test_run / "results.json").exists()
    assert sorted(os.listdir(sweep / test_run / "checkpoints")) == [str(KILL_STEP)]
    resumed = _launch(tmp_path, data, "resume")
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    grid = sweep_lib.grid_for("vqt").points(8)
    assert f"the grid on val: {len(grid)} runs as one program" in first.stdout
    assert "runs as one program" not in resumed.stdout  # the grid's results were read
    assert resumed.stdout.count("finished earlier, its results.json is read") == len(grid)
    assert f"Resuming from step {KILL_STEP} in {SWEEP}/{test_run}" in resumed.stdout

    assert (sweep / "results.md").read_text() == (reference / "results.md").read_text()
    # Each host built only its devices' rows of the train+val cache, for the grid's program
    # and the test run alike: no complete copy on any host.
    for host in ("host0", "host1"):
        entries = os.listdir(tmp_path / "local" / host)
        assert entries and all("-devices" in e for e in entries), entries
    for name in ("selection.json", "sweep.json"):
        assert (json.loads((sweep / "folder" / name).read_text())
                == json.loads((reference / "folder" / name).read_text())), name
    a, b = (json.loads((d / test_run / "results.json").read_text()) for d in (sweep, reference))
    assert a["top1"] == b["top1"] and a["steps"] == b["steps"]
    for k in ("train_loss", "eval_loss"):
        assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])

    # Every file of the sweep is in the bucket: the run directories whole, checkpoints
    # (mapped) and TensorBoard events included; the two sweeps wrote the same files.
    assert not os.listdir(cwd)
    files = files_under(sweep)
    run_dirs = [str(d).removeprefix(f"{SWEEP}/")
                for d in sweep_lib.task_run_dirs(SWEEP, "folder", sweep_lib.grid_for("vqt"), 8, 1)]
    finished = ["results.json", "evaluation.json", export.EXPORT_FILE]
    for run_dir in run_dirs:
        diverged = f"{run_dir}/{sweep_lib.FAILED_MARKER}" in files
        for name in ["config.json", "metrics.jsonl", *([] if diverged else finished)]:
            assert f"{run_dir}/{name}" in files, (run_dir, name)
    assert any(f.startswith(f"{test_run}/events.out.tfevents") for f in files)
    assert any(f.startswith(f"{test_run}/checkpoints/") for f in files)
    assert any(f.startswith("folder/val/program-") and "/checkpoints/" in f for f in files)
    assert {"results.md", "results.csv", "folder/selection.json", "folder/sweep.json"} <= set(files)
    # The export of a run in the bucket reads back (export.read, through the same fake).
    with remote(gcs):
        exported = export.read(f"{SWEEP}/{test_run}/{export.EXPORT_FILE}")
    assert exported.class_names == ["class0", "class1", "class2"]
    assert exported.meta["results"]["top1"] == a["top1"]


if __name__ == "__main__":
    from vqt_jax.training import train  # noqa: F401  (imported once, for both processes)

    port_arg, root_arg, data_arg, mode_arg = sys.argv[1:5]
    os.chdir(os.path.join(root_arg, "cwd"))  # must stay empty: the test checks it
    multihost.run_two(_worker, int(port_arg), root_arg, data_arg, mode_arg)
