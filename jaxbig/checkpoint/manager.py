"""orbax-checkpoint's CheckpointManager over `<run_dir>/checkpoints/<step>/`: save, restore, read metadata.

Retention: the last `keep` steps plus the best by eval loss (orbax preservation policies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
# Not exported by orbax 0.12: the store its default jax.Array handler is built with, and the registry whose `add` can
# replace that handler without logging a warning (`register_type_handler` warns on every override).
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization.type_handler_registry import GLOBAL_TYPE_HANDLER_REGISTRY
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

STATE, DATA = "state", "data"
LEGACY_STATE = "default"
METRIC = "eval_loss"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be read; the message says what to do."""


_replica_parallel: bool | None = None  # what this process registered (None: orbax's default handler)


def _array_handler_for_this_job() -> None:
    """Registers orbax's `jax.Array` handler with replica-parallel saving only where it can pay off: several processes.

    orbax (0.12) splits every replicated array's shard across its replicas (`use_replica_parallel`, on by default
    except on GPU) so that each host writes a part. In one process that is all cost: each part is a separate eager
    `slice` dispatched on the training thread before the save returns. On `small` on the 4x2 mesh of 8 emulated CPU
    devices it held the loop 0.22-0.28 s per save against 0.07-0.11 s without (docs/benchmarks.md, `bench:data`).
    The files are the same either way (one OCDBT array per leaf), so either kind of checkpoint restores with either.
    Registered per manager, after `jax.distributed` has set the process count; otherwise the handler orbax registers
    by default (with its array metadata store).
    """
    global _replica_parallel
    if _replica_parallel == (wanted := jax.process_count() > 1):
        return
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=wanted, array_metadata_store=array_metadata_store.Store())
    GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True, ignore_warnings=True)
    _replica_parallel = wanted


def checkpoint_manager(
    run_dir: str | Path, keep: int, *, read_only: bool = False, on_commit: Callable[[], None] | None = None, track_best: bool = True
) -> ocp.CheckpointManager:
    """Manager over `<run_dir>/checkpoints/<step>/`; saves are asynchronous and committed atomically.

    Keeps the last `keep` steps plus the one with the lowest eval loss. `read_only` opens an
    existing directory for restoring; it never creates, saves or deletes (it is not orbax's
    `read_only` option, which logs a warning on every open). `track_best=False` keeps the last `keep`
    steps only and saves synchronously (no eval loss to rank by).
    """
    directory = Path(run_dir).resolve() / "checkpoints"
    _array_handler_for_this_job()
    if read_only:
        options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    elif not track_best:  # a one-off write (an imported model): no eval loss to rank by
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    else:
        keep_policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m[METRIC], reverse=True, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_policy,
            best_fn=lambda m: m[METRIC],
            best_mode="min",
            create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=on_commit),
        )
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, eval_loss: float | None = None) -> None:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        import grain  # only with a data iterator: reading a run's params (export, sampling) needs no grain

        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if eval_loss is None else {METRIC: float(eval_loss)}
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding).

    With `data_iterator`, also sets that grain iterator to the saved position.
    """
    if _state_item(manager, step) == LEGACY_STATE:  # a single unnamed item: read it with a manager of its own
        legacy = ocp.CheckpointManager(manager.directory, options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))
        try:
            return legacy.restore(step, args=ocp.args.StandardRestore(abstract_state))
        finally:
            legacy.close()
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        import grain  # only with a data iterator: reading a run's params (export, sampling) needs no grain

        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE]


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params):
    """Only the params of the saved train state, onto the shardings `abstract_params` carries; the
    optimizer state is never read (orbax's partial restore)."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)
    legacy = _state_item(manager, step) == LEGACY_STATE
    # A manager of its own: orbax binds one handler per item and manager, and `restore` reads the
    # state item with the standard one.
    reader = ocp.CheckpointManager(manager.directory, options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))
    try:
        if legacy:
            return reader.restore(step, args=args)["params"]
        return reader.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"]
    finally:
        reader.close()


def _state_item(manager: ocp.CheckpointManager, step: int) -> str:
    """`state`; checkpoints written before the data iterator was saved hold the train state as orbax's `default` item."""
    return STATE if (Path(manager.directory) / str(step) / STATE).is_dir() else LEGACY_STATE


def stored_tree(manager: ocp.CheckpointManager, step: int):
    """The saved train state's metadata tree (shapes and dtypes), read without loading arrays."""
    return ocp.StandardCheckpointHandler().metadata(Path(manager.directory) / str(step) / _state_item(manager, step)).tree


__all__ = ["DATA", "METRIC", "STATE", "CheckpointError", "checkpoint_manager", "restore", "restore_params", "save", "stored_tree"]
