"""The training loop's checkpoints: async saves that say what survives a failure, and resuming from
the newest readable step (a damaged one is moved aside, never deleted)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxbig.checkpoint.integrity import CHECKSUMS, verify, write_checksums
from jaxbig.checkpoint.manager import CheckpointError, checkpoint_manager, restore, save


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
            from jax.experimental import multihost_utils  # multi-process runs only

            multihost_utils.sync_global_devices(f"jaxbig-quarantine-{step}")
        self.manager.reload()
        self.say(f"checkpoint at step {step} is unusable ({problem}); moved it to {dest} and falling back to the previous one")


__all__ = ["Checkpoints"]
