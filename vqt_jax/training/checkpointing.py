"""orbax checkpointing of the train state: periodic saves, resume from the latest step.

orbax writes each checkpoint to a temporary directory and renames it when complete, so an
interrupted save never leaves a partial checkpoint that a resume would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
    """The latest saved state (with `state`'s structure and shardings), or `state` if none."""
    step = mngr.latest_step()
    if step is None:
        return state
    return mngr.restore(step, args=ocp.args.StandardRestore(state))
