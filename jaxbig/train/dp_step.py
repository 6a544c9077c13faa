"""The data-parallel step written by hand: local gradients under `shard_map`, the optimizer communicates.

Used when gradients are compressed or DiLoCo runs (`optim.compression`, `optim.outer`). Under
plain `jit` the gradient all-reduce is part of `grad`; here `shard_map` is manual over the
`data` axis only (tensor parallelism stays automatic: the compiler still partitions the
model), and the params are cast to *varying* over data before `grad`, so each replica gets
its own gradient and no collective is inserted. The optimizer (`jaxbig.optim`) then does
the communication: a compression transform its collectives, DiLoCo its periodic average.

Compression: a replica's loss is normalised by the global token count, so its gradient is
its share of the global gradient and the exact aggregate is a psum. DiLoCo: each replica
takes gradients of its own mean loss at its own params.

Metrics are per replica, `[N]` split over data (no collective), averaged on the host:
`loss`, and `replica_grad_norm`, the norm of each replica's own mean gradient.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxbig.data.pipeline import Batch
from jaxbig.models import Params
from jaxbig.optim.local_sgd import LocalSGD
from jaxbig.optim.per_replica import DATA_AXIS, manual_specs
from jaxbig.train.state import TrainState
from jaxbig.train.step import accumulated_value_and_grad


def local_loss(params: Params, graphdef: nnx.GraphDef, batch: Batch, replicas: int) -> jax.Array:
    """Next-token cross-entropy summed over this replica's batch, over the token count of `replicas` such batches."""
    logits_BTV = nnx.merge(graphdef, params)(batch["inputs"])
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return ce_BT.sum() / (ce_BT.size * replicas)


def make_dp_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation | LocalSGD,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    accumulate_steps: int = 1,
):
    """`train_step(state, batch)` under `shard_map` over data; `shardings` are the state's (see `init_train_state`)."""
    diloco = isinstance(tx, LocalSGD)
    n = mesh.shape[DATA_AXIS]
    # A share of the global gradient (compression), or the replica's own mean (DiLoCo).
    replicas = 1 if diloco else n

    def local_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if diloco:
            params = tx.replica_params(state.opt_state)
        else:
            params = jax.lax.pcast(state.params, (DATA_AXIS,), to="varying")

        def loss_of(p, b):
            return local_loss(p, graphdef, b, replicas)

        if accumulate_steps == 1:
            loss, grads = jax.value_and_grad(loss_of)(params, batch)
        else:
            loss, grads = accumulated_value_and_grad(loss_of, params, batch, accumulate_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": (loss * replicas)[None],
            "replica_grad_norm": (optax.tree.norm(grads) * replicas)[None],
            "lr": schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state), metrics

    state_specs = manual_specs(shardings)
    batch_specs = {"inputs": PartitionSpec(DATA_AXIS), "targets": PartitionSpec(DATA_AXIS)}
    metric_specs = {"loss": PartitionSpec(DATA_AXIS), "replica_grad_norm": PartitionSpec(DATA_AXIS), "lr": PartitionSpec()}
    return jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(state_specs, batch_specs),
        out_specs=(state_specs, metric_specs),
        axis_names={DATA_AXIS},
    )
