"""Optimizer state that differs across data replicas, and where every optimizer-state leaf lives.

Most optimizer state is a function of the averaged gradient, so it is the same on every data
replica and is stored like the params. Error-feedback residuals (gradient compression) and
DiLoCo's inner params and inner optimizer state are not: each replica has its own. Such state
is wrapped in `PerReplica`, and each of its leaves carries a leading axis of size N (the data
axis size), split over the mesh's data axis: `[N, ...]` with `P('data', *param_spec)`. Inside
`shard_map` over `data` a replica sees its slice `[1, ...]`; `local` and `stacked` convert.

Because the state is part of `opt_state`, the train state's checkpoint saves and restores it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


class PerReplica(NamedTuple):
    """Marks a subtree whose every leaf has a leading per-replica axis `[N, ...]`."""

    value: Any


def replicate(tree, num_replicas: int):
    """`[...]` -> `[N, ...]`, the same value for every replica (as `init` builds per-replica state)."""
    return PerReplica(jax.tree.map(lambda x: jnp.broadcast_to(x, (num_replicas, *jnp.shape(x))), tree))


def local(per_replica: PerReplica):
    """Inside `shard_map` over data: this replica's `[1, ...]` slices -> plain `[...]` arrays."""

    def one(x):
        if x.shape[0] != 1:
            raise ValueError(
                f"per-replica optimizer state has {x.shape[0]} rows per data replica, not 1: it was built for a different "
                "data-axis size (num_replicas must be the mesh's data size)"
            )
        return x[0]

    return jax.tree.map(one, per_replica.value)


def stacked(tree) -> PerReplica:
    """Inside `shard_map` over data: this replica's `[...]` arrays -> `[1, ...]` slices of the state."""
    return PerReplica(jax.tree.map(lambda x: x[None], tree))


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    """A NamedSharding for every optimizer-state leaf.

    A leaf whose key path ends with a param's path is stored like that param when it has the
    param's shape (Adam moments, SGD momentum). Inside `PerReplica`, leaves are split over data
    on their leading axis, and further like their param when the rest of the shape is the
    param's. Everything else (step counts, Adafactor's factored moments, PowerSGD's shared
    factors) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {}
    for path, (x, sharding) in jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a, s: (a, s), abstract_params, param_shardings), is_leaf=lambda v: isinstance(v, tuple)
    )[0]:
        by_path[tuple(_key(k) for k in path)] = (tuple(x.shape), sharding.spec)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def param_spec(path, shape) -> PartitionSpec | None:
        keys = tuple(_key(k) for k in path)
        for n in lengths:
            hit = by_path.get(keys[-n:]) if len(keys) >= n else None
            if hit is not None and hit[0] == tuple(shape):
                return hit[1]
        return None

    def one(path, x, per_replica: bool) -> NamedSharding:
        shape = tuple(jnp.shape(x))
        if per_replica:
            if not shape:
                raise ValueError(f"per-replica optimizer state {jax.tree_util.keystr(path)} is a scalar; it needs a leading [N] axis")
            inner = param_spec(path, shape[1:])
            return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *(inner or ())))
        spec = param_spec(path, shape)
        return NamedSharding(mesh, spec) if spec is not None else replicated

    def node(path, sub):
        if isinstance(sub, PerReplica):
            return PerReplica(jax.tree_util.tree_map_with_path(lambda p, x: one(path + p, x, True), sub.value))
        return one(path, sub, False)

    return jax.tree_util.tree_map_with_path(node, abstract_opt_state, is_leaf=lambda v: isinstance(v, PerReplica))


def manual_specs(shardings, axis: str = DATA_AXIS):
    """`shard_map` specs over `axis` only: P(axis) for leaves split over it on their first dim, else P()."""

    def one(s: NamedSharding) -> PartitionSpec:
        first = s.spec[0] if len(s.spec) else None
        names = first if isinstance(first, tuple) else (first,)
        return PartitionSpec(axis) if axis in names else PartitionSpec()

    return jax.tree.map(one, shardings)
