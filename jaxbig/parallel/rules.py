"""Logical -> mesh axis rules, as data, in one place.

Models name logical axes only (`embed`, `mlp`, `heads`, ...). This table says which mesh
axes each logical axis is split over; `logical_to_spec` turns a tuple of logical names
into a `PartitionSpec` for a concrete array shape and mesh. Activations reach the rules
through the model's `constrain` hook, which `use_rules` installs.

Layout (Megatron + ZeRO-3):
- weights: `embed` over fsdp (each fsdp shard holds a slice, all-gathered on use);
  `heads`/`kv_heads`/`mlp` over tensor (column-parallel in, row-parallel out);
  `vocab` over tensor (vocab-parallel embedding and logits).
- activations: the batch over data and fsdp; heads and mlp activations over tensor.
- pipeline: the stacked `layers` axis over pipeline (stage s holds a contiguous block of
  layers; `jaxbig.parallel.pipeline` documents the schedules' layout), and the batch over
  pipeline too (major to data x fsdp: with fsdp the other order makes the partitioner
  replicate the embedding's gradient), so the embedding, the head and the loss, which run
  outside the pipeline, are data-parallel over the stages instead of computed on each.
  Inside the pipeline's `shard_map` the manual `pipeline` axis is left out of constraints.

KV heads fewer than tensor shards (e.g. 8 KV heads on tensor=16) are replicated over tensor:
`logical_to_spec` leaves out an axis that does not divide the dimension. That is allowed and
cheap (K/V weights are a small share under GQA); other non-dividing sizes (query heads, d_ff,
vocab over tensor; d_model over fsdp) are refused up front by `jaxbig.parallel.guards`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxbig.models import set_default_constrain, use_constrain

# (logical axis, mesh axes it is split over, in order). Unlisted logical axes are replicated.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # weights
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ("pipeline",)),
    ("norm", ()),
    # activations
    ("activation_batch", ("pipeline", "data", "fsdp")),
    ("activation_length", ()),
    ("activation_norm_length", ()),  # the residual stream's sequence axis; ("tensor",) with sequence parallelism
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


def rules_for(sequence_parallel: bool = False) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rules a run uses: `RULES`, with the residual stream split over tensor along the sequence
    when `sequence_parallel` (Korthikanti et al. 2022: the per-layer all-reduce becomes a
    reduce-scatter onto sequence shards plus an all-gather before the next column-parallel matmul,
    so norms and residual adds work on 1/tensor of the tokens)."""
    if not sequence_parallel:
        return RULES
    return tuple((name, ("tensor",)) if name == "activation_norm_length" else (name, axes) for name, axes in RULES)


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, tuple[str, ...]]]):
    """Activation constraints traced inside this block follow `rules` (params always follow `RULES`).

    Installs `constrain` with these rules as the model's constrain hook (`jaxbig.models.use_constrain`).
    """
    with use_constrain(functools.partial(constrain, rules=tuple(rules))):
        yield


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Sequence[tuple[str, tuple[str, ...]]] = RULES) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `jax.set_mesh`.

    Axes a surrounding `shard_map` made manual (the pipeline's) are not constrained: inside it
    an array is already one device's share along them. Where the axes left are all of size 1 (one
    device) there is nothing to constrain, and none is traced: XLA would drop it from the program,
    but on XLA:CPU it still changed the order in which the step's ops were scheduled (and with it
    the buffer reuse), so a one-device step compiled to a different executable than the same
    model written without constraints (`tests/test_handwritten.py`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {k: v for k, v in mesh.shape.items() if k not in mesh.manual_axes}
    if math.prod(auto.values()) == 1:
        return x
    spec = logical_to_spec(logical, x.shape, auto, rules)
    return jax.lax.with_sharding_constraint(x, spec)


# Outside `use_rules`, a model traced under `jax.set_mesh` constrains its activations by `RULES`
# (the same default `use_rules` had before the hook moved into `jaxbig.models`).
set_default_constrain(constrain)
