"""The run's optimizer on a mesh: the mesh checks, then `build_optimizer` with the data-axis size,
PowerSGD's views from the model's logical axes, pruning and skipping of non-finite steps."""

from __future__ import annotations

import jax
import optax

from jaxbig.compress.prune import PrunePlan, prune_updates
from jaxbig.config import Config, ConfigError, OptimConfig
from jaxbig.models import logical_axes
from jaxbig.optim.nonfinite import MAX_CONSECUTIVE_SKIPS
from jaxbig.optim.optimizers import build_optimizer, uses_data_parallel_step
from jaxbig.optim.views import matrix_views
from jaxbig.parallel.rules import logical_to_spec


def check_mesh(cfg: OptimConfig, mesh_shape: dict[str, int]) -> None:
    """Refuses compression or DiLoCo on a mesh they cannot use, naming the axis sizes and the fix."""
    if not uses_data_parallel_step(cfg):
        return
    what = f"optim.outer={cfg.outer}" if cfg.outer != "none" else f"optim.compression={cfg.compression}"
    data, fsdp, pipeline = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1), mesh_shape.get("pipeline", 1)
    if data < 2:
        raise ConfigError(
            f"{what} works over the data axis, but the mesh has data={data}; it needs >= 2 data replicas "
            "(e.g. --mesh 8 or --mesh 4x2), or set it back to none"
        )
    if fsdp > 1:
        raise ConfigError(
            f"{what} with mesh fsdp={fsdp}: FSDP also splits the batch, and its gradient reduce-scatter is inserted by "
            "the partitioner, uncompressed and not local; put those devices on the data axis (e.g. --mesh data=8 or 4x2)"
        )
    if pipeline > 1:
        raise ConfigError(f"{what} with mesh pipeline={pipeline} is not supported; use pipeline=1")


def check_accumulation(cfg: Config, mesh_shape: dict[str, int]) -> None:
    """Refuses gradient accumulation whose microbatches do not split over data x fsdp, naming the numbers."""
    k, replicas = cfg.optim.accumulate_steps, mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if k > 1 and (cfg.train.batch_size // k) % replicas:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / optim.accumulate_steps={k} = {cfg.train.batch_size // k} sequences per "
            f"microbatch, not divisible by data x fsdp = {replicas}; use a batch size that is a multiple of {k * replicas}"
        )


def optimizer_for(cfg: Config, mesh_shape: dict[str, int]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer on a mesh: checks the mesh, then `build_optimizer` with its data size and views, then pruning."""
    check_mesh(cfg.optim, mesh_shape)
    check_accumulation(cfg, mesh_shape)
    views = shard_specs = None
    if cfg.optim.compression != "none":
        _, abstract, logical = logical_axes(cfg.model)
        views = matrix_views(logical, cfg.optim.powersgd_view, vocab=cfg.optim.powersgd_vocab)
        if any(size > 1 for axis, size in mesh_shape.items() if axis != "data"):
            others = {**mesh_shape, "data": 1}
            shard_specs = jax.tree.map(
                lambda spec, x: logical_to_spec(tuple(spec) + (None,) * (x.ndim - len(spec)), x.shape, others),
                logical,
                abstract,
                is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec),
            )
    num_replicas = mesh_shape.get("data", 1)
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, num_replicas=num_replicas, views=views, shard_specs=shard_specs)
    if cfg.prune.method != "none":  # last in the chain: it masks the final updates (Config refuses compression/DiLoCo with it)
        tx = optax.chain(tx, prune_updates(PrunePlan.from_config(cfg.prune)))
    if cfg.train.skip_nonfinite:
        if uses_data_parallel_step(cfg.optim):
            raise ConfigError(
                "train.skip_nonfinite=true with optim.compression/optim.outer: each data replica would decide alone; "
                "use it with the plain data-parallel step (compression none, outer none)"
            )
        tx = optax.apply_if_finite(tx, max_consecutive_errors=MAX_CONSECUTIVE_SKIPS)
    return tx, schedule


__all__ = ["check_accumulation", "check_mesh", "optimizer_for"]
