"""int4 weights, group-wise: what ONNX Runtime's MatMulNBits stores, for the SavedModel too.

A weight's contracted axes (a `QuantRule`'s `reduce_axes`) are moved last and flattened to C; each run of
`group` consecutive values along C gets one float32 scale. Round to nearest, symmetric, as ONNX Runtime's
`MatMulNBitsQuantizer(is_symmetric=True)` (its default RTN): scale = the group's value of largest magnitude / -8
(so that value becomes -8 exactly), code = clip(round(w / scale), -8, 7), stored as code + 8 in [0, 15]. Two codes
per byte along C, the first in the low nibble (MatMulNBits' and ONNX's int4 order). So a weight becomes `packed`
uint8 [kept.., c1, .., ck/2] (its other axes in order, then its contracted axes c1..ck, the last one halved) and
`scale` float32 [kept.., C/group]; both runtimes' files hold 4.5 bits per weight at group 64. The codes and
scales are byte-identical to MatMulNBitsQuantizer's (tests/test_onnx.py checks it on a trained model).

`dequantize` runs inside the exported function with uint8 bit operations (`&`, `>>`) and a float multiply, which
the TF 2.21 runtime runs: TF holds `int4` tensors unpacked, one byte per value, while XlaCallModule reads int4
buffers packed, so int4 cannot cross into the SavedModel as an int4 dtype (docs/serving.md), but uint8 can.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

GROUPS = (32, 64, 128)


def contracted_size(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in reduce_axes]))


def group_for(shape: tuple[int, ...], reduce_axes: tuple[int, ...], group: int) -> int:
    """The group actually used: `group`, or all of C when C is smaller (ONNX Runtime pads such a block with zeros,
    which leaves its scale and codes unchanged). Raises ValueError when C is neither a multiple nor smaller."""
    c = contracted_size(shape, reduce_axes)
    if shape[reduce_axes[-1]] % 2:
        raise ValueError(f"int4 packs pairs along the last contracted axis, of odd size {shape[reduce_axes[-1]]} in a weight of shape {shape}")
    if c <= group:
        return c
    if c % group:
        raise ValueError(f"int4 groups of {group} do not divide the contracted size {c} of a weight of shape {shape}; use --group_size 32")
    return group


def _order(ndim: int, reduce_axes: tuple[int, ...]) -> list[int]:
    return [a for a in range(ndim) if a not in reduce_axes] + list(reduce_axes)


def quantize(w: np.ndarray, reduce_axes: tuple[int, ...], group: int) -> dict[str, np.ndarray]:
    """float weight -> {"packed": uint8 [kept.., c1, .., ck/2], "scale": float32 [kept.., C/g]} (module docstring)."""
    g = group_for(w.shape, reduce_axes, group)
    w_moved = np.transpose(np.asarray(w, np.float32), _order(w.ndim, reduce_axes))
    kept = w.ndim - len(reduce_axes)
    w_C = w_moved.reshape(*w_moved.shape[:kept], -1)
    w_Gg = w_C.reshape(*w_C.shape[:-1], -1, g)
    idx = np.argmax(np.abs(w_Gg), axis=-1)[..., None]
    peak = np.take_along_axis(w_Gg, idx, axis=-1)  # the signed value of largest magnitude
    scale = (peak / np.float32(-8)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.rint(w_Gg / safe), -8, 7).astype(np.int8) + 8
    codes = np.where(scale == 0, 8, codes).astype(np.uint8).reshape(w_C.shape)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return {"packed": packed.reshape(*w_moved.shape[:-1], -1), "scale": scale[..., 0]}


def dequantize(entry: dict[str, Any], reduce_axes: tuple[int, ...]) -> Any:
    """The float32 weight from `quantize`'s entry; traceable (uint8 `&` and `>>`, then a multiply)."""
    packed, scale = entry["packed"], entry["scale"]
    low = jnp.bitwise_and(packed, jnp.uint8(15))
    high = jnp.right_shift(packed, jnp.uint8(4))
    codes = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)  # [kept.., c1, .., ck]
    q_Gg = codes.astype(jnp.float32).reshape(*scale.shape, -1) - 8.0
    w_moved = (q_Gg * scale[..., None]).reshape(codes.shape)
    return jnp.transpose(w_moved, np.argsort(_order(codes.ndim, reduce_axes)))
