"""Train state: initialised abstractly, given shardings by the rules, then materialised sharded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbig.config import ModelConfig
from jaxbig.models import Params, create_model, logical_axes
from jaxbig.optim.per_replica import opt_state_shardings
from jaxbig.parallel.rules import tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Params
    opt_state: optax.OptState


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    _, abstract, logical = logical_axes(cfg)
    return tree_shardings(logical, abstract, mesh)


def make_init_fn(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(create_model(cfg, seed), nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def make_init_from_params(cfg: ModelConfig, tx: optax.GradientTransformation):
    """`init(params) -> TrainState`: a fresh optimizer state around given params (fine-tuning), cast to `cfg.param_dtype`."""

    def init(params: Params) -> TrainState:
        params = jax.tree.map(lambda p: p.astype(cfg.param_dtype), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """Params by the logical rules; optimizer moments like their params; per-replica state split over data; the rest replicated."""
    del tx  # the state's leaves are matched to params by key path and shape (see opt_state_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(cfg, mesh)
    opt_state = opt_state_shardings(abstract_state.opt_state, abstract_state.params, params, mesh)
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int):
    """(init function, shardings, abstract state whose ShapeDtypeStructs carry those shardings).

    The abstract state is both the `jit(init)` output spec and the checkpoint restore target.
    """
    init = make_init_fn(cfg, tx, seed)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(cfg, tx, mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return init, shardings, abstract


def init_train_state(
    cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[nnx.GraphDef, TrainState, TrainState, TrainState]:
    """Returns (graphdef, state, shardings, abstract state carrying the shardings)."""
    graphdef, _, _ = logical_axes(cfg)
    init, shardings, abstract = abstract_train_state(cfg, tx, mesh, seed)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings, abstract
