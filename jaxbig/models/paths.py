"""Param paths as names: a params tree <-> {'blocks/attn/wq_DHK': leaf}.

The one naming of params by their '/'-joined pure-dict path, shared by what handles params by name: the export
(quantized entries, SavedModel variables) and the parameter server (pushes, server shards).
"""

from __future__ import annotations

from typing import Any

import jax

Flat = dict[str, Any]  # '/'-joined param path -> leaf


def path_name(path) -> str:
    """A `tree_flatten_with_path` key path -> its '/'-joined name."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def to_flat(tree, is_leaf=None) -> Flat:
    """A params tree (or a tree like it, with `is_leaf`) -> {name: leaf}, in tree order, names like `blocks/attn/wq_DHK`."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def nest(flat: Flat) -> dict:
    """{name: leaf} -> nested dicts: the inverse of `to_flat` for trees whose keys are strings; any subset of the
    names gives the matching sub-tree."""
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


__all__ = ["Flat", "nest", "path_name", "to_flat"]
