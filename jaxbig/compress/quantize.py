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
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

# name -> (storage dtype, largest representable magnitude)
_FORMATS = {
    "int8": (np.dtype(np.int8), 127.0),
    "fp8": (np.dtype(ml_dtypes.float8_e4m3fn), 448.0),
}
METHODS = ("none", "int8", "fp8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    pattern: str  # regex, matched with re.fullmatch against the '/'-joined param path
    reduce_axes: tuple[int, ...]  # axes the absmax runs over (the contraction axes); one scale per remaining index


def llama_rules(num_layer_axes: int = 1) -> tuple[QuantRule, ...]:
    """Rules for `jaxbig.models.llama.Llama`; block params carry `num_layer_axes` leading layer axes."""
    s = num_layer_axes
    return (
        QuantRule(pattern=r"embed_VD", reduce_axes=(1,)),  # per vocab row (a gather, not a matmul)
        QuantRule(pattern=r"lm_head_DV", reduce_axes=(0,)),  # per vocab column
        QuantRule(pattern=r"blocks/attn/w[qkv]_D[HN]K", reduce_axes=(s,)),  # over D: per layer, head, k
        QuantRule(pattern=r"blocks/attn/wo_HKD", reduce_axes=(s, s + 1)),  # over H, K: per layer, d
        QuantRule(pattern=r"blocks/mlp/w_(gate|up)_DF", reduce_axes=(s,)),  # over D: per layer, f
        QuantRule(pattern=r"blocks/mlp/w_down_FD", reduce_axes=(s,)),  # over F: per layer, d
    )


def check_method(method: str) -> None:
    if method == "int4":
        raise ValueError(
            "--quantize int4 is refused: it does not round-trip through TensorFlow's XlaCallModule "
            "(TF holds int4 unpacked, one byte per value, while XLA reads the buffer as packed nibbles, "
            "so [-8, -3, 0, 1] arrives as [-8, 0, -3, 0]); use --quantize int8 or fp8"
        )
    if method not in METHODS:
        raise ValueError(f"--quantize {method!r} is not supported; use one of {', '.join(METHODS)}")


def _quantize_one(w: np.ndarray, rule: QuantRule, method: str) -> dict[str, np.ndarray]:
    dtype, qmax = _FORMATS[method]
    w = np.asarray(w, np.float32)
    absmax = np.max(np.abs(w), axis=rule.reduce_axes, keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    x = w / scale
    q = np.clip(np.rint(x), -qmax, qmax).astype(dtype) if method == "int8" else x.astype(dtype)
    return {"q": q, "scale": scale}


def quantize_params(flat: dict[str, np.ndarray], method: str, rules: tuple[QuantRule, ...]) -> dict[str, dict[str, np.ndarray]]:
    """`{path: array}` -> `{path: {"w": float array} | {"q": ..., "scale": ...}}`, in the same order."""
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
        out[path] = _quantize_one(w, rule, method)
    return out


def dequantize(entry: dict[str, Any]) -> Any:
    """The float32 weight of one `quantize_params` entry (traceable: runs inside the exported function)."""
    if "w" in entry:
        return entry["w"]
    return entry["q"].astype(jnp.float32) * entry["scale"]
