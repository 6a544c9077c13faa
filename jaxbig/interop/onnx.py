"""ONNX export: jaxbig's own forward, converted by jax2onnx, checked by onnx, quantized by ONNX Runtime's tools.

Two graphs per export (docs/serving.md "ONNX"):
  model.onnx        serving_default: tokens [B, T] int32 -> logits [B, T, V] float32
  decode_step.onnx  one KV-cache step, the form ONNX Runtime GenAI runs (its Generator loops outside the graph):
                    input_ids [B, T] int32, position [] int32 (how many tokens the cache already holds),
                    past_key_values.{i}.key/.value [B, S, N, K] float32 (S = model.max_seq_len)
                    -> logits [B, T, V], present.{i}.key/.value [B, S, N, K] (the same buffers, the T new rows written)
B and T are symbolic (dim_params "B", "T"). jaxbig.serve.onnx_runtime runs the loop (greedy = argmax).

What is jaxbig's and what is a library's:
  * the math is the model's own (`Llama.__call__`, `Block.__call__`), traced by jax2onnx; nothing is re-written in ONNX;
  * three hooks shape the traced program so ONNX Runtime's quantizers can find the weights: layers run in a Python
    loop over host arrays (jax2onnx turns `lax.scan` into a `Loop` whose body slices the stacked weights: no quantizer
    looks inside it), every weight matmul is a `MatMul` against a 2-D initializer (`_matmul_dense`: the einsum's
    weight reshaped on the host; jax2onnx emits `Einsum` for 3-D weights, which both quantizers skip), and positions
    come from a cumulative sum (jax2onnx 0.17 cannot broadcast `arange` of a symbolic length);
  * quantization is ONNX Runtime's own tools (`quantize`): MatMulNBitsQuantizer (int8/int4 weight-only, MatMulNBits),
    quantize_dynamic (the int8 embedding; int8-dynamic's W8A8).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax._src.core as jax_core
import jax.extend.core as jax_extend_core
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from flax import nnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from jaxbig.compress.int4 import GROUPS as INT4_GROUPS
from jaxbig.config import ConfigError, ModelConfig
from jaxbig.models import abstract_model
from jaxbig.models.llama import use_constrain, use_dense

OPSET = 23  # jax2onnx's default; ONNX Runtime >= 1.24 runs it
FORWARD_FILE, STEP_FILE = "model.onnx", "decode_step.onnx"
METHODS = ("none", "int8", "int8-dynamic", "int4")  # what --quantize means for ONNX (fp8: no ONNX Runtime CPU path)


def _jax2onnx():
    """`jax2onnx.to_onnx`, made to run on this JAX.

    jax2onnx 0.17.1 (the newest release) reads `jax._src.core.ClosedJaxpr`, which JAX 0.12 keeps only as
    `jax.extend.core.ClosedJaxpr` (the same class); we alias it back if it is missing. Its plugin loader
    logs every optional plugin whose library (equinox, dm_pix) is absent: silenced, they are not used.
    """
    if not hasattr(jax_core, "ClosedJaxpr"):
        jax_core.ClosedJaxpr = jax_extend_core.ClosedJaxpr
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    from jax2onnx import to_onnx  # after the alias: jax2onnx reads it while importing its plugins

    return to_onnx


def _python_layers(body, layers, x_BTD, side):
    """A layer runner that slices the stacked host params in Python: one copy of the layer per layer, each
    weight its own initializer (see the module docstring)."""
    for i in range(jax.tree.leaves(layers)[0].shape[0]):
        x_BTD = body(jax.tree.map(lambda a: a[i], layers), x_BTD, side)
    return x_BTD


def _matmul_dense(spec: str, x: jax.Array, w: Any, preferred_element_type: Any = None) -> jax.Array:
    """`einsum(spec, x, w)` as x[..., C] @ w[C, N] with w reshaped on the host: a MatMul on a 2-D initializer.

    Every weight einsum in `jaxbig.models.llama` contracts x's trailing letters and lists x's free letters, then
    w's free ones, in its output; anything else (or a traced weight) stays an einsum.
    """
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in xs if c in ws and c not in out]
    x_free, w_free = xs[: len(xs) - len(contracted)], [c for c in ws if c not in contracted]
    if not isinstance(w, np.ndarray) or xs[len(x_free) :] != "".join(contracted) or out != x_free + "".join(w_free):
        return jnp.einsum(spec, x, jnp.asarray(w, x.dtype), preferred_element_type=preferred_element_type)
    w = np.asarray(w, np.float32)
    order = [ws.index(c) for c in contracted] + [ws.index(c) for c in w_free]
    c_size = int(np.prod([w.shape[ws.index(c)] for c in contracted]))
    w_CN = np.ascontiguousarray(w.transpose(order).reshape(c_size, -1))
    x_MC = x.reshape(*x.shape[: len(x_free)], c_size)
    y = jnp.matmul(x_MC, w_CN)
    return y.reshape(*x.shape[: len(x_free)], *[w.shape[ws.index(c)] for c in w_free]).astype(preferred_element_type or x.dtype)


def _host_model(cfg: ModelConfig, params: dict):
    """The model with host (numpy) params and no remat (jax.checkpoint would make the weights traced values)."""
    cfg = dataclasses.replace(cfg, remat="none")
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params))


def _positions(tokens_BT: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    return start + jnp.cumsum(jnp.ones_like(tokens_BT), axis=1) - 1


def _convert(fn: Callable, inputs: list, input_names: list[str], output_names: list[str], name: str) -> onnx.ModelProto:
    with use_dense(_matmul_dense), use_constrain(lambda x, logical: x):  # no mesh: constraints are no-ops
        return _jax2onnx()(fn, inputs, input_names=input_names, output_names=output_names, model_name=name, opset=OPSET)


def forward_proto(cfg: ModelConfig, params: dict) -> onnx.ModelProto:
    """serving_default: tokens [B, T] int32 -> logits [B, T, V] float32."""
    model = _host_model(cfg, params)

    def forward(tokens_BT):
        return model(tokens_BT, _positions(tokens_BT), run_layers=_python_layers)

    return _convert(forward, [jax.ShapeDtypeStruct(("B", "T"), jnp.int32)], ["tokens"], ["logits"], "jaxbig_forward")


def step_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), ONNX Runtime GenAI's pattern, key then value per layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def step_proto(cfg: ModelConfig, params: dict) -> onnx.ModelProto:
    """One decode step over a cache of model.max_seq_len rows (see the module docstring)."""
    model = _host_model(cfg, params)
    graphdef, layers = nnx.split(model.blocks)
    L, S, N, K = cfg.num_layers, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim
    head_DV = model.embed_VD[...].T if model.lm_head_DV is None else model.lm_head_DV[...]

    def step(input_ids_BT, position, *past):
        # Llama.__call__'s cached path, with the layers in a Python loop (it scans them): embed, blocks, norm, head.
        positions_BT = _positions(input_ids_BT, position)
        x_BTD = jnp.take(model.embed_VD[...], input_ids_BT, axis=0).astype(jnp.float32)
        present = []
        for i in range(L):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], layers))
            x_BTD, cache = block(x_BTD, positions_BT, {"k": past[2 * i], "v": past[2 * i + 1]})
            present += [cache["k"], cache["v"]]
        logits_BTV = _matmul_dense("BTD,DV->BTV", model.final_norm(x_BTD), head_DV, preferred_element_type=jnp.float32)
        return (logits_BTV, *present)

    past_names, present_names = step_names(L)
    B, T = jax.export.symbolic_shape("B, T", constraints=[f"T <= {S}"])  # the cache update needs T <= S
    cache = jax.ShapeDtypeStruct((B, S, N, K), jnp.float32)
    inputs = [jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32), *[cache] * (2 * L)]
    return _convert(step, inputs, ["input_ids", "position", *past_names], ["logits", *present_names], "jaxbig_decode_step")


def check(path: Path) -> None:
    """onnx's full check (shape inference included) and an ONNX Runtime session with every optimisation on."""
    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"--quantize {method!r} has no ONNX export; ONNX takes {', '.join(METHODS)} (fp8: ONNX Runtime has no CPU kernel for it; use --format savedmodel)")
    if method == "int4" and group_size not in INT4_GROUPS:
        raise ConfigError(f"--group_size {group_size} is not supported; use one of {', '.join(map(str, INT4_GROUPS))}")


