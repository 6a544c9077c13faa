"""Layout guards: refuse a mesh that cannot shard the model the way the user asked, naming the numbers.

Two checks run before anything is allocated (`check_layout`, called by `jaxbig.train.setup.check_run`
for the train loop and the planner alike):

1. Divisibility, with the numbers and the nearest sizes that work:
   - tensor > 1: `model.num_heads`, `model.d_ff` and `model.vocab_size` must be multiples of
     `tensor` (heads, MLP and vocabulary are split over it). KV heads either split over tensor
     (`num_kv_heads % tensor == 0`) or, when there are fewer of them (`tensor % num_kv_heads == 0`,
     e.g. 8 KV heads on tensor=16), are replicated: each tensor shard keeps the KV heads its
     query heads read, the usual GQA practice. Anything else is refused.
   - fsdp > 1: `model.d_model` must be a multiple of `fsdp` (the `embed` axis is what fsdp splits).
2. Replication under FSDP: with fsdp > 1, at most `FSDP_REPLICATED_TOLERANCE` (2%, MaxText's
   `sharding_tolerance` default) of the parameter bytes may stay replicated over the fsdp axis.
   Norm scales are (a fraction of a percent in any real model); a weight that the rules could
   not split is not. The error lists the largest such params and the fix.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding

from jaxbig.config import ConfigError, ModelConfig
from jaxbig.models import Params, logical_axes
from jaxbig.parallel.rules import tree_shardings

FSDP_REPLICATED_TOLERANCE = 0.02  # share of param bytes allowed to stay whole on every fsdp shard


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_sizes(model: ModelConfig) -> list[int]:
    """Tensor-parallel sizes this model accepts: they divide num_heads, d_ff and vocab_size, and fit the KV heads."""
    kv = model.num_kv_heads
    return [
        t
        for t in _divisors(model.num_heads)
        if model.d_ff % t == 0 and model.vocab_size % t == 0 and (kv % t == 0 or t % kv == 0)
    ]


def check_divisibility(model: ModelConfig, sizes: dict[str, int]) -> None:
    """Raises ConfigError when a split axis does not divide the dimension it splits."""
    tensor, fsdp = sizes.get("tensor", 1), sizes.get("fsdp", 1)
    fix = f"use tensor in {{{', '.join(map(str, tensor_sizes(model)))}}} (they divide num_heads, d_ff and vocab_size and fit num_kv_heads)"
    if tensor > 1:
        for field, what in (("num_heads", "query heads"), ("d_ff", "MLP width"), ("vocab_size", "vocabulary")):
            value = getattr(model, field)
            if value % tensor:
                raise ConfigError(
                    f"model.{field}={value} is not divisible by mesh tensor={tensor}: tensor parallelism splits the {what} "
                    f"into {tensor} equal parts; {fix}" + (", or pad model.vocab_size up to a multiple of tensor" if field == "vocab_size" else "")
                )
        kv = model.num_kv_heads
        if kv % tensor and tensor % kv:
            raise ConfigError(
                f"model.num_kv_heads={kv} does not fit mesh tensor={tensor}: KV heads are split over tensor when num_kv_heads "
                f"is a multiple of it, or replicated on every tensor shard when it divides tensor; {kv} is neither; {fix}"
            )
    if fsdp > 1 and model.d_model % fsdp:
        options = [d for d in _divisors(model.d_model) if d <= 4 * fsdp]
        raise ConfigError(
            f"model.d_model={model.d_model} is not divisible by mesh fsdp={fsdp}: FSDP splits every weight along d_model; "
            f"use fsdp in {{{', '.join(map(str, options))}}} (divisors of d_model), and the remaining devices for data"
        )


def _splits_over(sharding: NamedSharding, axis: str) -> bool:
    return any(axis == a or (isinstance(a, tuple) and axis in a) for a in sharding.spec)


def replicated_over(abstract: Params, shardings: Params, axis: str) -> tuple[float, list[tuple[str, float]]]:
    """(share of param bytes not split over `axis`, [(param path, bytes)] of those params, largest first)."""
    total, offenders = 0.0, []
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings)):
        nbytes = math.prod(x.shape) * x.dtype.itemsize
        total += nbytes
        if not _splits_over(s, axis):
            offenders.append((jax.tree_util.keystr(path, simple=True, separator="/"), float(nbytes)))
    offenders.sort(key=lambda o: -o[1])
    return (sum(b for _, b in offenders) / total if total else 0.0), offenders


def check_fsdp_replication(abstract: Params, shardings: Params, mesh: Mesh, tolerance: float = FSDP_REPLICATED_TOLERANCE) -> None:
    """With fsdp > 1, refuses a layout leaving more than `tolerance` of the param bytes whole on every fsdp shard."""
    fsdp = dict(mesh.shape).get("fsdp", 1)
    if fsdp <= 1:
        return
    share, offenders = replicated_over(abstract, shardings, "fsdp")
    if share > tolerance:
        top = ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in offenders[:5])
        raise ConfigError(
            f"mesh fsdp={fsdp} leaves {share:.1%} of the parameter bytes replicated over fsdp (limit {tolerance:.0%}); "
            f"largest: {top}. Each of these is stored whole on every fsdp shard: make the dimension the rules split "
            f"over fsdp divisible by {fsdp} (see jaxbig/parallel/rules.py), or use data parallelism for those devices"
        )


def check_sequence_parallel(seq_len: int, sequence_parallel: bool, sizes: dict[str, int]) -> None:
    """Sequence parallelism splits the residual stream's tokens over tensor: seq_len must divide."""
    tensor = sizes.get("tensor", 1)
    if sequence_parallel and seq_len % tensor:
        raise ConfigError(
            f"parallel.sequence_parallel splits data.seq_len={seq_len} over mesh tensor={tensor}, which does not divide it; "
            f"use a seq_len that is a multiple of {tensor} or turn sequence_parallel off"
        )


def check_layout(model: ModelConfig, mesh: Mesh) -> None:
    """Both guards, from the model config and the mesh; nothing is allocated."""
    check_divisibility(model, dict(mesh.shape))
    _, abstract, logical = logical_axes(model)
    check_fsdp_replication(abstract, tree_shardings(logical, abstract, mesh), mesh)


__all__ = ["FSDP_REPLICATED_TOLERANCE", "check_divisibility", "check_sequence_parallel", "check_fsdp_replication", "check_layout", "replicated_over"]
