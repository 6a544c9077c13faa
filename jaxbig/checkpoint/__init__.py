"""Checkpoints with orbax-checkpoint's CheckpointManager: train state and data-iterator state, async, verified.

Layout of `<run_dir>/checkpoints/<step>/`:
  state/            the TrainState (params, optimizer state, step), orbax StandardSave, sharded
  data/             the grain iterator's state, one JSON per process (grain's orbax handler)
  checksums.json    XXH3-128 digest of every file above, written once orbax has committed the step

orbax writes each step under a temporary name and renames it when complete (atomic commit), so
a killed run never leaves a half checkpoint that looks complete. `checksums.json` adds what
orbax does not check: a file truncated or overwritten later. A checkpoint that fails its
checksums or its restore is moved to `<run_dir>/corrupted_checkpoints/` (never deleted) and
the previous one is used.

Modules: `manager` (the orbax manager, save, restore; retention: the last `keep` steps plus the
best by eval loss), `integrity` (the checksums), `checkpoints` (the loop's `Checkpoints`:
resume from the newest readable step), `run` (a run directory's config and params, without the
loop).
"""

from jaxbig.checkpoint.checkpoints import Checkpoints
from jaxbig.checkpoint.integrity import CHECKSUMS, verify, write_checksums
from jaxbig.checkpoint.manager import CheckpointError, checkpoint_manager, restore, restore_params, save, stored_tree
from jaxbig.checkpoint.run import CONFIG_FILE, load_params, load_run_config

__all__ = [
    "CHECKSUMS",
    "CONFIG_FILE",
    "CheckpointError",
    "Checkpoints",
    "checkpoint_manager",
    "load_params",
    "load_run_config",
    "restore",
    "restore_params",
    "save",
    "stored_tree",
    "verify",
    "write_checksums",
]
