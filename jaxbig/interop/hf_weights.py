"""Hugging Face tensor names <-> jaxbig param paths, and reading any slice of a jaxbig param from safetensors.

The mapping (docs/interop.md has it as a table). transformers' `nn.Linear(in, out)` stores `weight` as
[out, in]; heads are split as `view(..., -1, head_dim)`, so flat index h*K + k is head h, dim k. HF's
rotate-half RoPE is jaxbig's, so q and k need no permutation (files converted from Meta's interleaved
originals were already permuted by transformers' converter). Block params are stacked on a leading
layers axis in jaxbig and are one tensor per layer in HF.

    kind    jaxbig (per layer)   HF              jaxbig[i] from HF
    same    [...]                [...]           W[i]
    T       [A, B]               [B, A]          W[b, a]
    in_heads  [D, H, K]          [H*K, D]        W[h*K + k, d]      (q/k/v projections)
    out_heads [H, K, D]          [D, H*K]        W[d, h*K + k]      (o projection)
    heads   [H, K]               [H*K]           b[h*K + k]         (Qwen2's q/k/v biases)

Reading (`read_slice`) goes through `safetensors.safe_open(...).get_slice`, which reads only the bytes of
the requested rows/columns from the memory-mapped file, so a device's shard of a param costs the host no
more than that shard (plus the rows it spans for a transposed read).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxbig.config import ModelConfig

KINDS = ("same", "T", "in_heads", "out_heads", "heads")
# Tensors some checkpoints carry that hold no parameter: RoPE tables transformers recomputes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One jaxbig param and the HF tensor(s) it is made of."""

    path: tuple[str, ...]  # jaxbig param path, e.g. ("blocks", "attn", "wq_DHK")
    hf_name: str  # HF tensor name; per-layer ones hold `{l}`
    kind: str  # one of KINDS
    layered: bool  # stacked on a leading layers axis in jaxbig, one tensor per layer in HF


def param_map(cfg: ModelConfig) -> list[Entry]:
    """Every jaxbig param of `cfg` with the HF tensor it comes from (the tied head has none: it is the embedding)."""
    pre = "model.layers.{l}."
    entries = [
        Entry(("embed_VD",), "model.embed_tokens.weight", "same", False),
        Entry(("final_norm", "scale"), "model.norm.weight", "same", False),
        Entry(("blocks", "attn_norm", "scale"), pre + "input_layernorm.weight", "same", True),
        Entry(("blocks", "mlp_norm", "scale"), pre + "post_attention_layernorm.weight", "same", True),
        Entry(("blocks", "attn", "wq_DHK"), pre + "self_attn.q_proj.weight", "in_heads", True),
        Entry(("blocks", "attn", "wk_DNK"), pre + "self_attn.k_proj.weight", "in_heads", True),
        Entry(("blocks", "attn", "wv_DNK"), pre + "self_attn.v_proj.weight", "in_heads", True),
        Entry(("blocks", "attn", "wo_HKD"), pre + "self_attn.o_proj.weight", "out_heads", True),
        Entry(("blocks", "mlp", "w_gate_DF"), pre + "mlp.gate_proj.weight", "T", True),
        Entry(("blocks", "mlp", "w_up_DF"), pre + "mlp.up_proj.weight", "T", True),
        Entry(("blocks", "mlp", "w_down_FD"), pre + "mlp.down_proj.weight", "T", True),
    ]
    if cfg.qkv_bias:
        entries += [
            Entry(("blocks", "attn", "q_bias_HK"), pre + "self_attn.q_proj.bias", "heads", True),
            Entry(("blocks", "attn", "k_bias_NK"), pre + "self_attn.k_proj.bias", "heads", True),
            Entry(("blocks", "attn", "v_bias_NK"), pre + "self_attn.v_proj.bias", "heads", True),
        ]
    if not cfg.tie_embeddings:
        entries.append(Entry(("lm_head_DV",), "lm_head.weight", "T", False))
    return entries


def hf_names(entry: Entry, num_layers: int) -> list[str]:
    return [entry.hf_name.format(l=l) for l in range(num_layers)] if entry.layered else [entry.hf_name]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for one layer's jaxbig shape."""
    if kind == "same":
        return shape
    if kind == "T":
        return (shape[1], shape[0])
    if kind == "in_heads":  # [D, H, K] -> [H*K, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "out_heads":  # [H, K, D] -> [D, H*K]
        return (shape[2], shape[0] * shape[1])
    if kind == "heads":  # [H, K] -> [H*K]
        return (shape[0] * shape[1],)
    raise ValueError(f"unknown mapping kind {kind!r}")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided slice {s} of a param; shards are contiguous")
        out.append((start, stop))
    return out


def read_slice(tensor: Any, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """jaxbig[index] of one layer (per-layer `shape`), read from `tensor`, a safetensors `get_slice` handle of its HF tensor.

    Only the HF rows/columns the slice needs are read; a split head dim (never sharded by jaxbig's rules) reads
    whole heads, then selects.
    """
    b = _bounds(index, shape)
    if kind == "same":
        return np.asarray(tensor[tuple(slice(*x) for x in b)])
    if kind == "T":
        (a0, a1), (b0, b1) = b
        return np.asarray(tensor[b0:b1, a0:a1]).T
    if kind == "in_heads":  # jaxbig[d, h, k] = W[h*K + k, d]
        (d0, d1), (h0, h1), (k0, k1) = b
        K = shape[2]
        rows = np.asarray(tensor[h0 * K : h1 * K, d0:d1])  # [(h1-h0)*K, d1-d0]
        return rows.T.reshape(d1 - d0, h1 - h0, K)[:, :, k0:k1]
    if kind == "out_heads":  # jaxbig[h, k, d] = W[d, h*K + k]
        (h0, h1), (k0, k1), (d0, d1) = b
        K = shape[1]
        cols = np.asarray(tensor[d0:d1, h0 * K : h1 * K])  # [d1-d0, (h1-h0)*K]
        return cols.T.reshape(h1 - h0, K, d1 - d0)[:, k0:k1, :]
    if kind == "heads":  # jaxbig[h, k] = b[h*K + k]
        (h0, h1), (k0, k1) = b
        K = shape[1]
        return np.asarray(tensor[h0 * K : h1 * K]).reshape(h1 - h0, K)[:, k0:k1]
    raise ValueError(f"unknown mapping kind {kind!r}")


def layer_to_hf(kind: str, layer: np.ndarray) -> np.ndarray:
    """One layer of a jaxbig param as its HF tensor, C-contiguous (safetensors 0.8 writes a non-contiguous array's
    memory as if it were contiguous, silently: safetensors#825)."""
    if kind == "same":
        out = layer
    elif kind == "T":
        out = layer.T
    elif kind == "in_heads":
        D, H, K = layer.shape
        out = layer.reshape(D, H * K).T
    elif kind == "out_heads":
        H, K, D = layer.shape
        out = layer.reshape(H * K, D).T
    elif kind == "heads":
        out = layer.reshape(-1)
    else:
        raise ValueError(f"unknown mapping kind {kind!r}")
    return np.ascontiguousarray(out)


__all__ = ["Entry", "IGNORED_SUFFIXES", "KINDS", "hf_names", "hf_shape", "param_map", "layer_to_hf", "read_slice"]
