"""Weight-only post-training quantization by rules over param paths.

A rule matches a param path (`blocks/attn/wq_DHK`) by regex and names the axes the weight
is *contracted* over in its matmul (or, for the embedding, the axes of one looked-up row).
The scale is the absmax over those axes, i.e. one scale per output channel (per layer, per
head, per column), so a quantized param is `q` (int8 or float8_e4m3fn, same shape as the
weight) plus `scale` (float32, the weight's shape with the reduced axes kept as size 1).
Params no rule matches (RMSNorm scales) stay float32.

`dequantize` is what the exported function runs before each matmul: `q.astype(f32) * scale`;
so the bytes on disk and in serving memory are int8/fp8 while the math is float32.

Why not qwix here: qwix quantizes by intercepting the model's ops and stores `QArray` pytrees
whose layout it calls an implementation detail; exported artifacts need a stable, flat,
named list of arrays (a path manifest) that TF variables and a JAX-free loader can read. The
rules below are the same idea (regex over module paths, absmax per channel) in ~100 lines.

`int8-dynamic` (W8A8 dynamic-range): the stored weights are exactly `int8`'s (same variables,
same bytes); the difference is the math. The exported function runs every weight matmul as
`dynamic_int8_einsum` (via `jaxbig.models.llama.use_dense`): activations are quantized to int8
per row at run time, the matmul accumulates int8 x int8 in int32, and the result is rescaled by
the activation scale and the *stored* weight scale. The matmul weights reach it as `Int8Weight`
(the stored int8 array and its scale, `weight_operand`), so no weight is dequantized or
re-quantized per call: the weights are runtime arguments of the exported function, and XLA could
not fold such a pair away. The embedding (a gather) is dequantized as for `int8`; with tied
embeddings the head then gets that float weight and re-quantizes it (exactly back to the stored
int8, tests/test_compress.py checks it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxbig.compress import int4

# name -> (storage dtype, largest representable magnitude)
_FORMATS = {
    "int8": (np.dtype(np.int8), 127.0),
    "fp8": (np.dtype(ml_dtypes.float8_e4m3fn), 448.0),
}
METHODS = ("none", "int8", "fp8", "int8-dynamic", "int4")
_STORAGE = {"int8": "int8", "fp8": "fp8", "int8-dynamic": "int8"}  # method -> storage format
DYNAMIC_METHODS = ("int8-dynamic",)  # methods whose exported matmuls also quantize activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    pattern: str  # regex, matched with re.fullmatch against the '/'-joined param path
    reduce_axes: tuple[int, ...]  # axes the absmax runs over (the contraction axes); one scale per remaining index
    gather: bool = False  # looked up by row (the embedding), not a matmul operand: dequantized even for int8-dynamic


def llama_rules(num_layer_axes: int = 1) -> tuple[QuantRule, ...]:
    """Rules for `jaxbig.models.llama.Llama`; block params carry `num_layer_axes` leading layer axes."""
    s = num_layer_axes
    return (
        QuantRule(pattern=r"embed_VD", reduce_axes=(1,), gather=True),  # per vocab row (a gather, not a matmul)
        QuantRule(pattern=r"lm_head_DV", reduce_axes=(0,)),  # per vocab column
        QuantRule(pattern=r"blocks/attn/w[qkv]_D[HN]K", reduce_axes=(s,)),  # over D: per layer, head, k
        QuantRule(pattern=r"blocks/attn/wo_HKD", reduce_axes=(s, s + 1)),  # over H, K: per layer, d
        QuantRule(pattern=r"blocks/mlp/w_(gate|up)_DF", reduce_axes=(s,)),  # over D: per layer, f
        QuantRule(pattern=r"blocks/mlp/w_down_FD", reduce_axes=(s,)),  # over F: per layer, d
    )


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--quantize {method!r} is not supported; use one of {', '.join(METHODS)}")


def _quantize_one(w: np.ndarray, rule: QuantRule, method: str) -> dict[str, np.ndarray]:
    dtype, qmax = _FORMATS[_STORAGE[method]]
    w = np.asarray(w, np.float32)
    absmax = np.max(np.abs(w), axis=rule.reduce_axes, keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    x = w / scale
    q = np.clip(np.rint(x), -qmax, qmax).astype(dtype) if dtype == np.int8 else x.astype(dtype)
    return {"q": q, "scale": scale}


def rule_for(path: str, rules: tuple[QuantRule, ...]) -> QuantRule | None:
    return next((r for r in rules if re.fullmatch(r.pattern, path)), None)


def quantize_params(flat: dict[str, np.ndarray], method: str, rules: tuple[QuantRule, ...], group_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """`{path: array}` -> `{path: {"w": float array} | {"q": ..., "scale": ...} | {"packed": ..., "scale": ...}}`, in order.

    int4 (`jaxbig.compress.int4`): packed uint8 codes, one scale per `group_size` weights along the contracted axes.
    """
    check_method(method)
    out = {}
    for path, w in flat.items():
        rule = next((r for r in rules if re.fullmatch(r.pattern, path)), None) if method != "none" else None
        if rule is None:
            out[path] = {"w": np.asarray(w)}
            continue
        bad = [a for a in rule.reduce_axes if a >= np.ndim(w)]
        if bad:
            raise ValueError(f"quantization rule {rule.pattern!r} reduces axes {rule.reduce_axes} but {path} has shape {np.shape(w)}")
        out[path] = int4.quantize(w, rule.reduce_axes, group_size) if method == "int4" else _quantize_one(w, rule, method)
    return out


def dequantize(entry: dict[str, Any], reduce_axes: tuple[int, ...] = ()) -> Any:
    """The float32 weight of one `quantize_params` entry (traceable: runs inside the exported function);
    int4 entries need their rule's `reduce_axes`."""
    if "w" in entry:
        return entry["w"]
    if "packed" in entry:
        return int4.dequantize(entry, reduce_axes)
    return entry["q"].astype(jnp.float32) * entry["scale"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A stored int8 matmul weight and its scale, passed to `dynamic_int8_einsum` as they are (no dequantize).

    Stands where the float weight would in the model's params: `param[...]` (how the model reads a weight) returns
    it unchanged, and under `lax.scan` over layers both arrays are sliced along their leading layer axis.
    """

    q: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape with the contracted axes kept as size 1

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError(f"an Int8Weight is read whole (param[...]), not indexed with {key!r}")
        return self


def weight_operand(path: str, entry: dict[str, Any], method: str, rules: tuple[QuantRule, ...]) -> Any:
    """What the exported function passes to the model for one `quantize_params` entry: for `DYNAMIC_METHODS`, a
    matmul weight's stored int8 and scale as an `Int8Weight`; otherwise (and for gathered weights) `dequantize`,
    which needs the rule's `reduce_axes` for int4."""
    rule = rule_for(path, rules)
    if method in DYNAMIC_METHODS and "q" in entry and rule is not None and not rule.gather:
        return Int8Weight(entry["q"], entry["scale"])
    return dequantize(entry, getattr(rule, "reduce_axes", ()))  # an int4 weight's contracted axes say how to unpack it


def _absmax_scale(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """float32 absmax / 127 over `axes` (dropped); 1 where the slice is all zero."""
    absmax = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=axes)
    return jnp.where(absmax > 0, absmax / 127.0, 1.0)


def _to_int8(a: jax.Array, scale: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.clip(jnp.rint(a.astype(jnp.float32) / jnp.expand_dims(scale, axes)), -127, 127).astype(jnp.int8)


def dynamic_int8_einsum(spec: str, x: jax.Array, w: jax.Array, *, preferred_element_type: Any = None) -> jax.Array:
    """W8A8 dynamic-range `einsum(spec, x, w)`: int8 x int8 -> int32, rescaled to float32.

    The contracted letters are those in both operands and not in the output. `x` is quantized
    symmetrically per row (one absmax scale per index of its non-contracted letters: per token),
    `w` per output channel (absmax over its contracted letters, as `llama_rules` stores it); an `Int8Weight` brings
    its stored int8 values and scale, used as they are.
    Each element is rounded by at most half its scale, so with n contracted terms
    |y - y_float| <= (|x| . s_w + s_x . |w|) / 2 + n s_x s_w / 4 elementwise.
    Returns `preferred_element_type`, or x's dtype when None (the contract of `llama.dense`).
    """
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in xs if c in ws and c not in out]
    x_axes = tuple(xs.index(c) for c in contracted)
    w_axes = tuple(ws.index(c) for c in contracted)
    sx = _absmax_scale(x, x_axes)
    if isinstance(w, Int8Weight):  # the stored integers and scale, straight into the int8 dot
        if w.scale.shape != tuple(1 if a in w_axes else w.q.shape[a] for a in range(w.q.ndim)):
            raise ValueError(f"{spec}: the weight's scale {w.scale.shape} is not per output channel of {w.q.shape} (contracted axes {w_axes})")
        qw, sw = w.q, jnp.squeeze(w.scale, w_axes)
    else:
        sw = _absmax_scale(w, w_axes)
        qw = _to_int8(w, sw, w_axes)
    acc = jnp.einsum(spec, _to_int8(x, sx, x_axes), qw, preferred_element_type=jnp.int32)
    xs_kept, ws_kept = "".join(c for c in xs if c not in contracted), "".join(c for c in ws if c not in contracted)
    scale_out = jnp.einsum(f"{xs_kept},{ws_kept}->{out}", sx, sw)  # outer product (elementwise on shared batch letters)
    return (acc.astype(jnp.float32) * scale_out).astype(preferred_element_type or x.dtype)
