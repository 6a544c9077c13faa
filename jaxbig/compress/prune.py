"""Magnitude and N:M pruning during training, as an optax transform whose state holds the masks.

`prune_updates(plan)` goes last in the optimizer chain (`clip -> adamw -> prune`). Its state
is `PruneState(count, masks)`: a boolean mask per pruned weight (True = kept), shaped and
sharded like the weight (`jaxbig.optim.per_replica.opt_state_shardings` matches it to its
param by key path), so the orbax checkpoint of the train state saves and restores the masks
with everything else. Each update:

1. On a mask-update step (`start_step`, then every `update_every` steps up to `end_step`) the
   masks are recomputed from the magnitudes of the weights this update would produce.
2. Where a mask is True the update passes through unchanged; where it is False the update is
   `-param`, so `param + update` is exactly 0.0. Pruned weights stay at exactly zero, and once
   zero they are the smallest magnitudes, so a later mask update keeps them pruned (sparsity
   only grows, as in Zhu & Gupta 2017).

Methods:
- magnitude: the smallest-|w| fraction `s(t)` of each weight's layer slice (`scope=layer`: the
  stacked `[L, ...]` weights are pruned per layer) or of all pruned weights together
  (`scope=global`) is zeroed; `s(t)` follows the cubic schedule
  `s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3` of Zhu & Gupta, "To prune, or not to prune".
  Exactly `floor(s·n)` entries are pruned (a rank, not a threshold, so ties cannot overshoot).
- nm: N:M structured sparsity (2:4 for sparse tensor cores): in every group of m consecutive
  weights along the weight's contracted (input) axis, the n largest |w| are kept. The
  contracted axes are those of `jaxbig.compress.quantize.llama_rules` (the last one when a
  weight contracts over two, e.g. wo_HKD over H and K: groups run along K).

Why not jaxpruner (google-research): it is not installable from the package index this project
uses (pip finds no distribution), and its per-"layer" sparsity treats a parameter as the unit,
while jaxbig stacks its layers into one `[L, ...]` parameter; the mask-in-optimizer-state design
below is the one jaxpruner uses, in ~200 lines.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbig.compress.quantize import QuantRule, llama_rules
from jaxbig.config import ConfigError, PruneConfig

Params = dict[str, Any]


class PruneState(NamedTuple):
    count: jax.Array  # int32: updates seen (the train step of the update being made)
    masks: Params  # bool, True = kept; a sub-tree of the params holding only the pruned weights


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What `prune_updates` does; `from_config` builds it from `PruneConfig`."""

    method: str  # magnitude or nm
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    scope: str = "layer"
    n: int = 2
    m: int = 4
    start_step: int = 0
    end_step: int = 0
    update_every: int = 1
    include: tuple[str, ...] = (r"blocks/attn/w.*", r"blocks/mlp/w.*")
    rules: tuple[QuantRule, ...] = llama_rules()  # contracted axes per weight (nm groups run along the last)

    @classmethod
    def from_config(cls, cfg: PruneConfig) -> PrunePlan:
        if cfg.method == "none":
            raise ConfigError("prune.method=none builds no pruning transform")
        return cls(
            method=cfg.method, sparsity=cfg.sparsity, initial_sparsity=cfg.initial_sparsity, scope=cfg.scope, n=cfg.n, m=cfg.m,
            start_step=cfg.start_step, end_step=cfg.end_step, update_every=cfg.update_every, include=cfg.include,
        )

    def selected(self, path: str) -> bool:
        return any(re.fullmatch(p, path) for p in self.include)

    def sparsity_at(self, step: jax.Array) -> jax.Array:
        """Zhu & Gupta's cubic ramp from initial_sparsity at start_step to sparsity at end_step."""
        if self.end_step == self.start_step:
            return jnp.float32(self.sparsity)
        frac = jnp.clip((step - self.start_step) / (self.end_step - self.start_step), 0.0, 1.0)
        return (self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - frac) ** 3).astype(jnp.float32)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return (step >= self.start_step) & (step <= self.end_step) & ((step - self.start_step) % self.update_every == 0)

    def group_axis(self, path: str, ndim: int) -> int:
        """nm: the axis the groups of m run along (the weight's last contracted axis)."""
        rule = next((r for r in self.rules if re.fullmatch(r.pattern, path)), None)
        if rule is None:
            raise ConfigError(
                f"prune.method=nm: no contraction rule for {path!r}, so the axis of its N:M groups is unknown; "
                "prune only the linear layers (prune.include) or add a rule to jaxbig.compress.quantize.llama_rules"
            )
        if max(rule.reduce_axes) >= ndim:
            raise ConfigError(f"prune.method=nm: rule {rule.pattern!r} names axis {max(rule.reduce_axes)} but {path!r} has {ndim} dims")
        return max(rule.reduce_axes)


