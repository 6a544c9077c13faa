"""The split of the params over the server shards by param groups (params by name: `jaxbig.models.paths`)."""

from __future__ import annotations

import math

from jaxbig.config import ConfigError

# `nest` (jaxbig.models.paths) of one group's names gives the sub-tree a server shard holds, which the run's optimizer
# (its weight-decay mask reads the path names) and orbax take like the whole tree.


def shard_groups(shapes: dict[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """The param names each server shard owns: whole tensors, largest first onto the least-loaded shard.

    A tensor is never split, so each shard applies its optimizer to whole tensors; the optimizers the server
    runs are elementwise (global-norm clipping happens on the worker), so the split changes no number.
    """
    if num_shards > len(shapes):
        raise ConfigError(f"ps.num_server_shards={num_shards} exceeds the model's {len(shapes)} param tensors; use at most {len(shapes)}")
    load = [0] * num_shards
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    for name in sorted(shapes, key=lambda n: (-math.prod(shapes[n]), n)):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += math.prod(shapes[name])
    return [sorted(g) for g in groups]


__all__ = ["Flat", "nest", "shard_groups", "to_flat"]