def _nbits(src: Path, dst: Path, bits: int, group_size: int, op_types: tuple[str, ...]) -> None:
    config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=True, op_types_to_quantize=op_types, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), False)


def quantize(src: Path, dst: Path, method: str, group_size: int = 64) -> dict:
    """ONNX Runtime's quantizers on a float graph; returns what was done, for the manifest.

    int8 and int4 are weight-only (as the SavedModel's int8): MatMulNBits dequantizes groups of `group_size`
    weights along the contracted axis inside its kernel and multiplies in float32, so a row's answer does not
    depend on the other rows of its batch. int8-dynamic is quantize_dynamic's W8A8: it quantizes activations
    per *tensor* at run time, so under batching a row's logits move with its batch-mates (the SavedModel's
    int8-dynamic scales per row).
    """
    symmetric = f"symmetric, one float32 scale per {group_size} weights along the contracted axis (round to nearest)"
    if method == "int8":
        # MatMulNBits has no 8-bit Gather (GatherBlockQuantized is 4-bit only): the embedding goes through
        # quantize_dynamic's weight-only Gather path (int8 + DequantizeLinear, one scale for the whole table: its
        # per_channel does not apply to Gather), the matmuls through MatMulNBits bits=8.
        mid = dst.with_name(f"gather-{dst.name}")
        quantize_dynamic(src, mid, op_types_to_quantize=["Gather"], per_channel=True, weight_type=QuantType.QInt8)
        _nbits(mid, dst, 8, group_size, ("MatMul",))
        mid.unlink()
        return {"tools": ["quantize_dynamic (Gather)", "MatMulNBitsQuantizer (MatMul)"], "weights": f"int8 {symmetric}; embedding int8 with one scale", "activations": "float32"}
    if method == "int8-dynamic":
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gather"], per_channel=True, weight_type=QuantType.QInt8)
        return {"tools": ["quantize_dynamic"], "weights": "int8 per output channel; embedding int8 with one scale", "activations": "uint8, one scale per tensor computed at run time"}
    if method == "int4":
        _nbits(src, dst, 4, group_size, ("MatMul", "Gather"))
        return {"tools": ["MatMulNBitsQuantizer"], "weights": f"int4 {symmetric}; embedding by GatherBlockQuantized", "activations": "float32"}
    raise ConfigError(f"no ONNX quantization {method!r}")


