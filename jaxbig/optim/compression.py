"""Gradient compression over the data axis, as optax transformations that do the communication.

Under `jit`, the gradient all-reduce of data parallelism is inserted by autodiff, inside
`grad`, so an optax transform applied afterwards compresses nothing. These transforms are
meant for a step that takes *local* gradients under `shard_map` over the data axis (params
cast to varying, see `jaxbig.train.dp_step`): `update(local_grads, state)` must run inside
that `shard_map`. It compresses, runs its own collectives, decompresses, and returns the
aggregated gradient, the same on every replica. Put it first in an `optax.chain`; any
optimizer can follow.

Convention: each replica's gradient is its *share* of the global gradient (its loss is
normalised by the global batch), so the exact aggregate is the sum over replicas, a `psum`.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression dropped on a
replica is kept in a residual and added to that replica's next gradient. Residuals differ per
replica, so they are `PerReplica` state `[N, ...]` split over the data axis, and are
checkpointed with the rest of the optimizer state.

| method   | collectives (payload per replica)                        | bytes vs f32 all-reduce |
|----------|----------------------------------------------------------|-------------------------|
| none     | all-reduce f32                                           | 1                       |
| bf16     | all-to-all + all-gather of 16-bit words                  | ~1/2                    |
| int8     | all-to-all + all-gather of mu-law int8, f32 scale / block | ~1/4                   |
| topk     | all-gather of k values (f32) and indices (int32)         | ~N·fraction             |
| powersgd | all-reduce of P [n, r] and Q [m, r] per matrix, per iteration | ~(n+m)r·iterations / (nm) |
| sign     | all-gather of packed sign bits and per-tensor scales     | ~N/64                   |

`after_exact_steps` (`optim.compression_start_step`) sends the exact all-reduce for a number of
steps first and switches to any of these in the compiled step (a `lax.cond`).

The 16-bit words are bf16 values bit-cast to uint16: XLA's CPU backend computes bf16
collectives in f32 (4 bytes on the wire), while all-to-all and all-gather only move bits.
Under tensor parallelism (`shard_specs`), bf16, int8, topk and sign work on each device's own
tensor shard (top-k: the largest entries of each shard).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbig.config import ConfigError
from jaxbig.optim.per_replica import DATA_AXIS, PerReplica, local, replicate, stacked

INT8_BLOCK = 256  # entries sharing one int8 scale: 4 bytes of scale per 256 bytes of payload


class CompressionError(ConfigError):
    """A compression setting does not fit the params or the mesh; the message names the fix."""


class ErrorFeedbackState(NamedTuple):
    residual: Any  # PerReplica([N, *param.shape] per param), or optax.EmptyState() without error feedback


class PowerSGDState(NamedTuple):
    residual: Any  # as ErrorFeedbackState.residual
    q: dict[str, jax.Array]  # per matrix group: the shared right factors [matrices, m, rank], warm-starting the next step


class MatrixView(NamedTuple):
    """How PowerSGD sees a param as matrices: which axes index separate matrices, form rows, form columns.

    Params with the same `group` and the same batch and row sizes are concatenated along the
    columns into one matrix (one P, one Q). None as a view sends the param uncompressed.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    group: str | None = None
    batch: tuple[int, ...] = ()  # e.g. the stacked layers: one matrix per layer


# --------------------------------------------------------------------------- shared pieces


def _check_axis(axis_name: str, method: str) -> int:
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"compression {method!r} communicates over mesh axis {axis_name!r}, which is not bound here; call its update "
            f"inside jax.shard_map over {axis_name!r} on local gradients (jaxbig.train.dp_step does this)"
        ) from None


def _init_residual(params, num_replicas: int, error_feedback: bool):
    if not error_feedback:
        return optax.EmptyState()
    return replicate(jax.tree.map(jnp.zeros_like, params), num_replicas)


def _add_residual(grads, residual):
    if isinstance(residual, PerReplica):
        return jax.tree.map(jnp.add, grads, local(residual))
    return grads


def _new_residual(residual, errors):
    return stacked(errors) if isinstance(residual, PerReplica) else residual


