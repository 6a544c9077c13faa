"""Serving runtimes an export can target, and what each can read.

Two version axes are baked into every serialized module (see docs/serving.md):
  * the jax.export calling convention, which the runtime's XlaCallModule op must support;
  * the StableHLO portable-artifact version, which the runtime's StableHLO must be able to
    deserialize. JAX serializes at "a version >= 4 weeks old" of *its own* StableHLO, which
    for JAX 0.12 is 1.18.0; TensorFlow 2.21 (and TF Serving 2.21, which embeds it) reads up to
    1.13.x, so a shape-polymorphic module from JAX 0.12 saves fine and fails on first call.
The export bridge re-serializes the module at `stablehlo_version` for the chosen target.
"""

from __future__ import annotations

import dataclasses

from jaxbig.config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingTarget:
    name: str  # the --target value
    tensorflow: str  # TF release the runtime embeds (the version to test the SavedModel with)
    stablehlo_version: str  # portable-artifact version handed to XlaCallModule
    max_calling_convention: int  # tfxla.call_module_maximum_supported_version() of that TF


TARGETS = {
    # Measured on TF 2.21.0: StableHLO reader 1.13.7, call_module_maximum_supported_version() == 10.
    # 1.13.0 rather than 1.13.7: the lowest release with every op the Llama export uses (and what
    # the shared research verified end to end).
    "tf-serving-2.21": ServingTarget(name="tf-serving-2.21", tensorflow="2.21", stablehlo_version="1.13.0", max_calling_convention=10),
}


def get_target(name: str) -> ServingTarget:
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r} is not supported; supported targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
