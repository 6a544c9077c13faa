"""Reload an export's `jax.export` artifacts with jax, numpy and json only (no model code, no flax)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from jax import export


def load_exported(version_dir: str | Path) -> tuple[export.Exported, export.Exported, list[np.ndarray]]:
    """(forward, generate, leaves) of an export version directory.

    Call as `forward.call(leaves, tokens_BT)` and `generate.call(leaves, prompt_BP, n, temperature, seed)`;
    the leaves are in the manifest's argument order.
    """
    version_dir = Path(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    stored = np.load(version_dir / "jax" / "params.npz")
    leaves = []
    for spec in manifest["params"]:
        arr = stored[spec["name"]]
        if arr.dtype.name != spec["dtype"]:  # stored as raw bytes (float8, bfloat16)
            arr = arr.view(jnp.dtype(spec["dtype"]))
        leaves.append(arr)
    forward = export.deserialize(bytearray((version_dir / "jax" / "forward.jax_exported").read_bytes()))
    generate = export.deserialize(bytearray((version_dir / "jax" / "generate.jax_exported").read_bytes()))
    return forward, generate, leaves
