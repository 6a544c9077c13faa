"""Models. They name logical axes only; see `jaxbig.parallel.rules` for the mesh mapping."""

from __future__ import annotations

import jax
from flax import nnx

from jaxbig.config import ModelConfig
from jaxbig.models.llama import KVCache, Llama, init_cache


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


__all__ = ["KVCache", "Llama", "abstract_model", "create_model", "init_cache"]
