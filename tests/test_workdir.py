"""A workdir says what it holds: config.json, the config guard, the lock, non-finite stops."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import train_utils, xla_env
from vqt_jax import cli, resolve
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import checkpointing, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("data"))


def snapshot(directory) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: relative path -> (size, mtime_ns).

    An empty workdir lock file (`workdir.LOCK_FILE`) is left out: locking a workdir creates it
    and never writes to it, so a run that stops at once may leave one where there was none.
    """
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            st = os.stat(path)
            if name == workdir_lib.LOCK_FILE and st.st_size == 0:
                continue
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished tiny run: (config, workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    config = train_utils.tiny_config(data_dir=folder, epochs=2)
    results, _ = train.run(config, workdir)
    return config, workdir, results


def test_workdir_records_the_whole_config(finished):
    config, workdir, results = finished
    recorded = json.loads(open(os.path.join(workdir, "config.json")).read())
    # The whole config as trained: with the method's release recipe filled in.
    assert recorded == workdir_lib.as_dict(resolve.resolve(config))
    assert recorded["optimizer"] == "adam"
    assert results["config"] == recorded
    assert results["config"]["model"]["num_queries"] == config.model.num_queries
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    hparams = next(r["hparams"] for r in rows if "hparams" in r)
    assert hparams["model.num_queries"] == config.model.num_queries
    assert hparams["compression.keep_frac"] == config.compression.keep_frac
    assert hparams["model.width"] == config.model.width
    assert workdir_lib.load_config(workdir).to_dict() == recorded


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(lr=0.5, wd=0.0), [r"lr: 0\.05 \(recorded\) vs 0\.5 \(now\)",
                                r"wd: 0\.001 \(recorded\) vs 0\.0 \(now\)"]),
        (dict(epochs=3), [r"epochs: 2 \(recorded\) vs 3 \(now\)"]),
        (dict(model={"num_queries": 3}), [r"model\.num_queries: 2 \(recorded\) vs 3 \(now\)"]),
    ],
    ids=["lr and wd", "epochs", "num_queries"],
)
def test_a_changed_config_stops_before_writing(finished, overrides, named):
    config, workdir, _ = finished
    changed = config.copy_and_resolve_references()
    for k, v in overrides.items():
        if isinstance(v, dict):
            changed[k].update(v)
        else:
            changed[k] = v
    before = snapshot(workdir)
    with pytest.raises(workdir_lib.WorkdirError) as e:
        train.run(changed, workdir)
    for pattern in named:
        assert re.search(pattern, str(e.value)), str(e.value)
    assert snapshot(workdir) == before  # not one byte written, results.json untouched


def test_neutral_fields_may_change(finished):
    config, workdir, results = finished
    changed = config.copy_and_resolve_references()
    changed.log_every_steps = 1
    changed.checkpoint_every_steps = 7
    changed.eval_batch_size = 16
    again, _ = train.run(changed, workdir)
    # Another eval batch gives each device another number of examples, so XLA:CPU picks
    # other kernels: the per-example losses agree to float32 rounding, not bit for bit.
    assert again["top1"] == results["top1"] and again["eval_loss"] == pytest.approx(
        results["eval_loss"], rel=1e-5)