def _flatten(tree) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """All leaves as one float32 vector, and the function that cuts such a vector back into the tree."""
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [x.shape for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])

    def unflatten(v: jax.Array):
        parts, start = [], 0
        for shape, size, x in zip(shapes, sizes, leaves):
            parts.append(v[start : start + size].reshape(shape).astype(x.dtype))
            start += size
        return jax.tree.unflatten(treedef, parts)

    return flat, unflatten


def _leaf_sizes(tree) -> list[int]:
    return [math.prod(x.shape) for x in jax.tree.leaves(tree)]


def exact(axis_name: str = DATA_AXIS) -> optax.GradientTransformation:
    """No compression: a float32 psum, the same all-reduce plain data parallelism does."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        _check_axis(axis_name, "none")
        return jax.lax.psum(updates, axis_name), state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- bf16 and int8: two-phase sum


def _bf16_encode(x):
    return (jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16),)


def _bf16_decode(payload):
    return jax.lax.bitcast_convert_type(payload[0], jnp.bfloat16).astype(jnp.float32)


_MU = 255.0  # mu-law companding: int8 codes spaced for ~constant relative precision over 2.5 decades


def _int8_encode(x):
    """[..., C] -> (int8 [..., C], float32 scales [..., C / INT8_BLOCK]): mu-law codes of x / absmax per block.

    Linear codes would flush every entry below 1/254 of its block's largest to 0; Adam then
    sees those entries as rare error-feedback spikes. mu-law keeps ~4% relative precision
    from the block's largest entry down to ~1/300 of it.
    """
    blocks = x.reshape(*x.shape[:-1], -1, INT8_BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=-1)
    scale = jnp.where(scale > 0, scale, 1.0)
    y = blocks / scale[..., None]
    code = jnp.sign(y) * jnp.log1p(_MU * jnp.abs(y)) / math.log1p(_MU)
    q = jnp.clip(jnp.round(code * 127.0), -127, 127).astype(jnp.int8)
    return q.reshape(x.shape), scale


def _int8_decode(payload):
    q, scale = payload
    code = q.reshape(*q.shape[:-1], -1, INT8_BLOCK).astype(jnp.float32) / 127.0
    y = jnp.sign(code) * jnp.expm1(jnp.abs(code) * math.log1p(_MU)) / _MU
    return (y * scale[..., None]).reshape(q.shape)


def _per_shard_method(method: str, core, num_replicas: int, axis_name: str, error_feedback: bool, shard_specs) -> optax.GradientTransformation:
    """A compressor whose `core(x) -> (aggregate, local error)` sees the gradient tree (plus residual).

    With `shard_specs` (PartitionSpecs like the params' over the other mesh axes, e.g. tensor),
    `core` runs under a nested `shard_map` over those axes: each device flattens and sends
    only its own shard, so tensor parallelism does not multiply the data-axis traffic.
    """
    specs = jax.tree.leaves(shard_specs, is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec))
    split = [{a for entry in spec for a in (entry if isinstance(entry, tuple) else (entry,)) if a} for spec in specs]
    axes = set().union(*split)
    if axis_name in axes:
        raise CompressionError(f"shard_specs may not split gradients over {axis_name!r}, the axis compression reduces over")

    def init(params):
        return ErrorFeedbackState(_init_residual(params, num_replicas, error_feedback))

    def update(updates, state, params=None):
        del params
        _check_axis(axis_name, method)
        x = _add_residual(updates, state.residual)
        if not axes:
            total, err = core(x)
            return total, ErrorFeedbackState(_new_residual(state.residual, err))
        # Split leaves go through the nested shard_map, shard by shard. Leaves replicated over the
        # other axes are compressed on their own, so every copy of them computes the same bits.
        leaves, treedef = jax.tree.flatten(x)
        if len(leaves) != len(split):
            raise CompressionError(f"shard_specs cover {len(split)} tensors but the gradients have {len(leaves)}")
        sharded = [i for i, a in enumerate(split) if a]
        whole = [i for i, a in enumerate(split) if not a]
        in_specs = [specs[i] for i in sharded]
        nested = jax.shard_map(core, in_specs=(in_specs,), out_specs=(in_specs, in_specs), axis_names=axes)
        total, err = [None] * len(leaves), [None] * len(leaves)
        for idx, fn in ((sharded, nested), (whole, core)):
            if idx:
                t, e = fn([leaves[i] for i in idx])
                for i, ti, ei in zip(idx, t, e):
                    total[i], err[i] = ti, ei
        total, err = jax.tree.unflatten(treedef, total), jax.tree.unflatten(treedef, err)
        return total, ErrorFeedbackState(_new_residual(state.residual, err))

    return optax.GradientTransformation(init, update)


def _two_phase_core(encode, decode, block: int, axis_name: str):
    """Reduce-scatter then all-gather, each moving encoded chunks (ZeRO++ qgZ style).

    Phase 1: each replica encodes its gradient in N chunks and all-to-alls them, so replica d
    receives everyone's chunk d, decodes and sums it in float32. Phase 2: replica d encodes its
    summed chunk and all-gathers it. A replica's error is its phase-1 encoding error, plus,
    for the owner of chunk d, that chunk's phase-2 error: with error feedback every dropped
    bit re-enters the next step's sum exactly once.
    """

    def core(tree):
        n = jax.lax.axis_size(axis_name)
        x, unflatten = _flatten(tree)
        size = x.shape[0]
        chunk = -(-size // (n * block)) * block
        x_NC = jnp.pad(x, (0, n * chunk - size)).reshape(n, chunk)
        sent = encode(x_NC)
        received = jax.tree.map(lambda a: jax.lax.all_to_all(a, axis_name, 0, 0), sent)
        mine_C = decode(received).sum(axis=0)  # chunk d summed over replicas, on replica d
        mine_enc = encode(mine_C[None])
        gathered = jax.tree.map(lambda a: jax.lax.all_gather(a[0], axis_name, to="invarying"), mine_enc)
        total = decode(gathered).reshape(-1)[:size]
        err1 = x_NC - decode(sent)
        d = jax.lax.axis_index(axis_name)
        err = jax.lax.dynamic_update_index_in_dim(err1, err1[d] + mine_C - decode(mine_enc)[0], d, axis=0)
        return unflatten(total), unflatten(err.reshape(-1)[:size])

    return core


def bf16(num_replicas: int, *, axis_name: str = DATA_AXIS, error_feedback: bool = True, shard_specs=None) -> optax.GradientTransformation:
    """The gradient sum in bfloat16 on the wire (two phases), float32 arithmetic."""
    core = _two_phase_core(_bf16_encode, _bf16_decode, 1, axis_name)
    return _per_shard_method("bf16", core, num_replicas, axis_name, error_feedback, shard_specs)


def int8(num_replicas: int, *, axis_name: str = DATA_AXIS, error_feedback: bool = True, shard_specs=None) -> optax.GradientTransformation:
    """The gradient sum in int8 on the wire (two phases), absmax scales per block of 256."""
    core = _two_phase_core(_int8_encode, _int8_decode, INT8_BLOCK, axis_name)
    return _per_shard_method("int8", core, num_replicas, axis_name, error_feedback, shard_specs)


# --------------------------------------------------------------------------- top-k


def topk(
    fraction: float, num_replicas: int, *, axis_name: str = DATA_AXIS, error_feedback: bool = True, shard_specs=None
) -> optax.GradientTransformation:
    """Each replica sends the largest-magnitude `fraction` of every tensor's entries (values and int32 indices)."""
    if not 0 < fraction <= 1:
        raise CompressionError(f"top-k fraction {fraction} must be in (0, 1] (optim.topk_fraction)")

    def core(tree):
        flat, unflatten = _flatten(tree)
        values, indices, start = [], [], 0
        for size in _leaf_sizes(tree):
            leaf = flat[start : start + size]
            _, idx = jax.lax.top_k(jnp.abs(leaf), max(1, math.ceil(fraction * size)))
            values.append(leaf[idx])
            indices.append(idx.astype(jnp.int32) + start)
            start += size
        values_K, indices_K = jnp.concatenate(values), jnp.concatenate(indices)
        all_values = jax.lax.all_gather(values_K, axis_name, to="invarying")
        all_indices = jax.lax.all_gather(indices_K, axis_name, to="invarying")
        total = jnp.zeros(flat.shape, flat.dtype).at[all_indices.reshape(-1)].add(all_values.reshape(-1))
        return unflatten(total), unflatten(flat.at[indices_K].set(0.0))

    return _per_shard_method("topk", core, num_replicas, axis_name, error_feedback, shard_specs)


# --------------------------------------------------------------------------- sign (1 bit)


def sign(num_replicas: int, *, axis_name: str = DATA_AXIS, error_feedback: bool = True, shard_specs=None) -> optax.GradientTransformation:
    """EF-signSGD: each replica sends sign bits (8 per byte) and one scale per tensor, mean(|x|)."""

    def core(tree):
        flat, unflatten = _flatten(tree)
        sizes = _leaf_sizes(tree)
        size = flat.shape[0]
        bounds = [0, *itertools.accumulate(sizes)]
        scales = jnp.stack([jnp.mean(jnp.abs(flat[a:b])) for a, b in zip(bounds[:-1], bounds[1:])])
        positive = flat >= 0
        bits = jnp.pad(positive, (0, -size % 8)).reshape(-1, 8).astype(jnp.uint8)
        packed = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8)[None, :], axis=-1, dtype=jnp.uint8)
        all_packed = jax.lax.all_gather(packed, axis_name, to="invarying")  # [N, S/8]
        all_scales = jax.lax.all_gather(scales, axis_name, to="invarying")  # [N, tensors]
        all_bits = (all_packed[:, :, None] >> jnp.arange(8, dtype=jnp.uint8)[None, None, :]) & 1
        signs_NS = all_bits.reshape(all_bits.shape[0], -1)[:, :size].astype(jnp.float32) * 2.0 - 1.0
        all_scale_NS = jnp.concatenate([jnp.broadcast_to(all_scales[:, t, None], (all_scales.shape[0], n)) for t, n in enumerate(sizes)], axis=1)
        total = jnp.sum(signs_NS * all_scale_NS, axis=0)
        scale_S = jnp.concatenate([jnp.broadcast_to(scales[t], (n,)) for t, n in enumerate(sizes)])
        return unflatten(total), unflatten(flat - jnp.where(positive, scale_S, -scale_S))

    return _per_shard_method("sign", core, num_replicas, axis_name, error_feedback, shard_specs)


