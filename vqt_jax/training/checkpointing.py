"""orbax checkpointing of the train state: periodic saves, resume from the latest step.

orbax writes each checkpoint to a temporary directory and renames it when complete, so an
interrupted save never leaves a partial checkpoint that a resume would pick up.

Checkpoints live in `checkpoint_dir(workdir)`, local or remote (gs://): orbax reads and writes
through `etils.epath`, and in a multi-host run every host writes and reads its own shards.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from vqt_jax.training import workdir as workdir_lib


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """`workdir/checkpoints`; a local workdir is made absolute first (orbax requires it).

    A remote workdir (gs://bucket/run) is kept as it is: `os.path.abspath` would turn it into
    a local directory under the current one (CWD/gs:/bucket/run).
    """
    if workdir_lib.is_local(workdir):
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / "checkpoints"


def manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the last `keep` checkpoints in `checkpoint_dir`."""
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as checkpoint `step`.

    Raises:
      OSError: ENOSPC naming the checkpoint directory, when the disk is full; the save's
        temporary directories (`*.orbax-checkpoint-tmp*`) are removed first.
    """
    try:
        mngr.save(step, args=ocp.args.StandardSave(state))
    except Exception as e:  # noqa: BLE001 - tensorstore reports a full disk as ValueError
        if not any(s in str(e) for s in ("RESOURCE_EXHAUSTED", "No space left")):
            raise
        for tmp in mngr.directory.glob("*.orbax-checkpoint-tmp*"):
            tmp.rmtree() if tmp.is_dir() else tmp.unlink()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(mngr.directory)) from None


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
    """The latest saved state (with `state`'s structure and shardings), or `state` if none."""
    step = mngr.latest_step()
    if step is None:
        return state
    return mngr.restore(step, args=ocp.args.StandardRestore(state))
