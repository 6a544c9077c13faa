"""Checkpoints with orbax-checkpoint's CheckpointManager: train state and data-iterator state, async, verified.

Layout of `<run_dir>/checkpoints/<step>/`:
  state/            the TrainState (params, optimizer state, step), orbax StandardSave, sharded
  data/             the grain iterator's state, one JSON per process (grain's orbax handler)
  checksums.json    sha256 of every file above, written once orbax has committed the step

orbax writes each step under a temporary name and renames it when complete (atomic commit), so
a killed run never leaves a half checkpoint that looks complete. `checksums.json` adds what
orbax does not check: a file truncated or overwritten later. A checkpoint that fails its
checksums or its restore is moved to `<run_dir>/corrupted_checkpoints/` (never deleted) and
the previous one is used.

Retention: the last `keep` steps plus the best by eval loss (orbax preservation policies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

CHECKSUMS = "checksums.json"
STATE, DATA = "state", "data"
LEGACY_STATE = "default"
METRIC = "eval_loss"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be read; the message says what to do."""


def checkpoint_manager(run_dir: str | Path, keep: int, *, read_only: bool = False, on_commit: Callable[[], None] | None = None) -> ocp.CheckpointManager:
    """Manager over `<run_dir>/checkpoints/<step>/`; saves are asynchronous and committed atomically.

    Keeps the last `keep` steps plus the one with the lowest eval loss. `read_only` opens an
    existing directory for restoring; it never creates, saves or deletes (it is not orbax's
    `read_only` option, which logs a warning on every open).
    """
    directory = Path(run_dir).resolve() / "checkpoints"
    if read_only:
        options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
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
        import grain

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
        import grain

        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE]


def _state_item(manager: ocp.CheckpointManager, step: int) -> str:
    """`state`; checkpoints written before the data iterator was saved hold the train state as orbax's `default` item."""
    return STATE if (Path(manager.directory) / str(step) / STATE).is_dir() else LEGACY_STATE


def stored_tree(manager: ocp.CheckpointManager, step: int):
    """The saved train state's metadata tree (shapes and dtypes), read without loading arrays."""
    return ocp.StandardCheckpointHandler().metadata(Path(manager.directory) / str(step) / _state_item(manager, step)).tree


# --- integrity ------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """Records size and sha256 of every file of a committed step (atomically: tmp file, rename)."""
    sums = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in _files(step_dir)}
    tmp = step_dir / f"{CHECKSUMS}.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.write_text(json.dumps(sums, indent=1))
    tmp.replace(step_dir / CHECKSUMS)


def verify(step_dir: Path) -> str | None:
    """None when every file matches `checksums.json` (or the step has none yet), else what is wrong."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return None  # committed by orbax, killed before its checksums were written: the restore decides
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} unreadable ({e})"
    for rel, want in sums.items():
        f = step_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        if _digest(f) != want["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


# --- the training loop's checkpoints --------------------------------------------------------------


class Checkpoints:
    """Saves and restores the loop's checkpoints; turns I/O failures into `CheckpointError`s that say what survives."""

    def __init__(self, run_dir: str | Path, keep: int, *, is_main: bool = True, say: Callable[[str], None] = print):
        self.run_dir = Path(run_dir).resolve()
        self.is_main, self.say = is_main, say
        self.manager = checkpoint_manager(self.run_dir, keep, on_commit=self._checksum_new_steps if is_main else None)
        self.blocked_s: list[float] = []  # how long each save held the loop (device-to-host copy, not the write)
        self._writing: int | None = None  # the step of the newest save started

    @property
    def directory(self) -> Path:
        return Path(self.manager.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def _checksum_new_steps(self) -> None:
        # Runs in orbax's background thread after each commit.
        for step in self.manager.all_steps():
            step_dir = self.directory / str(step)
            if step_dir.is_dir() and not (step_dir / CHECKSUMS).exists():
                try:
                    write_checksums(step_dir)
                except OSError as e:  # the checkpoint itself is complete; only the extra check is lost
                    logging.warning("could not write %s for %s: %s", CHECKSUMS, step_dir, e)

    def _failed(self, e: BaseException) -> CheckpointError:
        step = self._writing
        try:  # stop orbax's background writers now, not at interpreter exit
            self.manager.close()
        except Exception:  # noqa: BLE001 - the same failure again; the first one is being reported
            pass
        self.manager.reload()
        good = [s for s in self.manager.all_steps() if s != step]
        detail = str(e) if len(str(e)) < 400 else f"{str(e)[:120]} ... {str(e)[-240:]}"
        return CheckpointError(
            f"saving the checkpoint at step {step} to {self.directory} failed: {type(e).__name__}: {detail}. "
            f"Earlier checkpoints are untouched (latest complete: {f'step {max(good)}' if good else 'none'}); "
            "free disk space or point --run_dir at a writable disk, then re-run the same command to resume"
        )

    def save(self, step: int, state, data_iterator=None, eval_loss: float | None = None) -> None:
        t = time.perf_counter()
        try:
            self.manager.wait_until_finished()  # an earlier async write that failed surfaces here
            self._writing = step
            save(self.manager, step, state, data_iterator, eval_loss)
        except Exception as e:
            raise self._failed(e) from e
        self.blocked_s.append(time.perf_counter() - t)

    def wait(self) -> None:
        """Until every save is committed and checksummed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        if self.is_main:  # the commit callback may still be running for the last step: checksum it here too
            self._checksum_new_steps()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[int, Any]:
        """(step, state) of the newest readable checkpoint, or (0, None) when there is none.

        A checkpoint that fails verification or restore is reported, moved aside, and the
        previous one tried.
        """
        moved = 0
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            problem = verify(step_dir)
            if problem is None:
                try:
                    return step, restore(self.manager, step, abstract_state, data_iterator)
                except Exception as e:  # orbax/tensorstore raise many types for a damaged file
                    if (step_dir / CHECKSUMS).is_file():  # intact files: the run, not the checkpoint, differs
                        raise CheckpointError(
                            f"the checkpoint at step {step} in {self.directory} is intact but does not fit this run "
                            f"({type(e).__name__}: {str(e)[:300]}); restore it with the config it was saved with "
                            "(config.yaml in the run_dir), or pass --fresh to start over"
                        ) from e
                    problem = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
            self._quarantine(step, problem)
            moved += 1
        if moved:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}; the damaged ones are in {self.run_dir / 'corrupted_checkpoints'}. "
                "Re-running the same command starts over from step 0"
            )
        return 0, None

    def _quarantine(self, step: int, problem: str) -> None:
        dest = self.run_dir / "corrupted_checkpoints" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if self.is_main:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxbig-quarantine-{step}")
        self.manager.reload()
        self.say(f"checkpoint at step {step} is unusable ({problem}); moved it to {dest} and falling back to the previous one")
