"""Pipeline parallelism: GPipe and circular (interleaved) schedules under `jax.shard_map` with `ppermute`.

The model runs its stacked layers through a *layer runner*, `run(body, layers, x_BTD, side)`
(`jaxbig.models.layers`): `body(layer, x_BTD, side) -> x_BTD` applies one layer, `layers` is
the stacked params (leading axis L), `side` is per-row data every layer reads (the positions).
Without a pipeline the runner is `scan_layers`, a plain `lax.scan`; with `pipeline > 1` on the
mesh it is `pipeline_layers`, which runs the same body under a schedule. The model never names
a mesh axis; this module is the only place that knows the `pipeline` axis moves activations.

Letters: p stages (the mesh's pipeline axis), m microbatches, v repeats (virtual stages per
device, circular only), n = L / (p·v) layers per chunk, b = B/m rows per microbatch.

Layout of the stacked layers. Params stay in the model's natural order [L, ...] everywhere
(checkpoints, decoding on one device, resuming on another mesh), and the logical rule
`layers -> pipeline` splits them into p contiguous blocks: stage s holds layers
[s·L/p, (s+1)·L/p). The schedules run chunk c = r·p + s (layers [c·n, (c+1)·n)) on stage s in
repeat r:
- GPipe (v = 1): chunk s *is* stage s's block, so no param moves.
- circular (v > 1): stage s needs chunks s, p+s, 2p+s, ..., which live on other stages'
  blocks. At the start of the step `_stage_chunks` fetches them with ppermutes over
  `pipeline` (static pairs, no all-gather), and autodiff sends their grads back the same
  way. We pay that per-step traffic (L/p layers' params in, their grads out, per stage;
  memory stays at one block) rather than store layers in a schedule-dependent order,
  which would tie checkpoints to one (p, v) and make decoding and resuming on another
  mesh permute layers.

Microbatches. The batch [B] is sharded over (pipeline, data·fsdp) outside the pipeline (the
rule `activation_batch`), so the embedding and the head run data-parallel over the stages
too, with nothing computed twice. `_to_microbatches` is a bijection rows -> [m, b] chosen
so the reshape is communication-free: microbatch j sits on stage j // (m/p) and its b rows
stay split over data·fsdp. Stage 0 gathers the m microbatches with p-1 ppermutes, the last
stage's outputs go back to their home stage the same way, and the head and the loss run
outside on the restored [B] rows.

Schedule (one `lax.scan` iteration t = one pipeline step, T = v·m + p - 1 steps). Stage s
works on item k = t - s (microbatch k mod m, repeat k // m) when 0 <= k < v·m, else it is
idle (a bubble step: SPMD computes on garbage and throws it away). After each step every
stage sends its output one stage on with one ppermute; circular closes the ring, and stage
0 keeps a returning microbatch in a FIFO until its next repeat starts (m >= p makes it come
back in time). Gradients are plain autodiff of the scan: the transpose of a ppermute is the
reverse ppermute, so the backward runs the schedule in reverse ("all forward, all backward").

Remat. Each step's stage computation is `jax.checkpoint`ed with nothing saved inside, so
autodiff keeps only the stage's input per step (GPipe's re-materialisation: activations at
stage boundaries, one stage of one microbatch live during its backward). Without it the
scan would keep every layer's residuals for every step, bubble steps included:
(v·m + p - 1)/(v·m) times the activations of the stage's layers for the whole batch. The
model's own per-layer remat (`model.remat`) still applies inside the recomputation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxbig.config import Config, ConfigError, ParallelConfig
from jaxbig.models.layers import LayerBody, LayerRunner, scan_layers

AXIS = "pipeline"

# --------------------------------------------------------------------------- the timetable


def num_microbatches(parallel: ParallelConfig, stages: int) -> int:
    """parallel.microbatches, or 2 x stages when it is 0 (MaxText's advice: overlaps the ring hop)."""
    return parallel.microbatches or 2 * stages


def num_steps(p: int, m: int, v: int = 1) -> int:
    """Pipeline steps of one schedule: every stage works v·m steps, the last starts p-1 late."""
    return v * m + p - 1


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Idle share of the stage-steps: (p-1)/(m+p-1) for GPipe, (p-1)/(v·m+p-1) circular."""
    return (p - 1) / (v * m + p - 1)


def work(t, s, m: int, v: int):
    """(microbatch, repeat, busy) of stage s at step t; ints or traced arrays alike.

    Both the JAX schedule and `timetable` call this, so the test of the bubble formula
    counts the idle steps of the schedule that actually runs.
    """
    k = t - s
    return k % m, k // m, (k >= 0) & (k < v * m)


def timetable(p: int, m: int, v: int = 1) -> list[list[tuple[int, int] | None]]:
    """table[t][s] = (microbatch, repeat) stage s works on at step t, or None when idle.

    Replays the data movement of `pipeline_layers` with item labels instead of activations
    (stage 0 reads input t mod m, then the FIFO; the others read what the stage before sent
    at the step before) and raises AssertionError if a stage would compute on the wrong input.
    """
    table: list[list[tuple[int, int] | None]] = []
    incoming: list[tuple[int, int] | None] = [None] * p  # what each stage received at the end of the last step
    fifo: dict[int, tuple[int, int]] = {}  # stage 0's slot j: microbatch j back from the last stage
    for t in range(num_steps(p, m, v)):
        row: list[tuple[int, int] | None] = [None] * p
        for s in range(p):
            j, r, busy = work(t, s, m, v)
            if not busy:
                continue
            if s > 0:
                got = incoming[s]
            elif t < m:
                got = (t % m, 0)  # a fresh microbatch
            else:
                got = fifo.get(t % m)
                got = None if got is None else (got[0], got[1] + 1)  # it comes back for its next repeat
            assert got == (j, r), f"step {t}: stage {s} should work on microbatch {j}, repeat {r}, but its input is {got}"
            row[s] = (j, r)
        table.append(row)
        incoming = [None] + row[:-1]  # the ppermute one stage on
        last = row[-1]
        if v > 1 and last is not None and last[1] < v - 1:
            fifo[last[0]] = last
    ran = sorted(cell for row in table for cell in row if cell is not None)
    assert ran == sorted((j, r) for j in range(m) for r in range(v) for _ in range(p)), "an item skipped a stage"
    return table


def idle_steps(table: list[list[tuple[int, int] | None]]) -> int:
    return sum(cell is None for row in table for cell in row)


# --------------------------------------------------------------------------- validation


def check_pipeline(cfg: Config, mesh_shape: Mapping[str, int]) -> None:
    """Raises a ConfigError naming the numbers when the model, batch or schedule do not fit the stages."""
    p = mesh_shape.get(AXIS, 1)
    if p == 1:
        return
    par, L, B = cfg.parallel, cfg.model.num_layers, cfg.train.batch_size
    v, m = par.repeats, num_microbatches(par, p)
    if L % (p * v):
        raise ConfigError(
            f"model.num_layers={L} is not divisible by pipeline stages x repeats = {p} x {v} = {p * v}; "
            f"use a multiple of {p * v} layers or change mesh.pipeline / parallel.repeats"
        )
    if par.schedule == "circular" and m < p:
        raise ConfigError(
            f"parallel.microbatches={m} is fewer than the {p} pipeline stages; the circular schedule needs "
            f"microbatches >= stages so each microbatch is back at stage 0 before its next repeat (use {p} or more)"
        )
    if m % p:
        raise ConfigError(
            f"parallel.microbatches={m} is not a multiple of the {p} pipeline stages; each stage holds m/p of the "
            f"microbatches' inputs and outputs (use {p * max(1, round(m / p))}, or 0 for 2 x stages = {2 * p})"
        )
    dp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if B % (dp * m):
        raise ConfigError(
            f"train.batch_size={B} is not divisible by data x fsdp x microbatches = {mesh_shape.get('data', 1)} x "
            f"{mesh_shape.get('fsdp', 1)} x {m} = {dp * m}; use a multiple of {dp * m} or fewer parallel.microbatches"
        )


def layer_runner(mesh: Mesh, parallel: ParallelConfig) -> LayerRunner:
    """`scan_layers` on a mesh without pipeline stages, else the configured schedule over them."""
    p = mesh.shape.get(AXIS, 1)
    if p == 1:
        return scan_layers
    return functools.partial(pipeline_layers, mesh=mesh, microbatches=num_microbatches(parallel, p), repeats=parallel.repeats)


# --------------------------------------------------------------------------- the schedule


def _to_microbatches(a: jax.Array, m: int, p: int, dp: int) -> jax.Array:
    """[B, ...] -> [m, b, ...]: row (s, d, i, j) of the (pipeline, data·fsdp, b/dp, m/p) view -> microbatch (s, j), row (d, i).

    Under the batch sharding (pipeline major, data·fsdp minor) this is a local reshape: the
    microbatches land split over pipeline and each microbatch's rows over data·fsdp.
    """
    B, rest = a.shape[0], a.shape[1:]
    a = a.reshape(p, dp, B // (dp * m), m // p, *rest)
    a = a.transpose(0, 3, 1, 2, *range(4, a.ndim))
    return a.reshape(m, B // m, *rest)


def _from_microbatches(a: jax.Array, p: int, dp: int) -> jax.Array:
    """Inverse of `_to_microbatches`: [m, b, ...] -> [B, ...]."""
    m, b, rest = a.shape[0], a.shape[1], a.shape[2:]
    a = a.reshape(p, m // p, dp, b // dp, *rest)
    a = a.transpose(0, 2, 3, 1, *range(4, a.ndim))
    return a.reshape(m * b, *rest)


def _stage_chunks(w: jax.Array, p: int, v: int) -> jax.Array:
    """This stage's block [v·n, ...] (natural chunks s·v + q) -> [v, n, ...] with chunk r·p + s at r.

    Inside the shard_map, with static indices only: for each repeat r and source slot q, one
    ppermute carries chunk c = r·p + s from stage c // v (its slot c mod v) to every stage s
    whose chunk sits in slot q; the other stages receive zeros. Each stage receives its v
    chunks once; a chunk already on its stage is kept without a collective. GPipe (v = 1)
    needs no exchange.
    """
    chunks = w.reshape(v, w.shape[0] // v, *w.shape[1:])
    if v == 1:
        return chunks
    stage = lax.axis_index(AXIS)
    out = []
    for r in range(v):
        got = []
        for q in range(v):
            pairs = [((r * p + s) // v, s) for s in range(p) if (r * p + s) % v == q]
            moving = [(a, b) for a, b in pairs if a != b]
            staying = [b for a, b in pairs if a == b]
            if moving:
                got.append(lax.ppermute(chunks[q], AXIS, moving))
            if staying:  # the chunk is already on its stage: no collective
                keep = functools.reduce(jnp.logical_or, [stage == b for b in staying])
                got.append(jnp.where(keep, chunks[q], jnp.zeros_like(chunks[q])))
        out.append(functools.reduce(jnp.add, got))
    return jnp.stack(out)


def _stage(body: LayerBody, stage_w: Any, r: jax.Array, x: jax.Array, side: Any) -> jax.Array:
    """One stage step: the n layers of chunk r of this stage's params [v, n, ...]."""
    chunk = jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, r, 0, keepdims=False), stage_w)
    return scan_layers(body, chunk, x, side)


