"""Tolerances for comparing two differently compiled programs, derived from floating-point rounding.

Two programs that compute the same mathematics (a sharded and a one-device step, a hand-written
backward and autodiff's, the SavedModel and the JAX function) sum in different orders: XLA fuses,
tiles and vectorises each its own way, and its matmul libraries (YNNPACK, oneDNN, Eigen) pick
kernels by CPU (AVX2, AVX-512, AMX). So no bit-for-bit comparison between them holds on every
x86-64 CPU, and no tolerance read off one machine's output is safe on another. What holds on any
CPU is the worst case: a sum of n terms, added in any order in a format of unit roundoff u, is
within gamma_n * sum|terms| of the exact sum, gamma_n = n*u / (1 - n*u) (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., Lemma 3.1 and section 3.1). Two orders differ by at
most twice that: `tolerance(n, scale)`.

Through a network the relative errors made along a chain of reductions add (to first order, the
layers of a freshly initialised model being well conditioned), so `n` is the length of the longest
chain of reductions a value passes through (`forward_chain`, `backward_chain`), and `scale` the
magnitude of the values compared (by default the largest |value| of the tensor: its entries are
sums of terms of about that size). The bounds are pessimistic (real rounding errors partly cancel,
about sqrt(n) instead of n), which is what makes them safe on any kernel; they still sit far below
what a real difference (a wrong mask, scale or sign, a lost microbatch) changes, 1e-2 or more.

A bitwise comparison stays right where one compiled program runs twice on the same inputs (a
resumed run, a restored checkpoint), or where the values are exact by construction (integers,
copies, a masked entry set to 0).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxbig.config import ModelConfig

U32 = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-8  # bfloat16 unit roundoff (8 significand bits)

# The optimizer (OptimConfig fields) for steps two programs must agree on: SGD without weight decay or clipping, so the
# update p - lr * g is linear in the gradient and the params agree to lr times the gradients' rounding
# (`assert_steps_close`). Adam's first step, lr * g / (|g| + eps), multiplies a rounding difference in a near-zero
# gradient by up to 1 / eps (1e8 by default), and which entries sit near zero depends on the CPU's kernels.
LINEAR_SGD = dict(optimizer="sgd", learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=0.0)


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: the worst-case relative error of a sum of n terms, in any order."""
    assert n * u < 1, f"n={n} is too long a chain for u={u}: the bound says nothing"
    return n * u / (1 - n * u)


def tolerance(n: int, scale: float, u: float = U32) -> float:
    """The most two evaluations of a length-n chain of sums of size `scale`, in any two orders, can differ by."""
    return 2 * gamma(n, u) * scale