# --------------------------------------------------------------------------- params as paths


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def select(params: Params, plan: PrunePlan) -> Params:
    """The sub-tree of `params` holding only the weights `plan.include` names (same nesting)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if plan.selected(path_str(path)):
            node = out
            for k in path[:-1]:
                node = node.setdefault(k.key, {})
            node[path[-1].key] = leaf
    return out


def _is_layer_stacked(path: str) -> bool:
    return path.startswith("blocks/")  # block weights carry a leading [L] axis (jaxbig.models.llama)


# --------------------------------------------------------------------------- masks


def _keep_largest(abs_flat: jax.Array, num_pruned: jax.Array) -> jax.Array:
    """Boolean mask over a 1-D array: all but the `num_pruned` smallest entries (ties by position)."""
    ranks = jnp.zeros(abs_flat.shape, jnp.int32).at[jnp.argsort(abs_flat, stable=True)].set(jnp.arange(abs_flat.size, dtype=jnp.int32))
    return ranks >= num_pruned


def magnitude_masks(weights: Params, sparsity: jax.Array, scope: str) -> Params:
    """True where kept: the `floor(sparsity·n)` smallest |w| pruned per layer slice (layer) or over all weights (global)."""
    flat = {path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(weights)[0]}
    if scope == "global":
        abs_all = jnp.concatenate([jnp.abs(w.astype(jnp.float32)).ravel() for w in flat.values()])
        keep = _keep_largest(abs_all, jnp.floor(sparsity * abs_all.size).astype(jnp.int32))
        sizes = np.cumsum([w.size for w in flat.values()])[:-1]
        pieces = jnp.split(keep, sizes)
        masks = {path: piece.reshape(w.shape) for (path, w), piece in zip(flat.items(), pieces)}
    elif scope == "layer":
        masks = {}
        for path, w in flat.items():
            rows = w.reshape(w.shape[0], -1) if _is_layer_stacked(path) else w.reshape(1, -1)
            n = rows.shape[1]
            keep = jax.vmap(lambda r: _keep_largest(jnp.abs(r.astype(jnp.float32)), jnp.floor(sparsity * n).astype(jnp.int32)))(rows)
            masks[path] = keep.reshape(w.shape)
    else:
        raise ConfigError(f"prune.scope={scope!r}: use layer or global")
    return _like(weights, masks)


def nm_mask(w: jax.Array, n: int, m: int, axis: int, path: str = "weight") -> jax.Array:
    """True where kept: the n largest |w| of every m consecutive entries along `axis` (exactly n per group)."""
    if w.shape[axis] % m:
        raise ConfigError(
            f"prune.method=nm: {path} has {w.shape[axis]} entries along its contracted axis {axis} (shape {w.shape}), "
            f"not a multiple of prune.m={m}; choose m dividing {w.shape[axis]} or leave this weight out of prune.include"
        )
    moved = jnp.moveaxis(jnp.abs(w.astype(jnp.float32)), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    # rank within each group, largest first (stable: ties go to the earlier entry), keep ranks < n
    order = jnp.argsort(-groups, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = (ranks < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis)


def nm_masks(weights: Params, plan: PrunePlan) -> Params:
    masks = {}
    for p, w in jax.tree_util.tree_flatten_with_path(weights)[0]:
        path = path_str(p)
        masks[path] = nm_mask(w, plan.n, plan.m, plan.group_axis(path, w.ndim), path)
    return _like(weights, masks)


def _like(tree: Params, by_path: dict[str, jax.Array]) -> Params:
    return jax.tree_util.tree_map_with_path(lambda p, _: by_path[path_str(p)], tree)


def compute_masks(weights: Params, plan: PrunePlan, step: jax.Array) -> Params:
    if plan.method == "magnitude":
        return magnitude_masks(weights, plan.sparsity_at(step), plan.scope)
    if plan.method == "nm":
        return nm_masks(weights, plan)
    raise ConfigError(f"prune.method={plan.method!r}: use magnitude or nm")


# --------------------------------------------------------------------------- the transform


def prune_updates(plan: PrunePlan) -> optax.GradientTransformation:
    """Masks updates so pruned weights become and stay exactly 0; chain it after the optimizer."""

    def init(params: Params) -> PruneState:
        weights = select(params, plan)
        if not jax.tree.leaves(weights):
            names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            raise ConfigError(f"prune.include={list(plan.include)} matches no param; params are: {', '.join(names)}")
        if plan.method == "nm":  # shape checks now, not at the first mask update
            for p, w in jax.tree_util.tree_flatten_with_path(weights)[0]:
                jax.eval_shape(lambda x, path=path_str(p): nm_mask(x, plan.n, plan.m, plan.group_axis(path, x.ndim), path), w)
        return PruneState(count=jnp.zeros((), jnp.int32), masks=jax.tree.map(lambda w: jnp.ones(w.shape, jnp.bool_), weights))

    def update(updates: Params, state: PruneState, params: Params | None = None):
        if params is None:
            raise ValueError("prune_updates needs the params: call tx.update(grads, opt_state, params)")
        weights, deltas = select(params, plan), select(updates, plan)
        masks = jax.lax.cond(
            plan.is_update_step(state.count),
            lambda: compute_masks(jax.tree.map(jnp.add, weights, deltas), plan, state.count),
            lambda: state.masks,
        )
        # kept: the update as the optimizer made it (bit-identical); pruned: -w, so w + (-w) == 0 exactly
        masked = jax.tree.map(lambda u, w, keep: jnp.where(keep, u, -w).astype(u.dtype), deltas, weights, masks)
        by_path = {path_str(p): u for p, u in jax.tree_util.tree_flatten_with_path(masked)[0]}
        new_updates = jax.tree_util.tree_map_with_path(lambda p, u: by_path.get(path_str(p), u), updates)
        return new_updates, PruneState(count=state.count + 1, masks=masks)

    return optax.GradientTransformation(init, update)


def masks_of(opt_state) -> Params | None:
    """The masks inside an optimizer state (None when it holds no PruneState)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState)) if isinstance(s, PruneState)]
    return found[0].masks if found else None


