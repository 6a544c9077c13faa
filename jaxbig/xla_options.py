"""XLA compiler option profiles per backend, and the persistent compilation cache.

A profile is a dict of XLA `DebugOptions` fields passed to `jax.jit(..., compiler_options=...)`
for the train and eval steps (`compile.xla_profile`). Options are set per compiled function, not
through the process-wide `XLA_FLAGS`, so one process can compile and compare several profiles
(`scripts/bench.py --profiles`). `auto` is the profile measured fastest on that backend
(docs/benchmarks.md, section `bench:profiles`); `default` is XLA's own defaults.

This module imports nothing heavy: the config checks profile names against it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# backend -> profile name -> options. Every profile here was measured by `scripts/bench.py --profiles`
# on the backend it is listed under; its numerics are checked by tests/test_perf.py.
_DOT, _ELTWISE, _REDUCE = "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_ELTWISE", "LIBRARY_FUSION_TYPE_REDUCE"
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}  # XLA:CPU's default: matmuls as YNNPACK fusions

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "default": {},  # YNNPACK fusions for the matmuls, XLA's own loops for the rest
        "ynn_eltwise": {"xla_cpu_experimental_ynn_fusion_type": f"{_DOT},{_ELTWISE}"},  # elementwise ops into YNNPACK too
        "ynn_all": {"xla_cpu_experimental_ynn_fusion_type": f"{_DOT},{_ELTWISE},{_REDUCE}"},
        "ynn_reduce": {"xla_cpu_experimental_ynn_fusion_type": f"{_DOT},{_REDUCE}"},  # matmuls and reductions; XLA's loops for elementwise
        "eigen": _NO_YNN,  # no library fusions: XLA's own (Eigen) matmuls
        "onednn": {**_NO_YNN, "xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": _DOT},  # oneDNN matmul fusions
        "onednn_custom_call": {**_NO_YNN, "xla_cpu_experimental_onednn_custom_call": True},  # oneDNN matmuls as custom calls
        "fast_math": {"xla_cpu_enable_fast_math": True},  # reassociation, approximate exp/log/tanh
    },
    "gpu": {"default": {}},
    "tpu": {"default": {}},
}
# The profile `auto` resolves to, per backend and compute dtype (measured; docs/benchmarks.md
# `bench:profiles`). On CPU, float32 matmuls and reductions are fastest as YNNPACK fusions, elementwise
# ops as XLA's own loops: with YNNPACK's elementwise fusions too (`ynn_all`) a step is about 7% slower
# on one device and up to 12% on 8 emulated devices (`--mesh 4x2`); bfloat16 matmuls are fastest through oneDNN, which uses AMX /
# AVX512-BF16 where the CPU has them (YNNPACK's bf16 path does not).
AUTO: dict[str, dict[str, str]] = {
    "cpu": {"float32": "ynn_reduce", "bfloat16": "onednn"},
    "gpu": {"float32": "default", "bfloat16": "default"},
    "tpu": {"float32": "default", "bfloat16": "default"},
}
# Profiles XLA:CPU cannot run a sequence-parallel step with (parallel.sequence_parallel with tensor > 1;
# jax 0.12 fails the first call with "Instruction with unsupported layout in YNN fusion": the residual
# stream's sequence shards reach YNNPACK's elementwise fusions in a transposed layout). `auto` falls
# back to AUTO_SEQUENCE_PARALLEL; naming one of these is refused with that choice.
NOT_WITH_SEQUENCE_PARALLEL: dict[str, tuple[str, ...]] = {"cpu": ("ynn_eltwise", "ynn_all")}
AUTO_SEQUENCE_PARALLEL: dict[str, dict[str, str]] = {"cpu": {"float32": "ynn_reduce", "bfloat16": "onednn"}}
# Compute dtype for model.dtype=auto, per backend: bfloat16 where the hardware has fast bf16 matmuls
# (GPU tensor cores, TPU MXU). CPU stays float32: bf16 pays only on CPUs with AMX or AVX512-BF16 and
# changes the numerics every equivalence test pins; set model.dtype=bfloat16 there (README, Speed).
AUTO_DTYPE: dict[str, str] = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}
# Attention for model.attention=auto, per backend. GPU: jax.nn.dot_product_attention with cuDNN's fused (flash)
# attention named where it applies (jaxbig.models.llama.dot_product_kernel); measured on an H200, llama_125m shape,
# bf16: 2.7x einsum's step (docs/benchmarks.md, "Attention kernels on a GPU"). CPU: einsum, written out with jaxbig's own backward
# (jaxbig.models.llama.attend), measured 2-6% faster than autodiff's (docs/benchmarks.md). TPU: einsum, unmeasured
# (dot_product there is XLA's own attention, no fused kernel).
AUTO_ATTENTION: dict[str, str] = {"cpu": "einsum", "gpu": "dot_product", "tpu": "einsum"}


def profile_names() -> list[str]:
    """Every name `compile.xla_profile` accepts: auto, then the profiles of all backends."""
    names = ["auto"]
    for profiles in PROFILES.values():
        names += [n for n in profiles if n not in names]
    return names


def compiler_options(profile: str, backend: str, dtype: str = "float32", *, sequence_parallel: bool = False) -> dict[str, Any]:
    """The options of `profile` on `backend` ("cpu", "gpu" or "tpu"); `auto` picks the measured best for the compute `dtype`.

    `sequence_parallel`: the step splits the residual stream over tensor (parallel.sequence_parallel
    with tensor > 1); profiles XLA cannot compile that with are avoided by `auto` and refused by name.
    """
    table = PROFILES.get(backend, {"default": {}})
    auto = AUTO_SEQUENCE_PARALLEL if sequence_parallel and backend in AUTO_SEQUENCE_PARALLEL else AUTO
    name = auto.get(backend, {}).get(dtype, "default") if profile == "auto" else profile
    if name not in table:
        raise ValueError(
            f"compile.xla_profile={profile!r} is not a profile for the {backend} backend; "
            f"use auto or one of {', '.join(table)} (profiles are per backend, see jaxbig/xla_options.py)"
        )
    if sequence_parallel and name in NOT_WITH_SEQUENCE_PARALLEL.get(backend, ()):
        raise ValueError(
            f"compile.xla_profile={profile!r} cannot compile a sequence-parallel step on {backend} (XLA's YNNPACK fusions "
            f"reject the split residual stream's layout); use compile.xla_profile=auto (here "
            f"{AUTO_SEQUENCE_PARALLEL[backend][dtype]}) or set parallel.sequence_parallel=false"
        )
    return dict(table[name])


def enable_compilation_cache(cache_dir: str) -> Path | None:
    """Turns on JAX's persistent compilation cache in `cache_dir` (`~` expanded; "" leaves it off).

    Every compiled step is cached, however quick its compile (JAX's default skips those under
    1 s, which on CPU is most of them). A later run with the same program, options and jax
    version loads the executable instead of compiling it. A directory already set for this
    process (an earlier call, or the user's JAX_COMPILATION_CACHE_DIR) is kept.
    """
    if not cache_dir:
        return None
    import jax  # the config imports this module for its profile names: it imports nothing heavy at the top

    current = jax.config.jax_compilation_cache_dir
    path = Path(current) if current else Path(os.path.expanduser(cache_dir))
    if not current:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _listening:
        jax.monitoring.register_event_listener(_count_cache_event)
        _listening.append(True)
    return path


_listening: list[bool] = []
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
cache_stats = {"hits": 0, "misses": 0}  # this process's persistent-cache lookups, from JAX's monitoring events


def _count_cache_event(event: str, **_) -> None:
    if event in CACHE_EVENTS:
        cache_stats[CACHE_EVENTS[event]] += 1