# --------------------------------------------------------------------------- PowerSGD


def default_view(x) -> MatrixView | None:
    """A param as [first axis, the rest]; vectors and scalars uncompressed."""
    return MatrixView(rows=(0,), cols=tuple(range(1, x.ndim))) if x.ndim >= 2 else None


def _sizes(shape: tuple[int, ...], view: MatrixView) -> tuple[int, int, int]:
    """(matrices, rows, columns) of a param of `shape` under `view`."""
    return tuple(math.prod(shape[a] for a in axes) for axes in (view.batch, view.rows, view.cols))


def _to_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
    """[..] -> [b, n, m]."""
    b, n, m = _sizes(x.shape, view)
    return jnp.transpose(x, view.batch + view.rows + view.cols).reshape(b, n, m)


def _from_matrix(m: jax.Array, view: MatrixView, shape: tuple[int, ...]) -> jax.Array:
    order = view.batch + view.rows + view.cols
    x = m.reshape([shape[a] for a in order])
    return jnp.transpose(x, [order.index(a) for a in range(len(shape))])


def _groups(params, views) -> dict[str, list[int]]:
    """Group name -> indices of the leaves (in tree order) concatenated into that group's matrix."""
    leaves = jax.tree.leaves(params)
    view_leaves = jax.tree.leaves(views, is_leaf=lambda v: v is None or isinstance(v, MatrixView))
    if len(view_leaves) != len(leaves):
        raise CompressionError(f"PowerSGD views cover {len(view_leaves)} tensors but the params have {len(leaves)}")
    groups: dict[str, list[int]] = {}
    for i, (x, view) in enumerate(zip(leaves, view_leaves)):
        if view is None:
            continue
        b, n, _ = _sizes(x.shape, view)
        name = f"{view.group}:{b}x{n}" if view.group is not None else f"tensor{i:03d}"
        groups.setdefault(name, []).append(i)
    return groups


