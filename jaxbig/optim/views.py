"""PowerSGD's matrix views of the params, read from the model's logical axes."""

from __future__ import annotations

import jax

from jaxbig.config import ConfigError
from jaxbig.optim.compression import MatrixView


def matrix_views(logical_specs, mode: str = "matrix", *, vocab: bool = False) -> dict:
    """PowerSGD views from the params' logical axes.

    Rows are the residual-stream side of a weight, `embed`; columns the rest (heads x
    head_dim, mlp, vocab). Weights with a `vocab` axis (the embedding, the output head) get no
    view, so they go exact, unless `vocab`: their gradients are sums of one row per token in the
    batch, not close to low rank (on `small`, rank 4, compressing them costs +1.4% validation
    loss at 128 steps for 0.9 MB per step saved, docs/benchmarks.md). `mode`:
    - matrix: every layer's weight is its own [embed, rest] matrix (PowerSGD as published);
    - stacked: the `layers` axis joins the rows, [layers·embed, rest] per weight;
    - fused: as stacked, and weights with the same row axes are concatenated along the
      columns: all block weights form one matrix, the embedding and output head another.
    Each step fewer numbers cross the wire from matrix to fused, and each carries a coarser
    approximation (error feedback sends the rest later). Norm scales (no `embed`) go uncompressed.
    """
    if mode not in ("matrix", "stacked", "fused"):
        raise ConfigError(f"optim.powersgd_view={mode!r}: use matrix, stacked or fused")

    def view(spec) -> MatrixView | None:
        names = tuple(spec)
        row_names = ("embed",) if mode == "matrix" else ("layers", "embed")
        batch = tuple(i for i, n in enumerate(names) if n == "layers") if mode == "matrix" else ()
        rows = tuple(i for i, n in enumerate(names) if n in row_names)
        cols = tuple(i for i in range(len(names)) if i not in rows and i not in batch)
        if "embed" not in names or not cols or ("vocab" in names and not vocab):
            return None
        group = "+".join(names[i] for i in batch + rows) if mode == "fused" else None
        return MatrixView(rows=rows, cols=cols, group=group, batch=batch)

    return jax.tree.map(view, logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


__all__ = ["matrix_views"]
