"""Each gradient compressor, checked numerically: error feedback loses nothing, and the aggregate is within the
method's own stated bound of the exact sum.

Byte counts and "the loss falls" (tests/test_optim.py) cannot catch a decoder that scrambles magnitudes: AdamW divides
the scale out. These tests run two steps of each compressor on 8 replicas' random gradients (the second step adds the
first step's residuals back, so the feedback path is exercised) and compare in float64 with bounds derived below.
Conventions (jaxbig/optim/compression.py): each replica's gradient is its share, the exact aggregate is the sum over
replicas; the mean is that sum over N, so every bound below holds for the mean divided by N.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbig.config import MeshConfig
from jaxbig.optim import compression
from jaxbig.optim.per_replica import PerReplica
from jaxbig.parallel.mesh import make_mesh
from tests.numerics import U32, U_BF16, gamma

N = 8  # replicas (the data axis)
SHAPES = {"b": (100,), "w": (24, 40)}  # a vector and a matrix; flattened in key order: b, then w (1060 entries)


def _grads(seed: int) -> dict[str, np.ndarray]:
    """[N, ...] per leaf: every replica's float32 gradient, entries spread over four decades (mu-law's range and beyond)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=(N, *s)) * 10.0 ** rng.uniform(-4, 0, size=(N, *s))).astype(np.float32) for k, s in SHAPES.items()}


def _specs(state):
    """PartitionSpecs for a compressor's state: per-replica residuals split over data, everything else replicated."""
    return type(state)(*(jax.tree.map(lambda _: P("data"), f) if isinstance(f, PerReplica) else jax.tree.map(lambda _: P(), f) for f in state))


def _two_steps(tx, g1, g2):
    """(total, residual [N, ...], state) after each of two updates, run under shard_map over 8 replicas."""
    state0 = tx.init({k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()})
    specs = _specs(state0)

    def body(g1, g2, state):
        t1, s1 = tx.update(jax.tree.map(lambda x: x[0], g1), state)
        t2, s2 = tx.update(jax.tree.map(lambda x: x[0], g2), s1)
        return t1, s1, t2, s2

    run = jax.shard_map(body, in_specs=(P("data"), P("data"), specs), out_specs=(P(), specs, P(), specs))
    with jax.set_mesh(make_mesh(MeshConfig(data=N))):
        t1, s1, t2, s2 = jax.jit(run)(g1, g2, state0)
    f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}  # noqa: E731
    return state0, [(f64(t1), f64(s1.residual.value), s1), (f64(t2), f64(s2.residual.value), s2)]


def _inputs(g1, g2, r1):
    """What each step compresses: the gradient plus the replica's residual, added in float32 as the compressor does."""
    x2 = {k: (g2[k] + np.asarray(r1[k], np.float32)).astype(np.float64) for k in g2}
    return [{k: v.astype(np.float64) for k, v in g1.items()}, x2]


def _flat(tree) -> np.ndarray:
    """[N, ...] leaves -> [N, 1060], in the compressor's flattening order (tree order: b, then w)."""
    return np.concatenate([tree[k].reshape(tree[k].shape[0], -1) for k in sorted(tree)], axis=1)


def _assert_within(diff, bound, what: str):
    diff, bound = np.broadcast_arrays(np.abs(diff), bound)
    bad = diff > bound
    worst = np.unravel_index(np.argmax(diff - bound), diff.shape)
    if bad.any():
        raise AssertionError(f"{what}: {bad.sum()} entries beyond the bound; worst {diff[worst]:.3g} > {bound[worst]:.3g} at {tuple(map(int, worst))}")