def powersgd(
    rank: int,
    num_replicas: int,
    *,
    views: Any = None,
    axis_name: str = DATA_AXIS,
    error_feedback: bool = True,
    iterations: int = 1,
    seed: int = 0,
) -> optax.GradientTransformation:
    """PowerSGD (Vogels et al. 2019): power-iteration steps per matrix, warm-started, both factors all-reduced.

    For a matrix M_i [n, m] on replica i and the shared Q [m, r]: P = psum(M_i Q), P^ =
    orthonormal(P), Q_i = M_i^T P^, Q = psum(Q_i); the aggregate is P^ Q^T, and replica i's
    error is M_i - P^ Q_i^T. Q warm-starts the next step. `iterations` > 1 repeats the step
    from the summed Q within the train step (the paper takes one, warm-started; more give a
    closer rank-r fit for `iterations` times the bytes). `views` is a tree like the params of
    `MatrixView`s or None (None everywhere: `default_view`); uncompressed tensors are psummed.
    A view's batch axes give independent matrices (one P and Q each), handled together.
    """
    if rank < 1:
        raise CompressionError(f"PowerSGD rank {rank} must be >= 1 (optim.powersgd_rank)")
    if iterations < 1:
        raise CompressionError(f"PowerSGD iterations {iterations} must be >= 1 (optim.powersgd_iterations)")

    def resolve_views(params):
        return jax.tree.map(default_view, params) if views is None else views

    def init(params):
        view_tree = resolve_views(params)
        leaves = jax.tree.leaves(params)
        view_leaves = jax.tree.leaves(view_tree, is_leaf=lambda v: v is None or isinstance(v, MatrixView))
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        q = {}
        for g, (name, idx) in enumerate(sorted(_groups(params, view_tree).items())):
            mats = [(paths[i], *_sizes(leaves[i].shape, view_leaves[i])) for i in idx]
            b, n, m = mats[0][1], mats[0][2], sum(c for *_, c in mats)
            if rank > min(n, m):
                shown = ", ".join(f"{p} as {f'{bb} x ' if bb > 1 else ''}{r}x{c}" for p, bb, r, c in mats)
                raise CompressionError(
                    f"PowerSGD rank {rank} exceeds the smaller side of the {n}x{m} gradient matrix ({shown}); "
                    f"a rank-{rank} approximation of it is not a compression. Use optim.powersgd_rank <= {min(n, m)}"
                )
            q[name] = jax.random.normal(jax.random.fold_in(jax.random.key(seed), g), (b, m, rank), jnp.float32)
        return PowerSGDState(_init_residual(params, num_replicas, error_feedback), q)

    def update(updates, state, params=None):
        del params
        _check_axis(axis_name, "powersgd")
        x = _add_residual(updates, state.residual)
        leaves, treedef = jax.tree.flatten(x)
        view_leaves = jax.tree.leaves(resolve_views(x), is_leaf=lambda v: v is None or isinstance(v, MatrixView))
        groups = _groups(x, resolve_views(x))
        grouped = {i for idx in groups.values() for i in idx}
        total = [None] * len(leaves)
        err = [jnp.zeros_like(v) for v in leaves]
        # Uncompressed tensors (vectors, or views of None) go in one exact all-reduce.
        plain = [i for i in range(len(leaves)) if i not in grouped]
        for i, s in zip(plain, jax.lax.psum([leaves[i] for i in plain], axis_name)):
            total[i] = s
        new_q = {}
        for name, idx in sorted(groups.items()):
            mats = [_to_matrix(leaves[i].astype(jnp.float32), view_leaves[i]) for i in idx]
            M_bnm = jnp.concatenate(mats, axis=2)
            Q_sum = state.q[name]
            for _ in range(iterations):
                P_bnr = jax.lax.psum(jnp.einsum("bnm,bmr->bnr", M_bnm, Q_sum), axis_name)
                P_bnr, _ = jnp.linalg.qr(P_bnr)
                Q_bmr = jnp.einsum("bnm,bnr->bmr", M_bnm, P_bnr)
                Q_sum = jax.lax.psum(Q_bmr, axis_name)
            approx_bnm = jnp.einsum("bnr,bmr->bnm", P_bnr, Q_sum)
            local_bnm = jnp.einsum("bnr,bmr->bnm", P_bnr, Q_bmr)
            new_q[name] = Q_sum
            start = 0
            for i, mat in zip(idx, mats):
                cols = mat.shape[2]
                shape = leaves[i].shape
                total[i] = _from_matrix(approx_bnm[:, :, start : start + cols], view_leaves[i], shape).astype(leaves[i].dtype)
                err[i] = _from_matrix(mat - local_bnm[:, :, start : start + cols], view_leaves[i], shape).astype(leaves[i].dtype)
                start += cols
        out = jax.tree.unflatten(treedef, total)
        return out, PowerSGDState(_new_residual(state.residual, jax.tree.unflatten(treedef, err)), new_q)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- uncompressed warm-up


