"""Params as named tensors, and their split over the server shards by param groups."""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxbig.config import ConfigError

Flat = dict[str, Any]  # '/'-joined param path -> array


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def to_flat(tree, is_leaf=None) -> Flat:
    """A params tree (or a tree like it, with `is_leaf`) -> {name: leaf}, names like `blocks/attn/wq`."""
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def nest(flat: Flat) -> dict:
    """{name: leaf} -> nested dicts (the inverse of `to_flat` for params, whose keys are strings); any subset of
    the names gives the sub-tree a server shard holds, which the run's optimizer (its weight-decay mask reads the
    path names) and orbax take like the whole tree."""
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


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
