"""Logical -> mesh axis rules, as data, in one place.

Models name logical axes only (`embed`, `mlp`, `heads`, ...). This table says which mesh
axes each logical axis is split over; `logical_to_spec` turns a tuple of logical names
into a `PartitionSpec` for a concrete array shape and mesh.

Layout (Megatron + ZeRO-3):
- weights: `embed` over fsdp (each fsdp shard holds a slice, all-gathered on use);
  `heads`/`kv_heads`/`mlp` over tensor (column-parallel in, row-parallel out);
  `vocab` over tensor (vocab-parallel embedding and logits).
- activations: the batch over data and fsdp; heads and mlp activations over tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# (logical axis, mesh axes it is split over, in order). Unlisted logical axes are replicated.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # weights
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("norm", ()),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ()),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
)


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: dict[str, int],
    rules: Sequence[tuple[str, tuple[str, ...]]] = RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec for an array of `shape` on a mesh of `mesh_shape`.

    A mesh axis is used at most once per array (the first dimension that claims it wins), axes of
    size 1 are dropped, and an axis that does not divide the dimension is left out, so the
    dimension is replicated over it (e.g. 2 KV heads on tensor=4).
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        axes = []
        size = 1
        for axis in table.get(name, ()) if name is not None else ():
            n = mesh_shape.get(axis, 1)
            if n == 1 or axis in used or dim % (size * n):
                continue
            axes.append(axis)
            size *= n
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_shardings(logical_tree, abstract_tree, mesh: jax.sharding.Mesh, rules=RULES):
    """NamedShardings for every array in `abstract_tree`, given a matching tree of logical PartitionSpecs."""
    mesh_shape = dict(mesh.shape)

    def one(logical: PartitionSpec, x) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(tuple(logical) + (None,) * (x.ndim - len(logical)), x.shape, mesh_shape, rules))

    return jax.tree.map(one, logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `jax.set_mesh`.

    Inside `shard_map`, the manual axes are already split by hand and are left out.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    manual = set(mesh.manual_axes)
    spec = logical_to_spec(logical, x.shape, {k: 1 if k in manual else v for k, v in mesh.shape.items()})
    return jax.lax.with_sharding_constraint(x, spec)
