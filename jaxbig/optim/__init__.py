"""Optimizers from config, built from optax transforms.

`build_optimizer(cfg, total_steps)` gives the optimizer a step applies to averaged gradients:
clipping, then AdamW / SGD (momentum, Nesterov) / Lion / Adafactor on a schedule, with weight
decay on matrices only. `num_replicas` and `views` (the data-axis size and PowerSGD's
matrix views, see `optimizer_for`) add what needs the mesh: gradient compression first in
the chain, or the DiLoCo wrapper around the whole optimizer.
"""

from __future__ import annotations

import jax
import optax

from jaxbig.config import Config, ConfigError, OptimConfig
from jaxbig.models import logical_axes
from jaxbig.optim import compression, local_sgd
from jaxbig.optim.compression import MatrixView
from jaxbig.parallel.rules import logical_to_spec


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then `cfg.schedule` down to `min_lr_ratio` of it at `total_steps`.

    constant: stays at the peak. cosine: cosine decay. linear: linear decay. wsd
    (warmup-stable-decay): the peak until the last `decay_fraction` of the steps, then linear.
    """
    peak, end, warmup = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=end
        )
    ramp = optax.linear_schedule(0.0, peak, warmup)
    if cfg.schedule == "constant":  # not optax.warmup_constant_schedule: with 0 warmup steps it stays at 0
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    if cfg.schedule == "linear":
        return optax.join_schedules([ramp, optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * total_steps))
        stable_end = max(warmup, total_steps - decay)
        return optax.join_schedules(
            [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [warmup, stable_end]
        )
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: use constant, cosine, linear or wsd")


def decay_mask(params) -> dict:
    """Weight decay on weight matrices only: none on norm scales (any param under a `*norm*` module) or biases (vectors)."""

    def decays(path, x) -> bool:
        return x.ndim >= 2 and not any("norm" in str(getattr(k, "key", k)) for k in path)

    return jax.tree_util.tree_map_with_path(decays, params)


def base_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The update rule alone (no clipping, no compression)."""
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "lion":
        return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "adafactor":
        # multiply_by_parameter_scale=False: the learning rate is an absolute step size, as for the others.
        return optax.adafactor(
            schedule, multiply_by_parameter_scale=False, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask
        )
    if cfg.optimizer == "sgd":
        sgd = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        # Plain SGD has no decoupled form: decay is added to the gradient, before the momentum.
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), sgd) if cfg.weight_decay > 0 else sgd
    raise ConfigError(f"optim.optimizer={cfg.optimizer!r}: use adamw, sgd, lion or adafactor")


def build_optimizer(
    cfg: OptimConfig, total_steps: int, *, num_replicas: int = 1, views=None, shard_specs=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). Compression and DiLoCo need `num_replicas`, the data-axis size.

    `views` are PowerSGD's matrix views and `shard_specs` the params' PartitionSpecs over the
    tensor axis (see `compression.from_name`); `optimizer_for` derives both from the model.

    Without them the result is `clip -> base` (AdamW by default), applied to averaged
    gradients. With `cfg.compression` it is `compress -> clip -> base`, run on local gradients
    inside `shard_map`; with `cfg.outer=diloco`, `clip -> base` is the inner optimizer of
    `local_sgd.diloco`.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    tx = base_optimizer(cfg, schedule)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx
    if cfg.outer == "diloco":
        outer = local_sgd.outer_nesterov(cfg.outer_learning_rate, cfg.outer_momentum)
        diloco = local_sgd.diloco(tx, outer, sync_every=cfg.sync_every, num_replicas=num_replicas, local_start_step=cfg.local_start_step)
        return diloco, schedule
    if cfg.compression != "none":
        compress = compression.from_name(
            cfg.compression,
            num_replicas,
            rank=cfg.powersgd_rank,
            fraction=cfg.topk_fraction,
            error_feedback=cfg.error_feedback,
            views=views,
            shard_specs=shard_specs,
            start_step=cfg.compression_start_step,
            iterations=cfg.powersgd_iterations,
        )
        tx = optax.chain(compress, tx)
    return tx, schedule


