"""A run and a prediction leave nothing behind: no file outside the workdir, the caches and the
--output, no temporary file or empty directory anywhere, and start up without library noise.

The commands run as a user runs them, in fresh interpreters, with $TMPDIR, $HOME and the caches
pointed at directories of their own (empty to begin with), from an empty working directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import train_utils

REPO = Path(__file__).resolve().parent.parent
# Names that only a write in progress gives a file or directory: our `.tmp-PID` files, orbax's
# `*.orbax-checkpoint-tmp-*` directories, `.part` downloads, `tempfile`'s `tmp*` names.
TEMPORARY = re.compile(r"\.tmp|orbax-checkpoint-tmp|\.part$|^tmp")
# Start-up lines of libraries, not of the run (jax's backend probing, absl's C++ logging,
# TensorFlow's oneDNN notice), and log lines in Python's default format instead of absl's.
NOISE = re.compile(r"Unable to initialize backend|absl::InitializeLog|oneDNN|Logging before flag"
                   r"|^(INFO|WARNING|ERROR):", re.M)


def tree(root: Path) -> dict[str, bool]:
    """Every path under `root` (relative) -> whether it is a directory."""
    return {str(p.relative_to(root)): p.is_dir() for p in root.rglob("*")}


def leftovers(root: Path) -> list[str]:
    """Temporary files and empty directories under `root`."""
    return sorted(str(p) for p in root.rglob("*") if TEMPORARY.search(p.name)
                  or (p.is_dir() and not any(p.iterdir())))


def test_a_run_and_a_prediction_leave_only_their_outputs(tmp_path):
    data = Path(train_utils.make_image_folder(tmp_path / "data"))
    dirs = {name: tmp_path / name for name in ("tmp", "home", "cache", "cwd")}
    for d in dirs.values():
        d.mkdir()
    before = tree(tmp_path / "data")
    # The session's XLA cache (conftest.py) stays: it is shared with the other tests' processes.
    env = {**os.environ, "TMPDIR": str(dirs["tmp"]), "HOME": str(dirs["home"]),
           "XDG_CACHE_HOME": str(dirs["home"] / ".cache"), "VQT_JAX_CACHE": str(dirs["cache"])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the commands quiet XLA's start-up themselves
    workdir = tmp_path / "wd"
    commands = [
        [REPO / "main.py", f"--config={REPO / 'tests' / 'tiny_config.py'}:{data}",
         f"--workdir={workdir}", "--config.epochs=1", "--config.checkpoint_every_steps=1",
         "--config.cache=on"],
        [REPO / "predict.py", f"--model={workdir / 'model.vqt'}",
         f"--output={workdir / 'predictions.csv'}", str(data / "test")],
    ]
    for command in commands:
        proc = subprocess.run([sys.executable, *map(str, command)], cwd=dirs["cwd"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not NOISE.search(proc.stderr), proc.stderr[:3000]
    assert (workdir / "results.json").exists() and (workdir / "predictions.csv").exists()
    assert tree(dirs["tmp"]) == tree(dirs["home"]) == tree(dirs["cwd"]) == {}
    assert tree(tmp_path / "data") == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "cwd", "data", "home", "tmp", "wd"]
    assert os.listdir(dirs["cache"] / "features"), "the run's cache is where it was pointed"
    assert leftovers(workdir) + leftovers(dirs["cache"]) == []


def test_an_unprepared_tfds_dataset_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """TFDS makes a `tmp*tfds` directory when it looks for an unprepared dataset's metadata;
    the refusal leaves none behind."""
    from vqt_jax.data import pipeline  # noqa: PLC0415

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(pipeline.DatasetNotPreparedError):
        pipeline.validate("dtd", str(tmp_path / "tfds"), "val")
    assert os.listdir(temp) == []