def test_a_busy_workdir_stops_at_once(folder, tmp_path, capsys):
    """Two runs on one workdir: the second says so at once; the first finishes unharmed."""
    workdir = tmp_path / "wd"
    env = xla_env.env(8)
    first = subprocess.Popen(
        [sys.executable, "main.py", f"--config=tests/tiny_config.py:{folder}",
         f"--workdir={workdir}", "--config.epochs=8"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (workdir / "config.json").exists():
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        start = time.time()
        code = cli.run(["main.py", f"--config=tests/tiny_config.py:{folder}",
                        f"--workdir={workdir}", "--config.epochs=8"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert re.match(rf"error: workdir {re.escape(str(workdir))} is in use by another run",
                        err[0]), err
        assert time.time() - start < 60  # checks only; nothing compiled or trained
    finally:
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["epochs"] == 8 and results["num_eval_examples"] == 15
    assert "_METADATA" not in out and "Traceback" not in out


# Takes the lock of the workdir argv[1], says so, and holds it until its stdin closes.
_HOLDER = """
import sys
from vqt_jax import workdir
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""
# Tries the lock of the workdir argv[1] once; prints "locked" or the error.
_TRY = """
import sys
from vqt_jax import workdir
try:
    with workdir.lock(sys.argv[1]):
        print("locked")
except workdir.WorkdirError as e:
    print(e)
"""


def test_a_held_lock_refuses_another_process_until_its_holder_dies(tmp_path):
    """The lock is between processes, and never stale: it goes when its holder's process does,
    even killed; the lock file it leaves is empty, and locks again."""
    workdir = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        busy = f"workdir {workdir} is in use by another run"
        with pytest.raises(workdir_lib.WorkdirError, match=re.escape(busy)):
            with workdir_lib.lock(workdir):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    lock_file = tmp_path / workdir_lib.LOCK_FILE
    assert lock_file.exists() and lock_file.stat().st_size == 0
    with workdir_lib.lock(workdir):
        tried = subprocess.run([sys.executable, "-c", _TRY, workdir], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
        assert tried.stdout.startswith(busy), tried.stdout + tried.stderr
    tried = subprocess.run([sys.executable, "-c", _TRY, workdir], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert tried.stdout == "locked\n", tried.stdout + tried.stderr
    assert os.listdir(tmp_path) == [workdir_lib.LOCK_FILE]


def _flock_needing_write(real):
    """fcntl.flock as on NFS, where flock is a POSIX lock underneath and an exclusive one needs
    a descriptor open for writing: EBADF for a read-only one."""

    def flock(fd, operation):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, operation)

    return flock


def test_the_lock_works_where_only_a_descriptor_open_for_writing_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _flock_needing_write(fcntl.flock))
    workdir = str(tmp_path)
    with workdir_lib.lock(workdir):
        # Still exclusive: a second open of the lock file (as another run's) is refused.
        with pytest.raises(workdir_lib.WorkdirError, match="is in use by another run"):
            with workdir_lib.lock(workdir):
                pass
    with workdir_lib.lock(workdir):  # released
        pass


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK], ids=["EBADF", "ENOLCK"])
def test_a_file_system_that_cannot_lock_is_one_clear_error(tmp_path, monkeypatch, code):
    def refuses(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuses)
    with pytest.raises(workdir_lib.WorkdirError) as e:
        with workdir_lib.lock(str(tmp_path)):
            pass
    lock_file = re.escape(str(tmp_path / workdir_lib.LOCK_FILE))
    assert re.match(rf"workdir {re.escape(str(tmp_path))} cannot be locked: the file system "
                    rf"refuses a lock on {lock_file} \({errno.errorcode[code]}: ",
                    str(e.value)), str(e.value)
    assert "use a workdir on a file system with locks" in str(e.value)


def test_a_workdir_on_nfs_without_locks_stops_with_one_error_line(folder, tmp_path, capsys,
                                                                  monkeypatch):
    """As main.py says it: one `error:` line, before anything is written but the lock file."""
    def no_lock_service(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_lock_service)
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "wd"
    code = cli.run(["main.py", f"--config=tests/tiny_config.py:{folder}",
                    f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: workdir {workdir} cannot be locked: "), err
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]


def _checkpoints_finite(workdir) -> list[int]:
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    mngr = checkpointing.manager(str(workdir), 10)
    for step in steps:
        restored = mngr.restore(step)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored)), step
    return steps


def test_nonfinite_stop_then_the_printed_command_resumes_and_finishes(folder, tmp_path, capsys,
                                                                     monkeypatch):
    """An absurd lr with a checkpoint every step: the first epoch (lr 0 under the per-epoch
    warm-up) is sound, the second blows up. The error's own command resumes and finishes."""
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "wd"
    # With a zero-initialised head this lr overflows the queries' LayerNorm (NaN) in the
    # second epoch; the release's kaiming head diverges to huge but finite losses instead
    # (config.max_loss covers those, tested in test_bad_input.py).
    argv = ["main.py", f"--config=tests/tiny_config.py:{folder}", f"--workdir={workdir}",
            "--config.lr=1e20", "--config.warmup_epochs=1", "--config.epochs=4",
            "--config.checkpoint_every_steps=1", "--config.model.head_init=zeros"]
    assert cli.run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    m = re.match(r"error: Training loss is nan at step (\d+) \(lr 1e\+20\); stopped\. The last "
                 r"good checkpoint \(step (\d+)\) in .* is intact: re-run with a lower config\.lr"
                 r" to resume from step \2\. For example: (python main\.py .*)$", err[0])
    assert m, err[0]
    bad_step, good_step, command = int(m.group(1)), int(m.group(2)), m.group(3)
    assert good_step < bad_step
    assert _checkpoints_finite(workdir)[-1] == good_step  # nothing unsound was saved
    assert not (workdir / "results.json").exists()

    # Only a lower lr may follow: a higher one, or a lower one with anything else, is refused.
    config = train_utils.tiny_config(data_dir=folder, lr=1e20, warmup_epochs=1, epochs=4,
                                     checkpoint_every_steps=1)
    for overrides, pattern in [(dict(lr=1e21), r"lr: 1e\+20 \(recorded\) vs 1e\+21"),
                               (dict(lr=1e19, wd=0.0), r"wd: 0\.001 \(recorded\) vs 0\.0")]:
        changed = config.copy_and_resolve_references()
        changed.update(overrides)
        with pytest.raises(workdir_lib.WorkdirError, match=pattern):
            train.run(changed, str(workdir))

    # Exactly the printed command.
    assert cli.run(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["lr"] == 1e19 and results["lr"] == 1e19
    assert results["config_changes"] == [
        {"resumed_at_step": good_step, "lr": {"from": 1e20, "to": 1e19}}]
    assert math.isfinite(results["train_loss"])
    assert json.loads((workdir / "config.json").read_text())["lr"] == 1e19
    assert not (workdir / workdir_lib.NONFINITE_FILE).exists()
    # Only that change was allowed: the guard holds again for anything else.
    with pytest.raises(workdir_lib.WorkdirError, match="lr: 1e"):
        train.run(train_utils.tiny_config(data_dir=folder, lr=1e18, warmup_epochs=1, epochs=4),
                  str(workdir))


def test_writes_remove_the_temporary_files_of_dead_processes(tmp_path):
    """A write killed before its rename leaves NAME.tmp-PID; the next write of NAME removes it
    (a live process's is kept: its write may be under way)."""
    import ml_collections

    from vqt_jax import export

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in ("config.json", export.EXPORT_FILE):
        for pid in (dead, os.getppid()):
            (tmp_path / f"{name}.tmp-{pid}").write_text("partial")
    workdir_lib.write_json(tmp_path / "config.json", {"a": 1})
    export.write(str(tmp_path / export.EXPORT_FILE), variables={}, provided=frozenset(),
                 class_names=[], config=ml_collections.ConfigDict(
                     dict(method="vqt", task="folder", init="")))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.json", export.EXPORT_FILE, f"config.json.tmp-{os.getppid()}",
         f"{export.EXPORT_FILE}.tmp-{os.getppid()}"])