def write(out: Path, cfg: ModelConfig, params: dict, method: str = "none", group_size: int = 64) -> dict:
    """Writes out/model.onnx and out/decode_step.onnx (quantized by `method`), checks both; returns the manifest entry."""
    check_method(method, group_size)
    out.mkdir(parents=True)
    done = {}  # what the quantizers did (the same for both graphs)
    for file, make in ((FORWARD_FILE, forward_proto), (STEP_FILE, step_proto)):
        proto = make(cfg, params)
        if method == "none":
            onnx.save(proto, str(out / file))
        else:
            onnx.save(proto, str(out / f"float-{file}"))
            done = quantize(out / f"float-{file}", out / file, method, group_size)
            (out / f"float-{file}").unlink()
        check(out / file)
    model = onnx.load(str(out / FORWARD_FILE), load_external_data=False)
    return {
        "files": {"serving_default": f"onnx/{FORWARD_FILE}", "decode_step": f"onnx/{STEP_FILE}"},
        "opset": {d.domain or "ai.onnx": d.version for d in model.opset_import},
        "ir_version": model.ir_version,
        "quantization": {"method": method, **({"group_size": group_size} if method in ("int8", "int4") else {}), **done},
        "converter": _converter_versions(),
    }


def _converter_versions() -> dict:
    return {p: importlib.metadata.version(p) for p in ("jax2onnx", "onnx", "onnxruntime")}


__all__ = ["FORWARD_FILE", "METHODS", "OPSET", "STEP_FILE", "check", "forward_proto", "quantize", "step_names", "step_proto", "write"]