# --------------------------------------------------------------------------- reporting


def sparsity_by_layer(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{path: {"shape", "zeros", "size", "sparsity", "layers": [per-layer sparsity]}}` for every weight matrix (ndim >= 2).

    Counts exact zeros in the values given (the weights themselves, not the masks), so it
    reports what is actually stored: in a checkpoint, or in an export.
    """
    out = {}
    for path, w in flat.items():
        w = np.asarray(w)
        if w.ndim - _is_layer_stacked(path) < 2:  # vectors (norm scales), stacked or not
            continue
        zeros = w == 0
        entry = {"shape": list(w.shape), "zeros": int(zeros.sum()), "size": int(w.size), "sparsity": float(zeros.mean())}
        if _is_layer_stacked(path):
            entry["layers"] = [float(z.mean()) for z in zeros.reshape(w.shape[0], -1)]
        out[path] = entry
    return out


def sparsity_of(params: Params) -> dict[str, dict[str, Any]]:
    """`sparsity_by_layer` of (possibly sharded, multi-process) device params."""
    from jax.experimental import multihost_utils  # multi-process runs only (params spread over processes)

    def host(x):
        return np.asarray(jax.device_get(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))

    return sparsity_by_layer({path_str(p): host(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]})


def sparsity_table(report: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of `sparsity_by_layer`: one row per weight, one column per layer, and the total."""
    num_layers = max((len(e.get("layers", [])) for e in report.values()), default=0)
    head = "| weight | shape | " + "".join(f"layer {i} | " for i in range(num_layers)) + "total |"
    rows = [head, "|---|---|" + "---:|" * (num_layers + 1)]
    for path, e in report.items():
        layers = e.get("layers", [])
        cells = [f"{s:.1%}" for s in layers] + ["—"] * (num_layers - len(layers))
        rows.append(f"| {path} | {'×'.join(map(str, e['shape']))} | " + "".join(c + " | " for c in cells) + f"{e['sparsity']:.1%} |")
    zeros, size = sum(e["zeros"] for e in report.values()), sum(e["size"] for e in report.values())
    rows.append(f"| all matrices | {size:,} weights | " + "| " * num_layers + f"{zeros / max(size, 1):.1%} |")
    return "\n".join(rows)


__all__ = [
    "PrunePlan",
    "PruneState",
    "compute_masks",
    "magnitude_masks",
    "masks_of",
    "nm_mask",
    "path_str",
    "prune_updates",
    "select",
    "sparsity_by_layer",
    "sparsity_of",
    "sparsity_table",
]
