"""What a workdir remembers about the run that produced it, and who may use it.

A workdir holds ``config.json``: the whole config of the run, written before training starts.
A later run on the same workdir must have the same config, except for fields that cannot change
its results (`NEUTRAL`: where the data and caches live, logging and checkpoint intervals, the
number of devices); otherwise it stops before writing anything and names every differing field
with both values. One exception: after a run stopped on a non-finite loss (it leaves
``stopped_nonfinite.json``), re-running with a lower ``lr`` and nothing else changed resumes
from the last good checkpoint; the change is recorded in ``config_changes.json`` and
``config.json`` holds the new config.

A workdir is locked while a run uses it (`lock`, through the empty file ``.lock``): a second
run on it stops at once.

Every file of a workdir is read and written through `etils.epath` (`as_path`), so a workdir may
be a local directory or a `gs://` URL (served by fsspec's gcsfs, the `gcs` extra, also
where TensorFlow is installed; a remote failure is one `WorkdirError` naming the path, see
`remote_errors`); a gs:// URL that lost a slash to a pathlib join ('gs:/b/x') is refused,
never taken for a local directory (`is_local`). Locally, JSON files are written atomically
(a temporary file renamed into place); on an object store (GCS), where a rename is a copy then
a delete, they are written directly: an object becomes visible only once its upload
completes, so readers never see a partial file there either. The lock needs a POSIX file
system (a local disk or NFS): a `gs://` workdir is not locked (see `lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from vqt_jax import hosts

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.json"
NONFINITE_FILE = "stopped_nonfinite.json"
RESULTS_FILE = "results.json"
EVALUATION_FILE = "evaluation.json"  # per-class top-1, confusion matrix (train.finish)
LOCK_FILE = ".lock"  # empty; locked while a run uses the workdir (see `lock`)
# Fields that do not change what a run trains or reports.
NEUTRAL = frozenset({
    "data_dir", "cache", "cache_dir", "cache_storage", "cache_max_gb", "cache_dir_max_gb",
    "cache_on_device", "num_devices", "compilation_cache_dir", "program_max_runs",
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
    "prepare", "save_predictions"})


class WorkdirError(ValueError):
    """A workdir that cannot be used for this run (busy, or trained with another config)."""


def as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as config.json stores it."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'num_queries': 1}} -> {'model.num_queries': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def differences(recorded: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple]:
    """{dotted field: (recorded value, new value)} for the fields that matter (not NEUTRAL)."""
    a, b = flatten(as_dict(recorded)), flatten(as_dict(config))
    pairs = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
             if k.split(".")[0] not in NEUTRAL}
    return {k: (x, y) for k, (x, y) in pairs.items() if x != y}


# A URL scheme ("gs://", "s3://", ...): such a path names a remote file system, not a local one.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A URL of a remote file system `etils.epath` serves (gs, s3, az, hf) that lost a slash:
# `pathlib.Path('gs://b') / 'x'` and `os.path.normpath` give 'gs:/b/x', and `os.path.abspath`
# then 'CWD/gs:/b/x'. Taken as local, such a path writes a directory named 'gs:' on each host's
# own disk instead of into the bucket.
_MANGLED = re.compile(r"(^|/)(gs|s3|az|hf):(/|$)")


def as_path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `etils.epath.Path`, the one path type of every workdir and sweep file.

    Joining and taking parents of the result keeps a remote URL whole (`as_path('gs://b') / 'x'`
    is gs://b/x), which `pathlib` and `os.path.normpath` do not.

    Raises:
      ValueError: `p` is a remote URL that lost a slash (see `is_local`); the message names it.
    """
    is_local(p)  # refuses a mangled URL
    return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
    """Whether `p` is on the local file system (it has no URL scheme such as gs://).

    Raises:
      ValueError: `p` holds a remote URL that lost a slash ('gs:/bucket/x', or a local path
        with a 'gs:' directory): neither local nor a URL any backend would write to, it is
        refused rather than written to the current directory.
    """
    text = os.fspath(p)
    if _SCHEME.match(text):
        return False
    if _MANGLED.search(text):
        raise ValueError(f"{text}: a remote URL that lost a slash (a pathlib or os.path join or "
                         "normpath turns gs://b/x into gs:/b/x); it would be written to a local "
                         "directory named after the scheme. Join remote paths with etils.epath "
                         "(vqt_jax.workdir.as_path).")
    return True


def _path(workdir: str | os.PathLike, name: str) -> epath.Path:
    return as_path(workdir) / name


