"""Compression of one worker's push to a parameter server, with error feedback kept by that worker.

`compression` compresses a *sum over a mesh axis*: its transforms run collectives inside
`shard_map`. A push to a parameter server (`jaxbig.ps`) is point to point: one worker encodes its
update (a gradient, or a local-SGD parameter delta), the arrays travel, the server decodes them.
`PushCodec` applies the same encodings to that case, one tensor at a time, keyed by param name:

| method   | payload per tensor                                   | bytes vs float32 |
|----------|------------------------------------------------------|------------------|
| none     | the float32 tensor                                   | 1                |
| bf16     | bfloat16 bits as uint16                              | 1/2              |
| int8     | mu-law int8 codes + one float32 scale per 256 entries (`compression._int8_encode`) | ~1/4 |
| topk     | the largest `fraction` of the entries: float32 values + int32 flat indices | 2·fraction |
| powersgd | P [b, n, r] and Q [b, m, r] per matrix view (one power-iteration step, Q warm-started per worker) | (n+m)r/(nm) |

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what a push dropped is added to the
same worker's next push. The residuals and PowerSGD's Q live in the worker (`PushState`), since
each worker's error is its own.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.optim.compression import INT8_BLOCK, MatrixView, _bf16_decode, _bf16_encode, _from_matrix, _int8_decode, _int8_encode, _sizes, _to_matrix

Flat = dict[str, Any]  # param name ('/'-joined path) -> array
Payload = dict[str, tuple[np.ndarray, ...]]  # param name -> the arrays sent for it


class PushState(NamedTuple):
    residual: Flat  # what earlier pushes dropped, per param (empty without error feedback)
    q: Flat  # powersgd: the warm-start right factor [b, m, r] per compressed param


class PushCodec:
    """Encodes a worker's update (`Flat` of float32 arrays) into a `Payload`, and decodes it on the server.

    `shapes`: the params' shapes by name; `views`: PowerSGD's `MatrixView` (or None: sent exact) by name.
    """

    def __init__(
        self,
        method: str,
        shapes: dict[str, tuple[int, ...]],
        *,
        error_feedback: bool = True,
        fraction: float = 0.01,
        rank: int = 4,
        views: dict[str, MatrixView | None] | None = None,
        seed: int = 0,
    ):
        if method not in ("none", "bf16", "int8", "topk", "powersgd"):
            raise ConfigError(f"push compression {method!r}: use none, bf16, int8, topk or powersgd")
        self.method, self.shapes, self.fraction, self.rank, self.seed = method, dict(shapes), fraction, rank, seed
        self.error_feedback = error_feedback and method != "none"
        self.views = {n: (views or {}).get(n) for n in self.shapes} if method == "powersgd" else {}
        for name, view in self.views.items():
            if view is None:
                continue
            b, n, m = _sizes(self.shapes[name], view)
            if rank > min(n, m):
                raise ConfigError(
                    f"optim.powersgd_rank={rank} exceeds the smaller side of {name}'s {n}x{m} matrix; use optim.powersgd_rank <= {min(n, m)}"
                )
        self._encode = jax.jit(self._encode_all)
        self._decode = jax.jit(self._decode_all)

    def init(self) -> PushState:
        residual = {n: jnp.zeros(s, jnp.float32) for n, s in self.shapes.items()} if self.error_feedback else {}
        q = {}
        for i, (name, view) in enumerate(sorted(self.views.items())):
            if view is not None:
                b, _, m = _sizes(self.shapes[name], view)
                q[name] = jax.random.normal(jax.random.fold_in(jax.random.key(self.seed), i), (b, m, self.rank), jnp.float32)
        return PushState(residual, q)

    def encode(self, update: Flat, state: PushState) -> tuple[Payload, PushState]:
        """(payload as host numpy arrays, the worker's new state)."""
        payload, state = self._encode({n: jnp.asarray(v, jnp.float32) for n, v in update.items()}, state)
        return {n: tuple(np.asarray(a) for a in arrays) for n, arrays in payload.items()}, state

    def decode(self, payload: Payload) -> Flat:
        """The float32 update the payload stands for (any subset of the params: a server shard's)."""
        return self._decode({n: tuple(jnp.asarray(a) for a in arrays) for n, arrays in payload.items()})

    @staticmethod
    def nbytes(payload: Payload) -> int:
        return sum(a.nbytes for arrays in payload.values() for a in arrays)

    # ------------------------------------------------------------------ per tensor

    def _encode_all(self, update: Flat, state: PushState):
        payload, residual, q = {}, {}, dict(state.q)
        for name, x in update.items():
            if self.error_feedback:
                x = x + state.residual[name]
            if self.method == "powersgd" and self.views[name] is not None:
                sent, q[name] = self._powersgd(x, self.views[name], state.q[name])
            else:
                sent = self._encode_one(x)
            payload[name] = sent
            if self.error_feedback:
                residual[name] = x - self._decode_one(name, sent)
        return payload, PushState(residual, q)

    def _decode_all(self, payload):
        return {name: self._decode_one(name, sent) for name, sent in payload.items()}

    def _encode_one(self, x: jax.Array) -> tuple[jax.Array, ...]:
        flat = x.reshape(-1)
        if self.method in ("none", "powersgd"):  # powersgd: tensors without a matrix view go exact
            return (x,)
        if self.method == "bf16":
            return _bf16_encode(x)
        if self.method == "int8":
            return _int8_encode(jnp.pad(flat, (0, -flat.shape[0] % INT8_BLOCK)))
        k = max(1, math.ceil(self.fraction * flat.shape[0]))  # topk
        _, idx = jax.lax.top_k(jnp.abs(flat), k)
        return flat[idx], idx.astype(jnp.int32)

    def _decode_one(self, name: str, sent: tuple[jax.Array, ...]) -> jax.Array:
        shape = self.shapes[name]
        size = math.prod(shape)
        if self.method == "powersgd" and self.views[name] is not None:
            P_bnr, Q_bmr = sent
            return _from_matrix(jnp.einsum("bnr,bmr->bnm", P_bnr, Q_bmr), self.views[name], shape)
        if self.method in ("none", "powersgd"):
            return sent[0]
        if self.method == "bf16":
            return _bf16_decode(sent)
        if self.method == "int8":
            return _int8_decode(sent)[:size].reshape(shape)
        values, idx = sent  # topk
        return jnp.zeros((size,), jnp.float32).at[idx].set(values).reshape(shape)

    def _powersgd(self, x: jax.Array, view: MatrixView, Q_bmr: jax.Array):
        """One warm-started power-iteration step (Vogels et al. 2019) on this worker's matrix alone."""
        M_bnm = _to_matrix(x, view)
        P_bnr, _ = jnp.linalg.qr(jnp.einsum("bnm,bmr->bnr", M_bnm, Q_bmr))
        Q_bmr = jnp.einsum("bnm,bnr->bmr", M_bnm, P_bnr)
        return (P_bnr, Q_bmr), Q_bmr


__all__ = ["PushCodec", "PushState"]