def _check_nothing_lost(g1, g2, steps, extra_terms: int, scale=None):
    """Error feedback loses nothing: total_1 + total_2 + sum_i residual_2,i == sum_i (g1_i + g2_i).

    Exact in real arithmetic for every method: whatever a replica's decoded message drops is its residual, and the
    residual re-enters the next step. In float32 the additions and subtractions that form the sums, the residuals and
    the next inputs each round once (the decoded values themselves cancel exactly: both sides use the same float32
    numbers), so the two sides agree to tolerance(N + extra_terms, T) with T the sum of the magnitudes involved. A
    decoder that drops, duplicates or misplaces anything moves the left side by the size of a gradient entry.
    """
    (t1, r1, _), (t2, r2, _) = steps
    for k in SHAPES:
        lhs = t1[k] + t2[k] + r2[k].sum(0)
        rhs = g1[k].astype(np.float64).sum(0) + g2[k].astype(np.float64).sum(0)
        T = np.abs(g1[k]).sum(0) + np.abs(g2[k]).sum(0) + np.abs(r1[k]).sum(0) + np.abs(r2[k]).sum(0) + np.abs(t1[k]) + np.abs(t2[k])
        if scale is not None:
            T = T + scale[k]
        _assert_within(lhs - rhs, 2 * gamma(N + extra_terms) * T, f"{k}: total + residual vs input")


# --------------------------------------------------------------------------- bf16