def error_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line: remote file systems raise multi-line, very long errors."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def remote_reason(e: BaseException) -> str:
    """A remote file system's error on one line (`error_line`), saying what to install where
    gcsfs is missing (epath serves gs:// through it)."""
    hint = " (gs:// needs gcsfs: pip install -e '.[gcs]' in the vqt_jax checkout)"
    return error_line(e) + (hint if isinstance(e, ImportError) else "")


@contextlib.contextmanager
def remote_errors(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turns a remote file system's failure on `path` into a `WorkdirError` that names it.

    gcsfs raises its own HttpError, OSErrors without an errno and its paths without the
    scheme, and google-auth's errors; the command line would show them with a traceback, not
    as an ``error:`` line. A local path's errors pass unchanged.
    """
    try:
        yield
    except Exception as e:
        if is_local(path):
            raise
        raise WorkdirError(f"{os.fspath(path)}: cannot {doing} the remote file "
                           f"({remote_reason(e)})") from e


def _exists(path: epath.Path) -> bool:
    with remote_errors(path, "reach"):
        return path.exists()


def read_json(p: str | os.PathLike) -> Any:
    """The JSON value stored at `p` (local or remote)."""
    path = as_path(p)
    with remote_errors(path, "read"):
        text = path.read_text()
    return json.loads(text)


def write_json(p: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Writes JSON to `p` (`write_bytes`: atomically where local).

    Args:
      p: The file, local or remote.
      obj: A JSON value.
      sort_keys: Whether object keys are written sorted (else in their order in `obj`).
    """
    write_bytes(p, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `p`: atomically where local (a temporary file `NAME.tmp-PID` renamed
    into place, removed if the write fails).

    On a remote path it is one plain write: object stores (GCS) publish an object only once its
    upload completes, and have no atomic rename (theirs is a copy then a delete).
    """
    path = as_path(p)
    if not is_local(path):
        with remote_errors(path, "write"):
            path.write_bytes(data)
        return
    remove_stale_temps(path)  # of a write killed before its rename
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Deletes the temporary files `NAME.tmp-PID` beside the local file `path` whose process
    is no longer running (a write killed before its rename)."""
    directory, name = os.path.split(os.fspath(path))
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory or "."):
            pid = entry[len(name) + 5:] if entry.startswith(f"{name}.tmp-") else ""
            if pid.isdigit() and int(pid) > 0 and not hosts.process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, entry))


def _read_if_exists(workdir: str | os.PathLike, name: str, default: Any) -> Any:
    path = _path(workdir, name)
    return read_json(path) if _exists(path) else default


def read_results(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The workdir's results.json (a finished run's metrics), or None if it has none."""
    return _read_if_exists(workdir, RESULTS_FILE, None)


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Writes the workdir's results.json (see `write_json`)."""
    write_json(_path(workdir, RESULTS_FILE), dict(results))


def recorded_config(workdir: str) -> dict[str, Any] | None:
    """The config recorded in `workdir`, or None for a new workdir."""
    path = _path(workdir, CONFIG_FILE)
    if not _exists(path):
        return None
    try:
        if not isinstance(recorded := read_json(path), dict):
            raise ValueError(f"it holds a JSON {type(recorded).__name__}, not an object")
        return recorded
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({e}); it records the config of the run "
                           "in this workdir: restore it or use a new --workdir") from None


