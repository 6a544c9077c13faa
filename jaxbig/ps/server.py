"""A parameter-server shard (a Ray actor): the global params of its param groups, their optimizer state, the version.

Pushes are applied in arrival order (a Ray actor runs one call at a time). What a push holds and which
optimizer applies it depend on `ps.algorithm`:
- async_sgd: a gradient (clipped by the worker); the run's own optimizer (`optim.optimizer`, its schedule
  counted in server versions) applies it. With `ps.max_staleness=0` and several workers the server runs
  synchronous rounds: it waits for one gradient from every worker, averages them and applies the mean once,
  which is synchronous data-parallel SGD over the workers' batches.
- async_local_sgd: a pseudo-gradient Δ = θ_pulled - θ_after_H_local_steps, applied by delayed Nesterov
  (`jaxbig.optim.local_sgd.delayed_nesterov`) with `optim.outer_learning_rate` and `optim.outer_momentum`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbig.config import Config
from jaxbig.optim import base_optimizer, learning_rate_schedule
from jaxbig.optim.local_sgd import delayed_nesterov
from jaxbig.optim.push_compression import Payload
from jaxbig.models.paths import Flat, nest, to_flat
from jaxbig.ps.setup import push_codec


def synchronous_rounds(cfg: Config) -> bool:
    """Whether the server averages one push per worker before applying (async_sgd with max_staleness=0)."""
    return cfg.ps.algorithm == "async_sgd" and cfg.ps.max_staleness == 0 and cfg.ps.workers > 1


def server_optimizer(cfg: Config) -> optax.GradientTransformation:
    """What the server applies pushes with (see the module docstring)."""
    if cfg.ps.algorithm == "async_sgd":
        updates = cfg.train.steps // cfg.ps.workers if synchronous_rounds(cfg) else cfg.train.steps
        return base_optimizer(cfg.optim, learning_rate_schedule(cfg.optim, updates))
    return delayed_nesterov(cfg.optim.outer_learning_rate, cfg.optim.outer_momentum, cfg.ps.momentum_delay or cfg.ps.workers)


class ServerShard:
    """Holds the params named in `params` (a `Flat` of host arrays) and applies pushes to them."""

    def __init__(self, cfg: Config, params: Flat, *, opt_state: Any = None, version: int = 0):
        self.tx = server_optimizer(cfg)
        self.params = nest({n: jnp.asarray(v) for n, v in params.items()})
        self.opt_state = self.tx.init(self.params) if opt_state is None else jax.tree.map(jnp.asarray, opt_state)
        self.codec = push_codec(cfg)
        self.version = version
        self.round_size = cfg.ps.workers if synchronous_rounds(cfg) else 1
        self.pending: dict | None = None  # synchronous rounds: the sum of this round's pushes
        self.pending_count = 0
        self.applied: dict[int, tuple[int, int]] = {}  # worker -> (its clock, the version its push was applied on)
        self._apply = jax.jit(self._apply_update, donate_argnums=(0, 1))

    def _apply_update(self, params, opt_state, update):
        updates, opt_state = self.tx.update(update, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def pull(self) -> tuple[int, Flat]:
        """(version, params as host arrays by name)."""
        return self.version, {n: np.asarray(v) for n, v in to_flat(self.params).items()}

    def push(self, worker: int, clock: int, payload: Payload) -> tuple[int, int]:
        """Applies a worker's push (or, in synchronous rounds, adds it to the round); returns (the version it was
        applied on, the version after it).

        A push repeated with the same (worker, clock), by a worker retrying after a failure, is applied once.
        """
        if self.applied.get(worker, (-1, 0))[0] == clock:
            return self.applied[worker][1], self.version
        update = nest(self.codec.decode(payload))
        base = self.version
        if self.round_size == 1:
            self.params, self.opt_state = self._apply(self.params, self.opt_state, update)
            self.version += 1
        else:
            self.pending = update if self.pending is None else jax.tree.map(jnp.add, self.pending, update)
            self.pending_count += 1
            if self.pending_count == self.round_size:
                mean = jax.tree.map(lambda g: g / self.round_size, self.pending)
                self.params, self.opt_state = self._apply(self.params, self.opt_state, mean)
                self.version += 1
                self.pending, self.pending_count = None, 0
        self.applied[worker] = (clock, base)
        return base, self.version

    def state(self) -> tuple[Flat, Any, int]:
        """(params, optimizer state, version) on the host, for a checkpoint; call when no round is half applied."""
        return self.pull()[1], jax.device_get(self.opt_state), self.version


__all__ = ["ServerShard", "server_optimizer", "synchronous_rounds"]
