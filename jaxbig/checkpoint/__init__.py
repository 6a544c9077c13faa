"""Checkpoints with orbax-checkpoint's CheckpointManager: the train state, saved async, restored sharded."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp


def checkpoint_manager(run_dir: str | Path, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager over `<run_dir>/checkpoints/<step>/`; saves are asynchronous and committed atomically.

    `read_only` opens an existing directory for restoring; it never creates, saves or deletes
    (it is not orbax's `read_only` option, which logs a warning on every open).
    """
    directory = Path(run_dir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        enable_async_checkpointing=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding)."""
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