def pipeline_layers(body: LayerBody, layers: Any, x_BTD: jax.Array, side: Any, *, mesh: Mesh, microbatches: int, repeats: int = 1) -> jax.Array:
    """The layers run as a GPipe (repeats=1) or circular (repeats>1) schedule over the mesh's pipeline axis.

    Same result as `scan_layers(body, layers, x_BTD, side)`; `side` leaves are per-row [B, ...], or
    [1, ...] when shared by all rows (broadcast to [B, ...] here, before the split into microbatches).
    Runs under `jax.shard_map` manual over `pipeline` only: data, fsdp and tensor stay automatic,
    so the layer body keeps its tensor-parallel and batch shardings.
    """
    p, m, v = mesh.shape[AXIS], microbatches, repeats
    dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    chunk_of = m // p  # microbatches each stage holds before and after the schedule
    xs = _to_microbatches(x_BTD, m, p, dp)  # [m, b, T, D]
    B = x_BTD.shape[0]
    sides = jax.tree.map(lambda a: _to_microbatches(jnp.broadcast_to(a, (B, *a.shape[1:])), m, p, dp), side)
    stage_fn = jax.checkpoint(functools.partial(_stage, body), policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    # GPipe only shifts forward; circular closes the ring so the last stage feeds stage 0.
    shift = [(i, i + 1) for i in range(p - 1)] + ([(p - 1, 0)] if v > 1 else [])

    def local(stage_w, xs_local, sides):
        # stage_w: [L/p, ...] this stage's block; xs_local: [m/p, b, T, D] its share; sides: [m, b, ...] on every stage.
        stage_w = jax.tree.map(lambda w: _stage_chunks(w, p, v), stage_w)  # [v, n, ...]
        s = lax.axis_index(AXIS)
        # Stage 0 collects every microbatch (the others' copies are zeros and never read).
        xs = jnp.concatenate([xs_local] + [lax.ppermute(xs_local, AXIS, [(i, 0)]) for i in range(1, p)], axis=0)

        def step(carry, t):
            incoming, fifo, outs = carry
            j, r, busy = work(t, s, m, v)
            fresh = lax.dynamic_index_in_dim(xs, t % m, 0, keepdims=False)
            if v > 1:  # from the second repeat on, stage 0 takes the microbatch back from the FIFO
                fresh = jnp.where(t < m, fresh, lax.dynamic_index_in_dim(fifo, t % m, 0, keepdims=False))
            x = jnp.where(s == 0, fresh, incoming)
            side_j = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, j, 0, keepdims=False), sides)
            y = stage_fn(stage_w, jnp.clip(r, 0, v - 1), x, side_j)
            finished = busy & (s == p - 1) & (r == v - 1)  # microbatch j has been through every layer
            outs = lax.dynamic_update_index_in_dim(outs, jnp.where(finished, y, outs[j]), j, 0)
            incoming = lax.ppermute(y, AXIS, shift)
            if v > 1:  # stage 0 has just received the last stage's microbatch jl: keep it for its next repeat
                jl, rl, busy_l = work(t, p - 1, m, v)
                keep = (s == 0) & busy_l & (rl < v - 1)
                fifo = lax.dynamic_update_index_in_dim(fifo, jnp.where(keep, incoming, fifo[jl]), jl, 0)
            return (incoming, fifo, outs), None

        # The carries vary over stages (check_vma): zeros_like of the stage-varying inputs are.
        zeros = jnp.zeros_like(xs)
        fifo = zeros if v > 1 else zeros[:0]
        carry = (zeros[0], fifo, zeros)
        (_, _, outs), _ = lax.scan(step, carry, jnp.arange(num_steps(p, m, v)))
        # Every stage takes its share of the outputs back from the last stage.
        mine = outs[(p - 1) * chunk_of :]
        for i in range(p - 1):
            got = lax.ppermute(outs[i * chunk_of : (i + 1) * chunk_of], AXIS, [(p - 1, i)])
            mine = jnp.where(s == i, got, mine)
        return mine

    ys = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS), P()),
        out_specs=P(AXIS),
        axis_names={AXIS},
    )(layers, xs, sides)
    return _from_microbatches(ys, p, dp)


__all__ = [
    "bubble_fraction",
    "check_pipeline",
    "idle_steps",
    "layer_runner",
    "num_microbatches",
    "num_steps",
    "pipeline_layers",
    "timetable",
    "work",
]
