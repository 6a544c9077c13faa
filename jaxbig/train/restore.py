"""Load a trained run from its directory: the resolved config and the params of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax
import optax
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbig import checkpoint
from jaxbig.config import Config, ConfigError, MeshConfig, config_from_dict
from jaxbig.parallel.mesh import make_mesh
from jaxbig.train.loop import CONFIG_FILE
from jaxbig.models import abstract_model
from jaxbig.train.state import Params, abstract_train_state


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a jaxbig run directory (no {CONFIG_FILE}); pass the --run_dir a training run wrote")
    return config_from_dict(yaml.safe_load(path.read_text()))


def load_params(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[Config, nnx.GraphDef, Params, int]:
    """(config, graphdef, params, step) from the run's latest checkpoint, or `step`; params placed on `mesh`."""
    cfg = load_run_config(run_dir)
    manager = checkpoint.checkpoint_manager(run_dir, cfg.train.keep_checkpoints, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise ConfigError(f"run_dir {str(run_dir)!r} has no checkpoints yet; train it first (scripts/train.py --run_dir {run_dir})")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ConfigError(f"run_dir {str(run_dir)!r} has no checkpoint at step {step}; it has steps {sorted(steps)}")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    # The optimizer state is read as the checkpoint stores it (replicated on `mesh`): its layout
    # depends on the run's optimizer and data-axis size (per-replica state), not on this mesh.
    _, _, abstract = abstract_train_state(cfg.model, optax.identity(), mesh, cfg.train.seed)
    stored = checkpoint.stored_tree(manager, step)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), stored["opt_state"])
    state = checkpoint.restore(manager, step, {"step": abstract.step, "params": abstract.params, "opt_state": opt_state})
    manager.close()
    graphdef, _ = abstract_model(cfg.model)
    return cfg, graphdef, state["params"], step
