"""Load a trained run from its directory: the resolved config and the params of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh

from jaxbig import checkpoint
from jaxbig.config import Config, ConfigError, MeshConfig, config_from_dict
from jaxbig.optim import build_optimizer
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
    tx, _ = build_optimizer(cfg.optim, cfg.train.steps)
    _, _, abstract = abstract_train_state(cfg.model, tx, mesh, cfg.train.seed)
    state = checkpoint.restore(manager, step, abstract)
    manager.close()
    graphdef, _ = abstract_model(cfg.model)
    return cfg, graphdef, state.params, step
