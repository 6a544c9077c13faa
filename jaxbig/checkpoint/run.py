"""A trained run's directory, read without the training loop: its config and the params of a checkpoint.

`<run_dir>/config.yaml` is the resolved config the run trained with (the loop writes it);
`<run_dir>/checkpoints/<step>/` holds its train states. Reading needs only the config, the
model's logical axes, the mesh rules and orbax, so export, sampling and distillation load a run
without importing the loop (grain, the optimizers, tqdm).
"""

from __future__ import annotations

from pathlib import Path

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh

from jaxbig.checkpoint.manager import checkpoint_manager, restore_params
from jaxbig.config import Config, ConfigError, MeshConfig, ModelConfig, config_from_dict
from jaxbig.models import Params, logical_axes
from jaxbig.parallel.mesh import make_mesh
from jaxbig.parallel.rules import tree_shardings

CONFIG_FILE = "config.yaml"
IMPORTED_FILE = "imported.json"  # written by jaxbig.interop's importers: params only, no optimizer state


def load_run_config(run_dir: str | Path) -> Config:
    """The config `run_dir` was trained with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a jaxbig run directory (no {CONFIG_FILE}); pass the --run_dir a training run wrote")
    return config_from_dict(yaml.safe_load(path.read_text()))


def abstract_params(model: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, params as ShapeDtypeStructs carrying their shardings on `mesh` by the rules); nothing allocated."""
    graphdef, abstract, logical = logical_axes(model)
    shardings = tree_shardings(logical, abstract, mesh)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps `run_dir` holds checkpoints of (none when it has no checkpoints directory)."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return []
    manager = checkpoint_manager(run_dir, 1, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def load_params(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[Config, nnx.GraphDef, Params, int]:
    """(config, graphdef, params, step) from the run's latest checkpoint, or `step`; params placed on `mesh`
    (default: one device) by the rules. The optimizer state is not read."""
    cfg = load_run_config(run_dir)
    manager = checkpoint_manager(run_dir, cfg.train.keep_checkpoints, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise ConfigError(f"run_dir {str(run_dir)!r} has no checkpoints yet; train it first (scripts/train.py --run_dir {run_dir})")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ConfigError(f"run_dir {str(run_dir)!r} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
        graphdef, target = abstract_params(cfg.model, mesh)
        params = restore_params(manager, step, target)
    finally:
        manager.close()
    return cfg, graphdef, params, step


__all__ = ["CONFIG_FILE", "IMPORTED_FILE", "abstract_params", "checkpoint_steps", "load_params", "load_run_config"]
