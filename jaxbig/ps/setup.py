"""What a parameter-server run builds from its config, and the checks it runs before anything starts."""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxbig.config import Config, ConfigError
from jaxbig.models import logical_axes
from jaxbig.optim import matrix_views
from jaxbig.optim.compression import MatrixView
from jaxbig.optim.push_compression import PushCodec
from jaxbig.parallel.mesh import MeshError, make_mesh
from jaxbig.models.paths import to_flat
from jaxbig.ps.groups import shard_groups
from jaxbig.train.setup import Run, build


def worker_config(cfg: Config) -> Config:
    """A worker's own run: the plain jitted step on its mesh (the server does the asynchronous part, and
    compression applies to pushes, not to a collective)."""
    optim = dataclasses.replace(cfg.optim, outer="none", compression="none")
    return dataclasses.replace(cfg, optim=optim)


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    _, abstract, _ = logical_axes(cfg.model)
    return {n: tuple(x.shape) for n, x in to_flat(abstract).items()}


def push_codec(cfg: Config) -> PushCodec:
    """The codec of pushes (`optim.compression`), with PowerSGD's matrix views from the model's logical axes."""
    views = None
    if cfg.optim.compression == "powersgd":
        _, _, logical = logical_axes(cfg.model)
        tree = matrix_views(logical, cfg.optim.powersgd_view, vocab=cfg.optim.powersgd_vocab)
        views = to_flat(tree, is_leaf=lambda v: v is None or isinstance(v, MatrixView))
    return PushCodec(
        cfg.optim.compression,
        param_shapes(cfg),
        error_feedback=cfg.optim.error_feedback,
        fraction=cfg.optim.topk_fraction,
        rank=cfg.optim.powersgd_rank,
        views=views,
        seed=cfg.train.seed,
    )


def worker_run(cfg: Config, devices: list) -> Run:
    """The worker's `Run` (its checks, layout and jitted steps) on `devices`; a mesh that does not fit them is a ConfigError."""
    wcfg = worker_config(cfg)
    try:
        mesh = make_mesh(wcfg.mesh, devices=devices)
    except MeshError as e:
        raise ConfigError(f"{e}; with optim.outer=async_ps the mesh section is one worker's mesh over ps.devices_per_worker={len(devices)} devices") from None
    if math.prod(mesh.shape.values()) != len(devices):
        raise ConfigError(
            f"mesh {dict(mesh.shape)} uses {math.prod(mesh.shape.values())} of a worker's ps.devices_per_worker={len(devices)} devices; "
            "lay the mesh out over all of them (e.g. -1 on one axis) or lower ps.devices_per_worker"
        )
    return build(wcfg, mesh)


def check_ps(cfg: Config) -> Run:
    """Every check of a parameter-server run that needs JAX, before a process starts; returns the driver's `Run`.

    The workers' devices against this host's (`jax.devices()`: the real accelerators, or the emulated CPU
    devices), one worker's mesh over `ps.devices_per_worker` of them, the shards against the params, and the
    push compression against the params' shapes.
    """
    ps, devices = cfg.ps, jax.devices()
    needed = ps.workers * ps.devices_per_worker
    if needed > len(devices):
        raise ConfigError(
            f"ps.workers={ps.workers} x ps.devices_per_worker={ps.devices_per_worker} = {needed} devices, but this host has "
            f"{len(devices)} {devices[0].platform} devices; use at most {len(devices) // ps.devices_per_worker} workers"
        )
    run = worker_run(cfg, devices[: ps.devices_per_worker])
    shard_groups(param_shapes(cfg), ps.num_server_shards)
    push_codec(cfg)
    return run


__all__ = ["check_ps", "param_shapes", "push_codec", "worker_config", "worker_run"]
