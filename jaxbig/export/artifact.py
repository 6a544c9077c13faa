"""The `jax.export` artifacts: next-token logits and KV-cache generation as functions of flat param leaves.

Params are *arguments* (a flat list of arrays named by a path manifest), never closure
constants: the serialized module stays small, the same module serves float32 and quantized
weights' shapes, and TF stores the leaves as variables. Quantized leaves are dequantized
inside the function (`q.astype(f32) * scale`) right before the model's matmuls run. For
`int8-dynamic` the function is traced under `use_dense(dynamic_int8_einsum)` and the matmul weights
reach it as `Int8Weight`s: each weight matmul takes the stored int8 weight and its scale as they
are, quantizes its activations per row, and multiplies int8 x int8 -> int32 (see
`jaxbig.compress.quantize`).

Artifact files (in the export's version directory):
  jax/forward.jax_exported   serialized `Exported`: (leaves, tokens_BT) -> logits_BTV
  jax/generate.jax_exported  (leaves, prompt_BP, max_new_tokens, temperature, seed) -> tokens_BS
  jax/params.npz             the leaves by name (dtypes numpy lacks are stored as raw uint8 bytes)
  manifest.json              names, shapes and dtypes of the leaves, in argument order, and more.
`jaxbig.export.reload.load_exported` reads them back with jax, numpy and json only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export

from jaxbig.compress.quantize import DYNAMIC_METHODS, dynamic_int8_einsum, llama_rules, weight_operand
from jaxbig.config import ModelConfig
from jaxbig.models.decode import sample_logits
from jaxbig.models.llama import init_cache, portable_attention, use_dense
from jaxbig.models.paths import nest, to_flat

PLATFORMS = ("cpu", "cuda")
Leaves = list[tuple[str, np.ndarray]]  # (name, array) in argument order


def flatten_params(params: dict) -> dict[str, np.ndarray]:
    """Nested pure-dict params -> {'blocks/attn/wq_DHK': host array}, in tree order."""
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in to_flat(params).items()}


def to_leaves(qparams: dict[str, dict[str, np.ndarray]]) -> Leaves:
    """Quantized entries -> named leaves: `path` for float weights, `path.q` / `path.scale` otherwise."""
    leaves = []
    for path, entry in qparams.items():
        for role, arr in entry.items():
            leaves.append((path if role == "w" else f"{path}.{role}", arr))
    return leaves


def _params_from_leaves(names: list[str], arrays, quantize: str = "none") -> dict:
    entries: dict[str, dict[str, Any]] = {}
    for name, arr in zip(names, arrays, strict=True):
        path, _, role = name.partition(".")
        entries.setdefault(path, {})[role or "w"] = arr
    rules = llama_rules()
    return nest({path: weight_operand(path, e, quantize, rules) for path, e in entries.items()})


def dense_fn(quantize: str):
    """The weight-matmul implementation the exported functions trace under (None: plain einsum)."""
    return dynamic_int8_einsum if quantize in DYNAMIC_METHODS else None


def make_forward(graphdef: nnx.GraphDef, names: list[str], quantize: str = "none"):
    def forward(leaves, tokens_BT):
        model = nnx.merge(graphdef, _params_from_leaves(names, leaves, quantize))
        # Read while tracing, so they land in the exported module; one module for CPU and CUDA, so no cuDNN call.
        with use_dense(dense_fn(quantize)), portable_attention():
            return model(tokens_BT)

    return forward


def make_generate(graphdef: nnx.GraphDef, cfg: ModelConfig, names: list[str], quantize: str = "none"):
    """KV-cache decoding with a *traced* token count: a cache of model.max_seq_len, a while loop.

    Returns [B, max_seq_len] int32 whose first `max_new_tokens` columns are the continuation
    (the caller slices). Greedy when temperature <= 0, as `jaxbig.models.decode.generate`; the
    sampling key of token i is fold_in(key(seed), i). Needs prompt + max_new_tokens <= max_seq_len
    (the TF signature asserts it; here positions past the cache would be clamped).
    """
    S = cfg.max_seq_len

    def generate(leaves, prompt_BP, max_new_tokens, temperature, seed):
        with use_dense(dense_fn(quantize)), portable_attention():  # the while loop's body is traced inside this block too
            return _generate(leaves, prompt_BP, max_new_tokens, temperature, seed)

    def _generate(leaves, prompt_BP, max_new_tokens, temperature, seed):
        model = nnx.merge(graphdef, _params_from_leaves(names, leaves, quantize))
        B, P = prompt_BP.shape
        key = jax.random.key(seed)
        cache = init_cache(cfg, B, S)
        positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        logits_BPV, cache = model(prompt_BP, positions_BP, cache)
        first_B = sample_logits(logits_BPV[:, -1], jax.random.fold_in(key, 0), temperature, 0)
        out_BS = jnp.zeros((B, S), jnp.int32).at[:, 0].set(first_B)

        def cond(carry):
            return carry[0] < max_new_tokens

        def body(carry):
            i, token_B, cache, out_BS = carry
            positions_B1 = jnp.full((B, 1), P + i - 1, jnp.int32)
            logits_B1V, cache = model(token_B[:, None], positions_B1, cache)
            next_B = sample_logits(logits_B1V[:, 0], jax.random.fold_in(key, i), temperature, 0)
            out_BS = jax.lax.dynamic_update_slice(out_BS, next_B[:, None], (jnp.int32(0), i))
            return i + 1, next_B, cache, out_BS

        carry = (jnp.int32(1), first_B, cache, out_BS)
        return jax.lax.while_loop(cond, body, carry)[3]

    return generate


def export_functions(graphdef: nnx.GraphDef, cfg: ModelConfig, leaves: Leaves, quantize: str = "none") -> tuple[export.Exported, export.Exported]:
    """(forward, generate), each lowered for cpu and cuda with symbolic batch and length."""
    names = [n for n, _ in leaves]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for _, a in leaves]
    b, t = export.symbolic_shape("b, t")
    forward = export.export(jax.jit(make_forward(graphdef, names, quantize)), platforms=PLATFORMS)(specs, jax.ShapeDtypeStruct((b, t), jnp.int32))
    b, p = export.symbolic_shape("b, p", constraints=[f"p <= {cfg.max_seq_len}"])
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    generate = export.export(jax.jit(make_generate(graphdef, cfg, names, quantize)), platforms=PLATFORMS)(
        specs, jax.ShapeDtypeStruct((b, p), jnp.int32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32)
    )
    return forward, generate


def _storable(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8) if a.dtype.kind == "V" or a.dtype.name not in np.sctypeDict else a


def write_artifacts(out: Path, forward: export.Exported, generate: export.Exported, leaves: Leaves) -> None:
    (out / "jax").mkdir(parents=True)
    (out / "jax" / "forward.jax_exported").write_bytes(forward.serialize())
    (out / "jax" / "generate.jax_exported").write_bytes(generate.serialize())
    np.savez(out / "jax" / "params.npz", **{n: _storable(a) for n, a in leaves})


def leaf_manifest(leaves: Leaves) -> list[dict]:
    return [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in leaves]
