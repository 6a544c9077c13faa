"""A parameter-server worker (a Ray actor): its own devices, the run's jitted step, one round per call.

A round: pull the params from every server shard, compute on this worker's batches, push the result
(compressed, with this worker's error feedback) to every shard. What it computes (`ps.algorithm`):
- async_sgd: one batch; the gradient half of the run's train step (`jaxbig.train.step.make_grad_step`,
  clipped as the run's optimizer would), pushed as it is;
- async_local_sgd: H batches through the run's own jitted train step (`jaxbig.train.setup.build`), from the
  pulled params with this worker's inner optimizer state, which persists across rounds as in Liu et al. 2024;
  the pushed pseudo-gradient is θ_pulled - θ_H.

The worker's process was started with only its own devices (`jaxbig.ps.cluster.worker_env`), so the mesh
section lays out `ps.devices_per_worker` devices. `ps.worker_slowdown` f makes it sleep (f-1) x its
measured compute time after each step: a slower device, emulated.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import ray

from jaxbig.config import Config
from jaxbig.data import load_corpus
from jaxbig.data.pipeline import to_global, train_dataset
from jaxbig.models.paths import nest, to_flat
from jaxbig.ps.setup import push_codec, worker_run
from jaxbig.train.state import TrainState
from jaxbig.train.step import make_grad_step
from jaxbig.xla_options import enable_compilation_cache


def batch_index(step: int, worker: int, workers: int) -> int:
    """The global batch a worker's `step`-th batch is: workers interleave, so one worker reads the synchronous run's batches."""
    return step * workers + worker


class Worker:
    def __init__(self, cfg: Config, index: int, shards: list, groups: list[list[str]]):
        enable_compilation_cache(cfg.compile.cache_dir)
        self.cfg, self.index, self.shards, self.groups = cfg, index, shards, groups
        self.slowdown = cfg.ps.slowdown(index)
        self.run = worker_run(cfg, jax.devices()[: cfg.ps.devices_per_worker])
        B, T = cfg.train.batch_size, cfg.data.seq_len
        corpus = load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes)
        self.data = train_dataset(corpus.train_BYTES, T, B, cfg.train.seed, np.arange(B), cfg.data.shuffle)
        self.codec = push_codec(cfg)
        self.push_state = self.codec.init()
        self.opt_state = None  # async_local_sgd: the inner optimizer's state, kept across rounds
        if cfg.ps.algorithm == "async_sgd":
            step = make_grad_step(self.run.graphdef, self.run.run_layers, accumulate_steps=cfg.optim.accumulate_steps, grad_clip=cfg.optim.grad_clip)
            batch_sharding = {k: self.run.batch_sharding for k in ("inputs", "targets")}
            params = self.run.shardings.params
            self.grad_step = jax.jit(step, in_shardings=(params, batch_sharding), out_shardings=(params, None), compiler_options=self.run.compiler_options)
        self._warm_up()

    def _warm_up(self) -> None:
        """Compiles the step now, with one step on the first batch from the initial params, discarded: the
        driver's first round, and the rounds a benchmark times, then measure training, not compilation."""
        with self.run.context():
            state = self.run.init()
            batch = self._batch(0)
            if self.cfg.ps.algorithm == "async_sgd":
                jax.block_until_ready(self.grad_step(state.params, batch))
            else:
                jax.block_until_ready(self.run.train_step(state, batch))

    def pid(self) -> int:
        return os.getpid()

    def _batch(self, index: int):
        return to_global(self.data[index], self.run.batch_sharding, self.cfg.train.batch_size)

    def _timed(self, fn, *args):
        """fn(*args), finished, then the emulated slowdown; returns (result, seconds of compute + slowdown)."""
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        compute = time.perf_counter() - t
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * compute)
        return out, time.perf_counter() - t

    def round(self, clock: int, schedule_step: int, indices: list[int]) -> dict:
        """Pull, compute on the global batches `indices`, push; returns the round's record."""
        t0 = time.perf_counter()
        pulls = ray.get([s.pull.remote() for s in self.shards])
        version = pulls[0][0]
        pulled = {n: v for _, part in pulls for n, v in part.items()}
        bytes_pulled = sum(v.nbytes for v in pulled.values())
        params = jax.device_put(nest(pulled), self.run.shardings.params)
        losses, busy = [], 0.0
        with self.run.context():
            if self.cfg.ps.algorithm == "async_sgd":
                (grads, metrics), busy = self._timed(self.grad_step, params, self._batch(indices[0]))
                losses.append(float(metrics["loss"]))
                update = to_flat(jax.device_get(grads))
            else:
                if self.opt_state is None:  # the first round (or the first after a restart): a fresh inner optimizer
                    self.opt_state = self.run.init_from_params(params).opt_state
                # The inner schedule follows the run's progress (steps of all workers), not this worker's own count.
                step = jax.device_put(jnp.int32(schedule_step), self.run.shardings.step)
                state = TrainState(step=step, params=params, opt_state=self.opt_state)
                for index in indices:
                    (state, metrics), seconds = self._timed(self.run.train_step, state, self._batch(index))
                    losses.append(float(metrics["loss"]))
                    busy += seconds
                self.opt_state = state.opt_state
                update = {n: pulled[n] - v for n, v in to_flat(jax.device_get(state.params)).items()}
        payload, self.push_state = self.codec.encode(update, self.push_state)
        applied = ray.get([s.push.remote(self.index, clock, {n: payload[n] for n in g}) for s, g in zip(self.shards, self.groups)])
        return {
            "worker": self.index,
            "clock": clock,
            "steps": len(indices),
            "loss": float(np.mean(losses)),
            "version_pulled": version,
            "staleness": applied[0][0] - version,  # server updates applied between this round's pull and its push
            "version": applied[0][1],  # the server's version after the push
            "bytes_pushed": self.codec.nbytes(payload),
            "bytes_pulled": bytes_pulled,
            "speed": len(indices) / busy,  # steps/s of compute (slowdown included), what DyLU scales H by
            "round_s": time.perf_counter() - t0,
            "pid": os.getpid(),
        }


__all__ = ["Worker", "batch_index"]
