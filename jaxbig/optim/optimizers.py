"""The optimizer a step applies, as an optax chain: clipping, the update rule, and what needs the data axis.

`build_optimizer(cfg, total_steps)` gives the optimizer a step applies to averaged gradients:
clipping, then AdamW / SGD (momentum, Nesterov) / Lion / Adafactor on a schedule, with weight
decay on matrices only. `num_replicas` and `views` (the data-axis size and PowerSGD's
matrix views, see `jaxbig.optim.run_optimizer.optimizer_for`) add what needs the mesh: gradient
compression first in the chain, or the DiLoCo wrapper around the whole optimizer.
"""

from __future__ import annotations

import jax
import optax

from jaxbig.config import ConfigError, OptimConfig
from jaxbig.optim import compression, local_sgd
from jaxbig.optim.schedules import learning_rate_schedule


def decay_mask(params) -> dict:
    """Weight decay on weight matrices only: none on norm scales (any param under a `*norm*` module) or biases
    (vectors, or a `*bias*` param: q/k/v biases are stacked over layers and stored per head, so not vectors)."""

    def decays(path, x) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        return x.ndim >= 2 and not any("norm" in n or "bias" in n for n in names)

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
    if cfg.compression != "none" and cfg.outer != "async_ps":  # async_ps compresses pushes (jaxbig.ps), not a collective
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
    """Whether the step must take local gradients under shard_map (compression or DiLoCo).

    Not with optim.outer=async_ps: its workers run the plain step, and compression applies to their pushes."""
    if cfg.outer == "async_ps":
        return False
    return cfg.compression != "none" or cfg.outer != "none"


__all__ = ["base_optimizer", "build_optimizer", "decay_mask", "uses_data_parallel_step"]
