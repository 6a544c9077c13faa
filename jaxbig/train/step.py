"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxbig.data.pipeline import Batch
from jaxbig.models import Params
from jaxbig.models.layers import LayerRunner, scan_layers
from jaxbig.optim import nonfinite_metrics
from jaxbig.train.state import TrainState

# Batch keys: raw-text windows, and packed rows (`jaxbig.data.packed`) with document segments.
BATCH_KEYS = {False: ("inputs", "targets"), True: ("inputs", "targets", "segment_ids", "positions")}


def loss_fn(params: Params, graphdef: nnx.GraphDef, batch: Batch, run_layers: LayerRunner = scan_layers) -> jax.Array:
    """Mean next-token cross-entropy in nats per token; `run_layers` from `jaxbig.parallel.pipeline.layer_runner`."""
    model = nnx.merge(graphdef, params)
    logits_BTV = model(batch["inputs"], batch.get("positions"), segment_ids_BT=batch.get("segment_ids"), run_layers=run_layers)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"]).mean()


def microbatches(batch: Batch, k: int) -> Batch:
    """[B, T] -> [k, B/k, T]; microbatch j is rows j, j+k, ..., so each device's rows stay on it."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulated_value_and_grad(loss_of, params: Params, batch: Batch, k: int):
    """Mean of `value_and_grad(loss_of)(params, microbatch)` over k microbatches, one at a time (`lax.scan`)."""
    micro = microbatches(batch, k)
    first = jax.value_and_grad(loss_of)(params, jax.tree.map(lambda x: x[0], micro))

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, jax.value_and_grad(loss_of)(params, mb)), None

    (loss, grads), _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], micro))
    return loss / k, jax.tree.map(lambda g: g / k, grads)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    run_layers: LayerRunner = scan_layers,
    *,
    accumulate_steps: int = 1,
    distill_loss=None,
):
    """`train_step(state, batch)`; with `distill_loss` (`jaxbig.compress.distill.make_distill_loss`),
    `train_step(state, batch, teacher_params)`: the loss is the distillation loss, the teacher's params an input."""

    def step_with(state: TrainState, batch: Batch, loss_of) -> tuple[TrainState, dict[str, jax.Array]]:
        if accumulate_steps == 1:
            loss, grads = jax.value_and_grad(loss_of)(state.params, batch)
        else:
            loss, grads = accumulated_value_and_grad(loss_of, state.params, batch, accumulate_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **nonfinite_metrics(opt_state)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if distill_loss is None:

        def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
            return step_with(state, batch, lambda p, b: loss_fn(p, graphdef, b, run_layers))

        return train_step

    def distill_train_step(state: TrainState, batch: Batch, teacher_params: Params) -> tuple[TrainState, dict[str, jax.Array]]:
        return step_with(state, batch, lambda p, b: distill_loss(p, b, teacher_params))

    return distill_train_step


def make_grad_step(graphdef: nnx.GraphDef, run_layers: LayerRunner = scan_layers, *, accumulate_steps: int = 1, grad_clip: float = 0.0):
    """`grad_step(params, batch) -> (grads, metrics)`: the train step's gradient half, for a worker that pushes
    gradients to a parameter server (`jaxbig.ps`) which applies the optimizer.

    The same loss, microbatching and global-norm clipping (`optim.grad_clip`, first in the run's optimizer
    chain, see `jaxbig.optim.build_optimizer`) as `make_train_step`; the server applies the rest of the chain.
    """

    def grad_step(params: Params, batch: Batch) -> tuple[Params, dict[str, jax.Array]]:
        loss_of = lambda p, b: loss_fn(p, graphdef, b, run_layers)  # noqa: E731
        if accumulate_steps == 1:
            loss, grads = jax.value_and_grad(loss_of)(params, batch)
        else:
            loss, grads = accumulated_value_and_grad(loss_of, params, batch, accumulate_steps)
        grad_norm = optax.tree.norm(grads)
        if grad_clip > 0:
            grads, _ = optax.clip_by_global_norm(grad_clip).update(grads, optax.EmptyState())
        return grads, {"loss": loss, "grad_norm": grad_norm}

    return grad_step


def make_eval_step(graphdef: nnx.GraphDef, run_layers: LayerRunner = scan_layers):
    def eval_step(params: Params, batch: Batch) -> jax.Array:
        return loss_fn(params, graphdef, batch, run_layers)

    return eval_step


def jit_step(train_step, state_shardings: TrainState, batch_sharding, *, teacher_shardings: Params | None = None, packed: bool = False, compiler_options=None):
    """The train step compiled once with explicit shardings; the incoming state's buffers are donated.

    `(state, batch)`, or `(state, batch, teacher_params)` with `teacher_shardings` (distillation:
    the teacher's params are an input laid out by them). `compiler_options` are XLA options for
    this step (`jaxbig.xla_options.compiler_options`).
    """
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS[packed]}
    in_shardings = (state_shardings, batch_shardings) + (() if teacher_shardings is None else (teacher_shardings,))
    return jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, None),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def jit_train_step(train_step, state_shardings: TrainState, batch_sharding, teacher=None, packed: bool = False, compiler_options=None):
    """`jit_step`, with a loaded `teacher`'s (`jaxbig.compress.distill.Teacher`) params bound: the result is `step(state, batch)`."""
    if teacher is None:
        return jit_step(train_step, state_shardings, batch_sharding, packed=packed, compiler_options=compiler_options)
    jitted = jit_step(train_step, state_shardings, batch_sharding, teacher_shardings=teacher.shardings, packed=packed, compiler_options=compiler_options)
    return lambda state, batch: jitted(state, batch, teacher.params)


def jit_eval_step(eval_step, param_shardings: Params, batch_sharding, packed: bool = False, compiler_options=None):
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS[packed]}
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings), compiler_options=compiler_options)


def mean_loss(eval_fn, params: Params, batches: list[Batch]) -> float:
    losses = [eval_fn(params, b) for b in batches]
    return float(jnp.mean(jnp.stack(losses)))