def _tuples(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def from_json(recorded: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config recorded as JSON (config.json, an export) as a ConfigDict, JSON's lists turned
    back into tuples: the config files write sequences as tuples (normalization's (mean, std),
    baselines, patch_size), and as tuples they compare and hash like the config's own values
    (a model attribute must be hashable for a jitted forward)."""
    return ml_collections.ConfigDict(_tuples(dict(recorded)))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in `workdir` (for tools that read a finished run).

    Raises:
      FileNotFoundError: the workdir has no config.json (not a vqt_jax run, or one from before
        config.json was written).
    """
    if (recorded := recorded_config(workdir)) is None:
        raise FileNotFoundError(f"{_path(workdir, CONFIG_FILE)} not found: {workdir} is not the "
                                "workdir of a vqt_jax run (pass the run's --config explicitly)")
    return ml_collections.ConfigDict(recorded)


def changes(workdir: str) -> list[dict[str, Any]]:
    """The recorded config changes of the workdir (see the module docstring), oldest first."""
    return _read_if_exists(workdir, CHANGES_FILE, [])


def check(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple] | None:
    """Checks that `config` may run in `workdir`; writes nothing.

    Returns:
      None for a new workdir or an identical config; the allowed change ({'lr': (old, new)})
      when resuming after a non-finite stop with a lower lr.

    Raises:
      WorkdirError: naming every differing field and its two values.
    """
    recorded = recorded_config(workdir)
    if recorded is None or not (diff := differences(recorded, config)):
        return None
    stopped = _exists(_path(workdir, NONFINITE_FILE))
    if stopped and set(diff) == {"lr"}:
        old, new = diff["lr"]
        if isinstance(new, (int, float)) and isinstance(old, (int, float)) and new < old:
            return diff
    listed = "; ".join(f"{k}: {_show(a)} (recorded) vs {_show(b)} (now)"
                       for k, (a, b) in diff.items())
    hint = (" After a non-finite stop, only a lower lr may change." if stopped and "lr" in diff
            else "")
    raise WorkdirError(f"workdir {workdir} holds a run with another config ({listed}). Its "
                       "checkpoints and results belong to the recorded config "
                       f"({_path(workdir, CONFIG_FILE)}): use a new --workdir, or re-run with "
                       f"the recorded values.{hint}")


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def record(workdir: str, config: ml_collections.ConfigDict, change: dict[str, tuple] | None,
           step: int) -> None:
    """Writes config.json (and, for an allowed change, appends it to config_changes.json)."""
    write_json(_path(workdir, CONFIG_FILE), as_dict(config))
    if change:
        write_json(_path(workdir, CHANGES_FILE), [*changes(workdir), {
            "resumed_at_step": step, **{k: {"from": a, "to": b} for k, (a, b) in change.items()}}])
        stop_path = _path(workdir, NONFINITE_FILE)
        if _exists(stop_path):
            with remote_errors(stop_path, "remove"):
                stop_path.unlink()


def record_nonfinite_stop(workdir: str, step: int, lr: float, message: str) -> None:
    """Marks the workdir as stopped on a non-finite loss (allows a lower lr on the re-run)."""
    write_json(_path(workdir, NONFINITE_FILE), {"step": step, "lr": lr, "message": message})


# flock errors that say the file system cannot lock at all (not that someone holds the lock):
# EBADF, an exclusive lock on a descriptor not open for writing (NFS emulates flock with POSIX
# locks); ENOLCK, no lock service (an NFS mount with `nolock`, or lockd not running); EOPNOTSUPP
# and EINVAL, a file system without locks (some FUSE file systems).
_CANNOT_LOCK = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on the workdir for the duration of a run.

    The lock is the kernel's: `flock` on ``WORKDIR/.lock``, an empty file opened for reading
    and writing (on NFS, where flock is emulated with POSIX locks, an exclusive lock needs a
    descriptor open for writing, so a directory, which opens only for reading, cannot be
    locked there). Nothing is ever written to the file, and it is left in place after the
    run: it is harmless, and the next run locks the same file. (Removing it on release would
    let a run that opened it just before lock a file that a third run no longer sees.)

    A lock is never stale: the kernel releases it when its holder's descriptor closes, that is
    when the process ends, however it ends (killed included), so an existing ``.lock`` file
    means nothing by itself. On NFS the server releases the lock of a client host that crashed
    once that client's lease expires or it reboots. There the lock keeps apart runs on other
    hosts only where the mount uses the server's lock service: a mount with ``nolock`` (or
    ``local_lock=all``) locks on each host alone.

    Object stores (gs://) have no locks, so a remote workdir is not locked (a log line says
    so), and keeping two runs off one remote workdir is up to the user.

    Raises:
      WorkdirError: another process holds the lock, or the workdir's file system cannot lock
        (an NFS mount without a lock service).
      OSError: the lock file cannot be created or opened (a read-only workdir); it names the
        file.
    """
    workdir = os.fspath(workdir)
    if not is_local(workdir):
        logging.warning("workdir %s is not local: it is not locked against another run using "
                        "it at the same time (an object store has no locks)", workdir)
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"workdir {workdir} is in use by another run (it holds the "
                                   "workdir's lock); wait for it to finish or use another "
                                   "--workdir") from None
            if e.errno in _CANNOT_LOCK:
                raise WorkdirError(
                    f"workdir {workdir} cannot be locked: the file system refuses a lock on "
                    f"{path} ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}). A run "
                    "locks its workdir to keep a second run off it; use a workdir on a file "
                    "system with locks (a local disk, or NFS with its lock service, not "
                    "mounted with nolock)") from None
            raise OSError(e.errno, e.strerror, path) from None  # name the file
        yield
    finally:
        os.close(fd)
