"""orbax checkpointing of the train state: periodic saves, resume from the latest step.

orbax writes each checkpoint to a temporary directory and renames it when complete, so an
interrupted save never leaves a partial checkpoint that a resume would pick up. Saves are
synchronous: a save that fails (a full disk) fails in `save`, which cleans up and raises one
error, instead of in a later save or at exit from orbax's background threads.

Checkpoints live in `checkpoint_dir(workdir)`, local or remote (gs://): orbax reads and writes
through `etils.epath`, and in a multi-host run every host writes and reads its own shards.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from vqt_jax import workdir as workdir_lib


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """`workdir/checkpoints`; a local workdir is made absolute first (orbax requires it).

    A remote workdir (gs://bucket/run) is kept as it is: `os.path.abspath` would turn it into
    a local directory under the current one (CWD/gs:/bucket/run).
    """
    if workdir_lib.is_local(workdir):
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / "checkpoints"


def _disk_full(text: str) -> bool:
    # tensorstore reports a full disk as RESOURCE_EXHAUSTED (a ValueError), Python as ENOSPC.
    return "RESOURCE_EXHAUSTED" in text or os.strerror(errno.ENOSPC) in text


class _OrbaxDiskFull(logging.Filter):
    """Drops orbax's own error records (with tracebacks, one per writer thread) about a full
    disk: `save` raises that error itself, once, naming the checkpoint directory."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (_disk_full(record.getMessage()) or (exc is not None and _disk_full(str(exc))))


_FILTER = _OrbaxDiskFull()


def manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the last `keep` checkpoints in `checkpoint_dir`."""
    absl_logging.get_absl_logger().addFilter(_FILTER)  # once: the same filter object
    directory = checkpoint_dir(workdir)
    with workdir_lib.remote_errors(directory, "create"):
        return ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False))


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as checkpoint `step`.

    Raises:
      OSError: ENOSPC naming the checkpoint directory, when the disk is full; the save's
        temporary directories (`*.orbax-checkpoint-tmp*`) are removed first.
      WorkdirError: a remote directory's failure, naming it.
    """
    try:
        with workdir_lib.remote_errors(mngr.directory, "write"):
            mngr.save(step, args=ocp.args.StandardSave(state))
    except Exception as e:  # noqa: BLE001 - tensorstore reports a full disk as ValueError
        if not _disk_full(str(e)):
            raise
        for tmp in mngr.directory.glob("*.orbax-checkpoint-tmp*"):
            tmp.rmtree() if tmp.is_dir() else tmp.unlink()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(mngr.directory)) from None


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
    """The latest saved state (with `state`'s structure and shardings), or `state` if none."""
    with workdir_lib.remote_errors(mngr.directory, "read"):
        if (step := mngr.latest_step()) is None:
            return state
        return mngr.restore(step, args=ocp.args.StandardRestore(state))
