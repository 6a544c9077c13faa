"""Layer runners: how the model applies its stacked blocks.

The model holds its blocks stacked on a leading `layers` axis and hands them to a *layer
runner*, `run(body, layers, x_BTD, side)`: `body(layer, x_BTD, side) -> x_BTD` applies one
layer, `layers` is the stacked params (leading axis L), `side` is data every layer reads
(positions, segment ids, the RoPE table), per row [B, ...] or [1, ...] when all rows share
it. The plain runners live here; a pipeline schedule over a mesh axis
(`jaxbig.parallel.pipeline.pipeline_layers`) is another runner the mesh layer builds, so the
model never names a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

LayerBody = Callable[[Any, jax.Array, Any], jax.Array]  # (one layer's params, x_BTD, side) -> x_BTD
LayerRunner = Callable[[LayerBody, Any, jax.Array, Any], jax.Array]  # (body, layers [L, ...], x_BTD, side) -> x_BTD


def scan_layers(body: LayerBody, layers: Any, x_BTD: jax.Array, side: Any) -> jax.Array:
    """The layers one after another, no pipeline: `lax.scan` over the leading axis of `layers`."""

    def step(x_BTD, layer):
        return body(layer, x_BTD, side), None

    return lax.scan(step, x_BTD, layers)[0]


def unrolled_layers(body: LayerBody, layers: Any, x_BTD: jax.Array, side: Any) -> jax.Array:
    """`scan_layers` fully unrolled (`model.scan_layers=false`): one copy of the layer per layer in the program."""

    def step(x_BTD, layer):
        return body(layer, x_BTD, side), None

    return lax.scan(step, x_BTD, layers, unroll=True)[0]


__all__ = ["LayerBody", "LayerRunner", "scan_layers", "unrolled_layers"]