def uses_data_parallel_step(cfg: OptimConfig) -> bool:
    """Whether the step must take local gradients under shard_map (compression or DiLoCo)."""
    return cfg.compression != "none" or cfg.outer != "none"


def matrix_views(logical_specs, mode: str = "matrix", *, vocab: bool = False) -> dict:
    """PowerSGD views from the params' logical axes.

    Rows are the residual-stream side of a weight, `embed`; columns the rest (heads x
    head_dim, mlp, vocab). Weights with a `vocab` axis (the embedding, the output head) get no
    view, so they go exact, unless `vocab`: their gradients are sums of one row per token in the
    batch, not close to low rank (on `small`, rank 4, compressing them costs +1.4% validation
    loss at 128 steps for 0.9 MB per step saved, docs/benchmarks.md). `mode`:
    - matrix: every layer's weight is its own [embed, rest] matrix (PowerSGD as published);
    - stacked: the `layers` axis joins the rows, [layers·embed, rest] per weight;
    - fused: as stacked, and weights with the same row axes are concatenated along the
      columns: all block weights form one matrix, the embedding and output head another.
    Each step fewer numbers cross the wire from matrix to fused, and each carries a coarser
    approximation (error feedback sends the rest later). Norm scales (no `embed`) go uncompressed.
    """
    if mode not in ("matrix", "stacked", "fused"):
        raise ConfigError(f"optim.powersgd_view={mode!r}: use matrix, stacked or fused")

    def view(spec) -> MatrixView | None:
        names = tuple(spec)
        row_names = ("embed",) if mode == "matrix" else ("layers", "embed")
        batch = tuple(i for i, n in enumerate(names) if n == "layers") if mode == "matrix" else ()
        rows = tuple(i for i, n in enumerate(names) if n in row_names)
        cols = tuple(i for i in range(len(names)) if i not in rows and i not in batch)
        if "embed" not in names or not cols or ("vocab" in names and not vocab):
            return None
        group = "+".join(names[i] for i in batch + rows) if mode == "fused" else None
        return MatrixView(rows=rows, cols=cols, group=group, batch=batch)

    return jax.tree.map(view, logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


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


def optimizer_for(cfg: Config, mesh_shape: dict[str, int]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer on a mesh: checks the mesh, then `build_optimizer` with its data size and views, then pruning."""
    check_mesh(cfg.optim, mesh_shape)
    k, replicas = cfg.optim.accumulate_steps, mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if k > 1 and (cfg.train.batch_size // k) % replicas:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / optim.accumulate_steps={k} = {cfg.train.batch_size // k} sequences per "
            f"microbatch, not divisible by data x fsdp = {replicas}; use a batch size that is a multiple of {k * replicas}"
        )
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
        from jaxbig.compress.prune import PrunePlan, prune_updates

        tx = optax.chain(tx, prune_updates(PrunePlan.from_config(cfg.prune)))
    if cfg.train.skip_nonfinite:
        if uses_data_parallel_step(cfg.optim):
            raise ConfigError(
                "train.skip_nonfinite=true with optim.compression/optim.outer: each data replica would decide alone; "
                "use it with the plain data-parallel step (compression none, outer none)"
            )
        tx = optax.apply_if_finite(tx, max_consecutive_errors=MAX_CONSECUTIVE_SKIPS)
    return tx, schedule


MAX_CONSECUTIVE_SKIPS = 10  # train.skip_nonfinite: after this many non-finite steps in a row the run stops


def nonfinite_metrics(opt_state) -> dict[str, jax.Array]:
    """With `optax.apply_if_finite` in the chain: steps skipped so far and the current run of them; else {}."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)) if isinstance(s, optax.ApplyIfFiniteState)]
    if not states:
        return {}
    return {"skipped_steps": states[0].total_notfinite, "nonfinite_streak": states[0].notfinite_count}


__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "base_optimizer",
    "build_optimizer",
    "check_mesh",
    "decay_mask",
    "learning_rate_schedule",
    "matrix_views",
    "nonfinite_metrics",
    "optimizer_for",
    "uses_data_parallel_step",
]
