"""Device meshes from `--mesh 4x2` or `--mesh data=2,fsdp=2,tensor=2`.

Axis order is outermost to innermost: data, pipeline, fsdp, tensor. The innermost axis gets
neighbouring devices, which is where tensor parallelism's per-layer all-reduces belong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxbig.config import Config, ConfigError, MeshConfig
from jaxbig.parallel.guards import check_divisibility
from jaxbig.parallel.pipeline import check_pipeline

MESH_AXES = ("data", "pipeline", "fsdp", "tensor")
# `--mesh AxBxC` names these axes, in this order.
_POSITIONAL = ("data", "tensor", "pipeline")


class MeshError(ConfigError):
    """The mesh cannot be built on the devices at hand; the message names the numbers."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`4x2` -> {data: 4, pipeline: 1, fsdp: 1, tensor: 2}; `data=2,fsdp=-1` -> {data: 2, ..., fsdp: -1}."""
    text = spec.strip().replace(" ", "")
    sizes = {axis: 1 for axis in MESH_AXES}
    usage = (
        f"--mesh {spec!r}: use DATAxTENSOR[xPIPELINE] (e.g. 4x2, 2x2x2, or 8 for data only) or named axes "
        f"(e.g. data=2,fsdp=2,tensor=2; axes {', '.join(MESH_AXES)}; one may be -1 to fill the rest)"
    )
    if not text:
        raise MeshError(usage)
    if "=" in text:
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name not in MESH_AXES:
                raise MeshError(f"--mesh {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(usage) from None
    else:
        parts = text.lower().split("x")
        if len(parts) > len(_POSITIONAL):
            raise MeshError(f"{usage}; {len(parts)} positional sizes given, at most {len(_POSITIONAL)}")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise MeshError(usage) from None
        sizes.update(zip(_POSITIONAL, values))
    try:
        MeshConfig(**sizes)  # validates: positive or a single -1
    except ConfigError as e:
        raise MeshError(f"--mesh {spec!r}: {e}") from None
    return sizes


def format_mesh(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def devices_needed(sizes: dict[str, int]) -> int:
    """Devices a fully specified mesh needs; a -1 axis cannot be emulated without a count."""
    if any(v == -1 for v in sizes.values()):
        raise MeshError(
            f"mesh {','.join(f'{k}={v}' for k, v in sizes.items())}: plan emulates exactly the devices the mesh names, "
            "so give every axis a size (no -1), or pass --devices N"
        )
    return math.prod(sizes.values())


def resolve_mesh_sizes(cfg: MeshConfig, num_devices: int, spec: str | None = None) -> dict[str, int]:
    """Fills a -1 axis and checks the product against the devices; `spec` is how the user wrote it."""
    sizes = cfg.sizes()
    shown = spec or format_mesh(sizes)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise MeshError(
                    f"mesh {shown}: the other axes use {fixed} devices, which does not divide the {num_devices} "
                    f"devices found, so {axis}=-1 cannot fill the rest"
                )
            sizes[axis] = num_devices // fixed
    needed = math.prod(sizes.values())
    if needed > num_devices:
        raise MeshError(f"mesh {shown} needs {needed} devices, found {num_devices}")
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None, spec: str | None = None) -> Mesh:
    """Builds the mesh, using the first prod(sizes) devices when the mesh is smaller than the host.

    Axes are `Auto`: the compiler propagates shardings from the params, the batch and the
    activation constraints the model names.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = resolve_mesh_sizes(cfg, len(devices), spec)
    n = math.prod(sizes.values())
    if n < len(devices) and jax.process_count() > 1:
        raise MeshError(f"mesh {spec or format_mesh(sizes)} uses {n} of {len(devices)} devices; a multi-process mesh must use them all")
    shape = tuple(sizes[a] for a in MESH_AXES)
    if n == len(devices):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_fits(cfg: Config, mesh_shape: Mapping[str, int]) -> None:
    """Raises a ConfigError naming the numbers and the fix when the model does not split evenly over the mesh.

    Heads, d_ff and vocab over tensor, d_model over fsdp (`jaxbig.parallel.guards.check_divisibility`);
    layers, microbatches and the batch over the pipeline (`jaxbig.parallel.pipeline.check_pipeline`).
    The batch vs data x fsdp check is the data pipeline's (`check_batch_divides`).
    """
    check_divisibility(cfg.model, dict(mesh_shape))
    check_pipeline(cfg, mesh_shape)