class WarmupState(NamedTuple):
    count: jax.Array  # int32: steps taken
    inner: Any  # the compressor's state; untouched (zero residuals, initial Q) until count reaches the start step


def after_exact_steps(compressor: optax.GradientTransformation, start_step: int, axis_name: str = DATA_AXIS) -> optax.GradientTransformation:
    """`compressor` from step `start_step` on; before it, the exact float32 psum of `exact`.

    PyTorch DDP's PowerSGD hook does this (`PowerSGDState.start_powerSGD_iter`, after Vogels
    et al. 2019): the first steps of training move fast and are the ones a compressed gradient
    hurts most. The compressor's state (error-feedback residuals, PowerSGD's Q) is left as
    `init` made it until the switch, so the compressed phase starts exactly as a fresh
    compressor would, from the warmed-up params. Both paths are one `lax.cond` in the compiled
    step: `collective_bytes(..., conditional=True)` counts both branches, the exact one for the
    first `start_step` steps and the compressed one for the rest.
    """
    if start_step < 0:
        raise CompressionError(f"compression start step {start_step} must be >= 0 (optim.compression_start_step)")
    if start_step == 0:
        return compressor

    def init(params):
        return WarmupState(jnp.zeros((), jnp.int32), compressor.init(params))

    def update(updates, state, params=None):
        _check_axis(axis_name, "compression warm-up")

        def exact_sum(u, inner):
            return jax.lax.psum(u, axis_name), inner

        def compressed(u, inner):
            return compressor.update(u, inner, params)

        total, inner = jax.lax.cond(state.count < start_step, exact_sum, compressed, updates, state.inner)
        return total, WarmupState(optax.safe_int32_increment(state.count), inner)

    return optax.GradientTransformation(init, update)


