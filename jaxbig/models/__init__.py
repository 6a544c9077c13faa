"""Models. They name logical axes only; `jaxbig.parallel.rules` maps them to mesh axes.

This package imports nothing from `jaxbig.parallel`, `jaxbig.train` or `jaxbig.optim`: what a
mesh means to the model comes in through hooks (`use_constrain`, `use_dense`) and layer runners
(`jaxbig.models.layers`).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxbig.config import ModelConfig
from jaxbig.models.layers import LayerBody, LayerRunner, scan_layers, unrolled_layers
from jaxbig.models.llama import KVCache, Llama, constrain, init_cache, set_default_constrain, use_constrain, use_dense

Params = dict[str, Any]  # nested dict of arrays, as `nnx.to_pure_dict` gives it


def create_model(cfg: ModelConfig, seed: int) -> Llama:
    """Builds the model with real params (inside `jit` this is the sharded init).

    Eager sharding is off: params carry *logical* axis names, which are not mesh axes; the
    caller places them with `jaxbig.parallel.rules` shardings.
    """
    with nnx.use_eager_sharding(False):
        return Llama(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and param shapes/dtypes/logical axes, with nothing allocated.

    `jax.eval_shape` rather than `nnx.eval_shape`: the latter resolves `out_sharding` against
    the current mesh, and ours holds logical names, not mesh axes.
    """
    box = {}

    def shapes() -> nnx.State:
        box["graphdef"], state = nnx.split(create_model(cfg, 0))
        return state

    state = jax.eval_shape(shapes)
    return box["graphdef"], state


def logical_axes(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
    """(graphdef, abstract params, logical PartitionSpecs) with nothing allocated."""
    graphdef, abstract = abstract_model(cfg)
    return graphdef, nnx.to_pure_dict(abstract), nnx.to_pure_dict(nnx.get_partition_spec(abstract))


__all__ = [
    "KVCache",
    "LayerBody",
    "LayerRunner",
    "Llama",
    "Params",
    "abstract_model",
    "constrain",
    "create_model",
    "init_cache",
    "logical_axes",
    "scan_layers",
    "set_default_constrain",
    "unrolled_layers",
    "use_constrain",
    "use_dense",
]