def test_bf16_sends_the_rounded_gradient_and_keeps_the_rest():
    """bf16 (two phases): each replica's x rounded to bfloat16, summed in float32, the sum rounded again.

    Per replica, outside the chunk it owns, the residual is exactly x - bf16(x) and bf16(x) + residual == x bitwise
    (x and bf16(x) are within a factor 2 of each other, so the float32 subtraction is exact: Sterbenz's lemma).
    Aggregate: each rounding to bfloat16 is within U_BF16 relative (round to nearest, 8 significand bits), the float32
    sum of N decoded terms within gamma(N) of their magnitudes: |total - sum x| <= S (U_BF16 + (1 + U_BF16)(gamma(N) +
    U_BF16 (1 + gamma(N)))), S = sum_i |x_i|.
    """
    g1, g2 = _grads(0), _grads(1)
    _, steps = _two_steps(compression.bf16(N), g1, g2)
    xs = _inputs(g1, g2, steps[0][1])
    size = sum(math.prod(s) for s in SHAPES.values())
    chunk = -(-size // N)
    for x, (total, r, _) in zip(xs, steps):
        x_NS, r_NS = _flat(x).astype(np.float32), _flat(r).astype(np.float32)
        sent_NS = x_NS.astype(jnp.bfloat16).astype(np.float32)
        for d in range(N):
            other = np.ones(size, bool)
            other[d * chunk : (d + 1) * chunk] = False
            np.testing.assert_array_equal(sent_NS[d, other] + r_NS[d, other], x_NS[d, other], err_msg=f"replica {d}: bf16(x) + residual")
            np.testing.assert_array_equal(r_NS[d, other], (x_NS - sent_NS)[d, other], err_msg=f"replica {d}: residual")
        g = gamma(N)
        for k in SHAPES:
            S = np.abs(x[k]).sum(0)
            bound = S * (U_BF16 + (1 + U_BF16) * (g + U_BF16 * (1 + g)))
            _assert_within(total[k] - x[k].sum(0), bound, f"bf16 {k}: aggregate vs exact sum")
    _check_nothing_lost(g1, g2, steps, extra_terms=4)


# --------------------------------------------------------------------------- int8 (mu-law, absmax per block)


def _mu_law_error(x_abs, scale):
    """The most mu-law int8 coding moves |x| <= scale (compression._int8_encode): half a code step, plus float32.

    With y = |x| / s and the code c = log1p(MU y) / log1p(MU) rounded to a multiple of 1/127 (error <= delta), the
    decoded y' = expm1(c' L) / MU, L = log1p(MU), so |y' - y| = |e^{c'L} - e^{cL}| / MU <= (1 + MU y)(e^{delta L} - 1) / MU:
    in x, (s + MU |x|)(e^{delta L} - 1) / MU. delta is half a code step plus the code's own float32 error (its log1p,
    division and scaling by 127, a few units of roundoff of 127); the decode's expm1 and products add a few units of
    roundoff of s.
    """
    MU, L = compression._MU, math.log1p(compression._MU)
    delta = 0.5 / 127 + 8 * U32
    return (scale + MU * x_abs) * math.expm1(delta * L) / MU + 8 * U32 * scale


def _block_max(v_NS, size):
    """Per entry, the largest |v| of its INT8_BLOCK-entry block of the padded flat vector (the entry's scale)."""
    B = compression.INT8_BLOCK
    padded = -(-size // (N * B)) * B * N
    v = np.pad(np.abs(v_NS), [(0, 0), (0, padded - size)]).reshape(v_NS.shape[0], -1, B).max(-1)
    return np.repeat(v, B, axis=-1)[:, :size]


def test_int8_aggregate_is_within_half_a_code_step_per_replica():
    """int8 (two phases): each replica's x in mu-law codes against its block's absmax, summed, the sum coded again.

    Phase 1 moves each replica's entry by at most `_mu_law_error(|x_i|, s_i)` (s_i: its block's absmax); the float32 sum
    C of the N decoded values is within E1 = sum_i of those (+ gamma(N) of S + E1) of the exact sum; phase 2 codes C
    against its own block's absmax, at most max|C| <= blockmax(S + E1)(1 + gamma(N)). The residual of each replica
    outside its own chunk is its phase-1 error, so it is within the phase-1 bound too.
    """
    g1, g2 = _grads(2), _grads(3)
    _, steps = _two_steps(compression.int8(N), g1, g2)
    xs = _inputs(g1, g2, steps[0][1])
    size = sum(math.prod(s) for s in SHAPES.values())
    chunk = -(-size // (N * compression.INT8_BLOCK)) * compression.INT8_BLOCK
    g = gamma(N)
    for x, (total, r, _) in zip(xs, steps):
        x_NS, r_NS, t_S = _flat(x), _flat(r), _flat({k: v[None] for k, v in total.items()})[0]
        e1_NS = _mu_law_error(np.abs(x_NS), _block_max(x_NS, size))
        for d in range(N):
            other = np.ones(size, bool)
            other[d * chunk : (d + 1) * chunk] = False
            _assert_within(r_NS[d, other], e1_NS[d, other], f"int8 replica {d}: residual vs its phase-1 error")
        S, E1 = np.abs(x_NS).sum(0), e1_NS.sum(0)
        C = (S + E1) * (1 + g)
        bound = E1 + g * (S + E1) + _mu_law_error(C, _block_max(C[None], size)[0])
        _assert_within(t_S - x_NS.sum(0), bound, "int8: aggregate vs exact sum")
    _check_nothing_lost(g1, g2, steps, extra_terms=4)


# --------------------------------------------------------------------------- top-k


def test_topk_sends_exactly_the_k_largest_of_each_tensor():
    """topk: each replica sends the ceil(fraction * size) largest |x| of every tensor and keeps the rest, bit for bit.

    No arithmetic touches what is sent or kept, so per replica the residual is x with exactly those k entries set to 0
    (sent + residual == x exactly); the aggregate is the float32 scatter-add of N replicas' sent values, within
    tolerance(N, sum of their magnitudes) of the exact sum. The random entries have no ties in magnitude.
    """
    fraction = 0.05
    g1, g2 = _grads(4), _grads(5)
    _, steps = _two_steps(compression.topk(fraction, N), g1, g2)
    xs = _inputs(g1, g2, steps[0][1])
    for x, (total, r, _) in zip(xs, steps):
        for k, shape in SHAPES.items():
            size = math.prod(shape)
            kk = max(1, math.ceil(fraction * size))
            x_NS, r_NS = x[k].reshape(N, size), r[k].reshape(N, size)
            sent_NS = np.zeros_like(x_NS)
            for d in range(N):
                top = np.argsort(-np.abs(x_NS[d]))[:kk]
                sent_NS[d, top] = x_NS[d, top]
                expected_r = x_NS[d].copy()
                expected_r[top] = 0.0
                np.testing.assert_array_equal(r_NS[d], expected_r, err_msg=f"topk {k} replica {d}: residual is x less its {kk} largest")
            np.testing.assert_array_equal(sent_NS + r_NS, x_NS)
            tol = 2 * gamma(N) * np.abs(sent_NS).sum(0)
            _assert_within(total[k].reshape(size) - sent_NS.sum(0), tol, f"topk {k}: aggregate vs the sum of the k largest")
    _check_nothing_lost(g1, g2, steps, extra_terms=2)


# --------------------------------------------------------------------------- sign


def test_sign_sends_the_scaled_sign():
    """sign: each replica sends sign(x) (>= 0 as +) times mean|x| of the tensor; the aggregate is their sum.

    The scale is a float32 mean of n = tensor size terms, within gamma(n) (+1 unit for the division) of the exact mean;
    the sum over N replicas adds gamma(N) of the magnitudes. The residual x - scale * sign is one float32 subtraction,
    so sent + residual is x within gamma(n) + 1 units of roundoff of (|x| + scale).
    """
    g1, g2 = _grads(6), _grads(7)
    _, steps = _two_steps(compression.sign(N), g1, g2)
    xs = _inputs(g1, g2, steps[0][1])
    for x, (total, r, _) in zip(xs, steps):
        for k, shape in SHAPES.items():
            n = math.prod(shape)
            x_NS, r_NS = x[k].reshape(N, n), r[k].reshape(N, n)
            s_N1 = np.abs(x_NS).mean(1, keepdims=True)
            sent_NS = np.where(x_NS >= 0, s_N1, -s_N1)
            scale_err = gamma(n + 1)
            _assert_within(sent_NS + r_NS - x_NS, (scale_err + U32) * (np.abs(x_NS) + s_N1), f"sign {k}: sent + residual vs x")
            bound = (scale_err + gamma(N) * (1 + scale_err)) * np.abs(sent_NS).sum(0)
            _assert_within(total[k].reshape(n) - sent_NS.sum(0), bound, f"sign {k}: aggregate vs the sum of scaled signs")
    _check_nothing_lost(g1, g2, steps, extra_terms=2)


# --------------------------------------------------------------------------- PowerSGD


@pytest.mark.parametrize("rank", [1, 4])
def test_powersgd_is_the_rank_r_projection_of_the_sum(rank):
    """powersgd (one warm-started iteration): with the shared Q, P = sum_i M_i Q, P^ = orthonormal(P), and the aggregate
    is P^ P^T (sum_i M_i), the projection of the exact sum onto the span of P; the vector is psummed exactly.

    The reference is that projection in float64 from the state's Q. Tolerance: float32 forms P from sums of m + N terms
    and the QR is backward stable, so P^'s span moves by about kappa(P) gamma(m + N + n r) (kappa: P's condition number,
    computed here), which moves the projector by twice that in norm; the projection and its products add
    gamma(n + N + r). In the 2-norm of the sum, which bounds every entry.
    """
    g1, g2 = _grads(8), _grads(9)
    state0, steps = _two_steps(compression.powersgd(rank, N), g1, g2)
    xs = _inputs(g1, g2, steps[0][1])
    qs = [state0.q, steps[0][2].q]
    (name,) = qs[0]
    n, m = SHAPES["w"]
    for x, q, (total, r, _) in zip(xs, qs, steps):
        M = x["w"].sum(0)
        Q0 = np.asarray(q[name], np.float64)[0]
        Pm = M @ Q0
        Ph, _ = np.linalg.qr(Pm)
        expected = Ph @ Ph.T @ M
        kappa = np.linalg.cond(Pm)
        tol = (2 * kappa * gamma(m + N + n * rank) + gamma(n + N + rank)) * np.linalg.norm(M, 2)
        _assert_within(total["w"] - expected, tol, f"powersgd rank {rank}: aggregate vs the projection of the sum")
        assert np.abs(total["w"] - M).max() > 10 * tol  # a rank-r projection of a full-rank sum is not the sum itself
        # Each replica keeps what the projection leaves of its own matrix: M_i - P^ P^T M_i.
        _assert_within(r["w"] - (x["w"] - Ph @ Ph.T @ x["w"]), tol, f"powersgd rank {rank}: residual")
        _assert_within(total["b"] - x["b"].sum(0), 2 * gamma(N) * np.abs(x["b"]).sum(0), "powersgd: the psummed vector")
    T = {"b": 0.0, "w": np.linalg.norm(xs[0]["w"].sum(0), 2) + np.linalg.norm(xs[1]["w"].sum(0), 2)}
    _check_nothing_lost(g1, g2, steps, extra_terms=rank + 4, scale={k: v * N for k, v in T.items()})