def from_name(
    method: str,
    num_replicas: int,
    *,
    rank: int = 4,
    fraction: float = 0.01,
    error_feedback: bool = True,
    views: Any = None,
    shard_specs: Any = None,
    axis_name: str = DATA_AXIS,
    start_step: int = 0,
    iterations: int = 1,
) -> optax.GradientTransformation:
    """The transform for a method name: none, bf16, int8, topk, powersgd or sign.

    `views`: PowerSGD's matrix views. `shard_specs`: the gradients' PartitionSpecs over the
    non-data axes (tensor parallelism), so bf16, int8, topk and sign work shard by shard.
    PowerSGD works on the whole matrices (the compiler partitions its matmuls).
    `start_step`: exact all-reduce before it (`after_exact_steps`). `iterations`: PowerSGD's
    power-iteration steps per train step.
    """
    if method == "none":
        return exact(axis_name)
    return after_exact_steps(
        _method(method, num_replicas, rank, fraction, error_feedback, views, shard_specs, axis_name, iterations), start_step, axis_name
    )


def _method(method, num_replicas, rank, fraction, error_feedback, views, shard_specs, axis_name, iterations) -> optax.GradientTransformation:
    ef = {"axis_name": axis_name, "error_feedback": error_feedback}
    if method == "bf16":
        return bf16(num_replicas, shard_specs=shard_specs, **ef)
    if method == "int8":
        return int8(num_replicas, shard_specs=shard_specs, **ef)
    if method == "topk":
        return topk(fraction, num_replicas, shard_specs=shard_specs, **ef)
    if method == "powersgd":
        return powersgd(rank, num_replicas, views=views, iterations=iterations, **ef)
    if method == "sign":
        return sign(num_replicas, shard_specs=shard_specs, **ef)
    raise CompressionError(f"unknown compression {method!r}: use none, bf16, int8, topk, powersgd or sign")
