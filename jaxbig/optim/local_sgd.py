"""Local SGD / DiLoCo (Douillard et al. 2023, arXiv 2311.08105) over the data axis.

Each data replica keeps its own copy of the params and its own inner optimizer state and takes
`sync_every` (H) inner steps on its own batches with no communication. Then the replicas
average their parameter deltas (the pseudo-gradient Δ = θ_outer − θ_replica, one all-reduce)
and an outer optimizer (Nesterov SGD) steps θ_outer with it; every replica restarts from the
new θ_outer. Communication happens every H steps only.

`diloco(inner, outer, ...)` is an optax-style transformation whose state holds the
per-replica params and inner state (`PerReplica`, split over data, checkpointed) and the
outer state. The train state's `params` are θ_outer, the model that is evaluated and saved.
Its `update(local_grads, state, params=θ_outer)` must run inside `shard_map` over the data
axis, on gradients taken at `replica_params(state)`; it returns the outer update (zero
between synchronisations).

Post-local SGD (Lin et al. 2020, arXiv 1808.07217): with `local_start_step` S > 0 the first S
steps are synchronous data parallelism (the replicas' mean gradient, one all-reduce per step,
and the inner optimizer applied to θ_outer), and the local steps start from that model and
its optimizer state, as DiLoCo starts from a pretrained checkpoint. The synchronous phase
keeps the inner optimizer state like the params (`DiLoCoState.sync`); every synchronous step
also writes (θ_outer, that state) into each replica's slot, so the first local step begins
from it. The outer momentum starts at the switch.

With H=1, an inner optimizer that is linear in the gradient (SGD) and an outer SGD of
learning rate 1 without momentum, this is synchronous data-parallel SGD: θ_outer moves by
the mean of the replicas' updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbig.optim.per_replica import DATA_AXIS, PerReplica, local, replicate, stacked


class DiLoCoState(NamedTuple):
    count: jax.Array  # int32: inner steps taken (the same on every replica)
    replica: PerReplica  # (params, inner optimizer state), each leaf [N, ...]
    outer: optax.OptState  # the outer optimizer's state (Nesterov momentum), like the params
    sync: optax.OptState = optax.EmptyState()  # post-local SGD: the inner state while synchronous, like the params


class LocalSGD(NamedTuple):
    """An optax GradientTransformation, plus where the step must take its gradients."""

    init: Any
    update: Any
    replica_params: Any  # state -> this replica's params, inside shard_map


def diloco(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    *,
    sync_every: int,
    num_replicas: int,
    axis_name: str = DATA_AXIS,
    local_start_step: int = 0,
) -> LocalSGD:
    if sync_every < 1:
        raise ValueError(f"DiLoCo sync_every={sync_every} must be >= 1")
    if local_start_step < 0 or local_start_step % sync_every:
        raise ValueError(f"DiLoCo local_start_step={local_start_step} must be >= 0 and a multiple of sync_every={sync_every}")

    def init(params) -> DiLoCoState:
        inner_state = inner.init(params)
        return DiLoCoState(
            count=jnp.zeros((), jnp.int32),
            replica=replicate((params, inner_state), num_replicas),
            outer=outer.init(params),
            sync=inner_state if local_start_step else optax.EmptyState(),
        )

    def replica_params(state: DiLoCoState):
        return local(state.replica)[0]

    def update(local_grads, state: DiLoCoState, params):
        try:
            jax.lax.axis_size(axis_name)
        except NameError:
            raise ValueError(
                f"DiLoCo averages over mesh axis {axis_name!r}, which is not bound here; call its update inside "
                f"jax.shard_map over {axis_name!r} (jaxbig.train.dp_step does this)"
            ) from None
        if local_start_step:
            return jax.lax.cond(state.count < local_start_step, synchronous, local_steps, local_grads, state, params)
        return local_steps(local_grads, state, params)

    def synchronous(local_grads, state: DiLoCoState, params):
        # Replicas hold the outer params here, so their gradients are at θ_outer; their mean is the step's gradient.
        grads = jax.tree.map(lambda g: jax.lax.psum(g, axis_name) / num_replicas, local_grads)
        updates, sync_state = inner.update(grads, state.sync, params)
        fresh = optax.apply_updates(params, jax.lax.optimization_barrier(updates))  # as the step rounds it (see sync below)
        replica = jax.lax.pcast((fresh, sync_state), (axis_name,), to="varying")
        return updates, DiLoCoState(state.count + 1, stacked(replica), state.outer, sync_state)

    def local_steps(local_grads, state: DiLoCoState, params):
        replica, inner_state = local(state.replica)
        inner_updates, inner_state = inner.update(local_grads, inner_state, replica)
        replica = optax.apply_updates(replica, inner_updates)
        count = state.count + 1

        def sync(replica):
            delta = jax.tree.map(lambda o, r: o - r, params, replica)
            delta = jax.tree.map(lambda d: jax.lax.psum(d, axis_name) / num_replicas, delta)
            outer_updates, outer_state = outer.update(delta, state.outer, params)
            # The barrier keeps this add unfused, so it rounds exactly as the step's own apply_updates:
            # every replica restarts from bit-for-bit the new outer params.
            fresh = optax.apply_updates(params, jax.lax.optimization_barrier(outer_updates))
            fresh = jax.lax.pcast(fresh, (axis_name,), to="varying")
            return outer_updates, fresh, outer_state

        def carry_on(replica):
            return jax.tree.map(jnp.zeros_like, params), replica, state.outer

        outer_updates, replica, outer_state = jax.lax.cond(count % sync_every == 0, sync, carry_on, replica)
        return outer_updates, DiLoCoState(count, stacked((replica, inner_state)), outer_state, state.sync)

    return LocalSGD(init, update, replica_params)


def outer_nesterov(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """The DiLoCo outer optimizer: SGD with Nesterov momentum (plain SGD when momentum is 0)."""
    if momentum == 0:
        return optax.sgd(learning_rate)
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


class DelayedNesterovState(NamedTuple):
    count: jax.Array  # int32: pseudo-gradients received
    momentum: Any  # m, like the params: updated once every `delay` pushes
    buffer: Any  # sum of the pseudo-gradients since the last momentum update, like the params


def delayed_nesterov(learning_rate: float, momentum: float, delay: int) -> optax.GradientTransformation:
    """The outer optimizer of asynchronous local SGD: Delayed Nesterov (DN), Liu et al. 2024 (arXiv 2401.09135).

    Asynchronously arriving pseudo-gradients Δ come from workers that started at different versions;
    applying Nesterov momentum on every arrival accelerates stale directions, which the paper finds
    is what makes naive asynchronous local SGD lag its synchronous counterpart. DN applies each Δ at
    once as a plain step of 1/N of it, and folds the pushes into the momentum only every `delay` (N)
    of them (the paper's Algorithm 3 with its default c = 0):

        every push t:   buffer += Δ_t;   θ -= lr · Δ_t / N
        when t % N = 0: m = β·m + buffer / N;   θ -= lr · β · m;   buffer = 0

    So N pushes move θ by -lr·(mean Δ + β·m) with m = β·m + mean Δ: exactly one step of Nesterov SGD
    (optax.sgd(lr, β, nesterov=True)) on their mean, which is synchronous DiLoCo's outer step when the
    N pushes are the N workers' (the paper's footnote 5). With N = 1 it is Nesterov SGD on every push;
    with β = 0, plain SGD of lr/N on each pseudo-gradient. The paper sets N to the number of workers.
    """
    if delay < 1:
        raise ValueError(f"delayed Nesterov delay={delay} must be >= 1")

    def init(params) -> DelayedNesterovState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DelayedNesterovState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(delta, state: DelayedNesterovState, params=None):
        del params
        count = state.count + 1
        buffer = jax.tree.map(jnp.add, state.buffer, delta)
        fold = count % delay == 0  # this push completes N: the momentum takes the buffered mean and is applied
        momentum_new = jax.tree.map(lambda m, b: jnp.where(fold, momentum * m + b / delay, m), state.momentum, buffer)
        updates = jax.tree.map(lambda d, m: -learning_rate * (d / delay + jnp.where(fold, momentum * m, 0.0)), delta, momentum_new)
        buffer = jax.tree.map(lambda b: jnp.where(fold, jnp.zeros_like(b), b), buffer)
        return updates, DelayedNesterovState(count, momentum_new, buffer)

    return optax.GradientTransformation(init, update)