def forward_chain(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Terms summed along the longest chain of reductions in jaxbig's decoder forward and mean loss.

    Per layer: two RMSNorm means (D each), the q/k/v and gate/up contractions (D), q.k (K), the
    softmax sum and probs.v (S = T each), the output projection (H*K) and the down projection (F).
    Then the final norm (D), the head (D), logsumexp over the vocabulary (V) and the mean over the
    batch's tokens (B*T).
    """
    D, K, F, L = cfg.d_model, cfg.head_dim, cfg.d_ff, cfg.num_layers
    per_layer = 2 * D + D + K + 2 * seq + cfg.num_heads * K + D + F
    return L * per_layer + 2 * D + cfg.vocab_size + batch * seq


def backward_chain(cfg: ModelConfig, batch: int, seq: int) -> int:
    """The forward chain, the same chain back (each contraction's transpose sums over the other side),
    and the weight gradients' sum over the batch's tokens."""
    return 2 * forward_chain(cfg, batch, seq) + batch * seq


def _record(actual, desired, tol: float, what: str) -> None:
    """With JAXBIG_TOLERANCE_LOG=FILE, appends each comparison's largest difference as a share of its tolerance,
    so the margins on a given CPU can be read off a run (`pytest ...; sort -g FILE | tail`)."""
    path = os.environ.get("JAXBIG_TOLERANCE_LOG")
    if path and tol > 0 and np.size(desired):
        diff = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64))))
        with open(path, "a") as f:
            f.write(f"{diff / tol:.3e}\t{diff:.3e}\t{tol:.3e}\t{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{what}\n")


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)))) if np.size(x) else 0.0


def assert_within(actual, desired, tol: float, err_msg: str = "") -> None:
    """|actual - desired| <= tol elementwise, for a tolerance derived in the caller (and recorded, see `_record`)."""
    _record(actual, desired, tol, err_msg)
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64), rtol=0, atol=tol, err_msg=f"{err_msg} (tolerance {tol:.3g})")


def assert_close(actual, desired, n: int, *, scale: float | None = None, atol: float = 0.0, u: float = U32, err_msg: str = "") -> None:
    """|actual - desired| <= tolerance(n, scale) + atol elementwise; `scale` defaults to max|desired|.

    `atol` adds what the chain does not count (the rounding of an update applied to params, say).
    """
    desired = np.asarray(desired, np.float64)
    tol = tolerance(n, _max_abs(desired) if scale is None else scale, u) + atol
    assert_within(actual, desired, tol, f"{err_msg} (n={n})")


def assert_trees_close(actual, desired, n: int, *, u: float = U32) -> None:
    """`assert_close` on each pair of leaves, each leaf at its own scale."""
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired)):
        assert_close(a, d, n, u=u, err_msg=jax.tree_util.keystr(path))


def sgd_step_bound(lr: float, grad_tol: float, param_scale: float, update_scale: float) -> float:
    """How far one SGD step `p - lr * (g + wd * p)` from the same params can land apart in two programs whose
    gradients differ by up to `grad_tol`: lr * grad_tol (the update is linear in the gradient) plus the
    update's own rounding, a few units of roundoff of the param and of the update (`update_scale`, max |g + wd*p|)."""
    return lr * grad_tol + 4 * U32 * (param_scale + lr * update_scale)


def assert_steps_close(new, ref, old, n: int, *, roundings: int = 4, moves: bool = True) -> None:
    """Two programs each took one step from the same params `old`; `ref` is one's result, `new` the other's.

    For an update linear in the gradient (SGD, no weight decay: p - lr * g), each leaf's movement
    max|ref - old| is lr * max|g|, so gradients within tolerance(n, max|g|) of each other land within
    tolerance(n, movement); `roundings` units of roundoff of the param and its movement add the update's
    own arithmetic (4 for p - lr * g; more where an outer step recombines params, as in DiLoCo).
    `moves`: every leaf must move by far more than that, so the comparison can tell a wrong step.
    """
    assert jax.tree.structure(new) == jax.tree.structure(ref) == jax.tree.structure(old)
    for (path, a), r, o in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(ref), jax.tree.leaves(old)):
        name = jax.tree_util.keystr(path)
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        moved = _max_abs(r - o)
        bound = tolerance(n, moved) + roundings * U32 * (_max_abs(o) + moved)
        if moves:
            assert moved > 10 * bound, f"{name} moved {moved:.3g} in one step: too little to tell two steps apart (bound {bound:.3g})"
        assert_within(a, r, bound, f"{name} (n={n})")


def sgd_trajectory_bound(steps: int, lr: float, n: int, grad_norm: float, param_scale: float) -> float:
    """How far (in the 2-norm, so in any entry) two programs' SGD trajectories from the same params can drift apart in
    `steps` steps, to first order: each step's gradients differ by at most tolerance(n, ||g||) (normwise), and an earlier
    difference is carried on by (I - lr * H), of norm at most 1 while training is stable (the Hessian H positive
    semidefinite along the path and lr * ||H|| <= 2), so the steps' differences add up; plus each step's own rounding."""
    return steps * (lr * tolerance(n, grad_norm) + 4 * U32 * param_scale)


def assert_near_argmax(tokens_BN, logits_BNV, tol: float, err_msg: str = "") -> None:
    """Each token is a greedy choice of its row of logits: its logit is within `tol` of the row's maximum.

    Two programs' logits agree only to rounding, so where two tokens' logits are within that of each
    other either may be the argmax; every other choice must match. `logits_BNV` are the reference
    program's logits for the chosen sequence (teacher-forced), so a tie broken the other way earlier
    does not derail the check of what follows.
    """
    logits = np.asarray(logits_BNV, np.float64)
    tokens = np.asarray(tokens_BN)
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    gap = logits.max(-1) - chosen
    assert (gap <= tol).all(), f"{err_msg}: tokens {tokens[gap > tol].tolist()} are {gap[gap > tol].tolist()} below the best logit (tolerance {tol:.3g})"
