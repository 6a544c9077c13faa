"""Throughput, MFU against the peak for the compute dtype (measured on CPU, published for GPUs/TPUs), and the metric sinks (console, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbig.runtime import rss_bytes


# Published dense peak FLOP/s per chip, by `jax.Device.device_kind` and compute dtype. Sparsity figures are halved
# back to dense. float32 matmuls on GPUs at JAX's default precision may run on TF32 tensor cores, so their peak is the
# TF32 one (the larger: an MFU against the plain-FP32 peak could exceed 1); on TPUs float32 matmuls at default
# precision run as one bfloat16 pass on the MXU, so their peak is bfloat16's. A device not listed gets no MFU.
PUBLISHED_PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS, TF32 156 TFLOPS (SXM4 and PCIe alike).
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312e12, "float32": 156e12},
    # NVIDIA H100 Tensor Core GPU datasheet: SXM5 BF16 1,979 / TF32 989 TFLOPS with sparsity, so 989.5 / 494.5 dense.
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.5e12, "float32": 494.5e12},
    # NVIDIA H200 Tensor Core GPU datasheet: the H100 SXM's compute (BF16 1,979 / TF32 989 TFLOPS with sparsity).
    "NVIDIA H200": {"bfloat16": 989.5e12, "float32": 494.5e12},
    # NVIDIA L4 datasheet: BF16 242 / TF32 120 TFLOPS with sparsity, so 121 / 60 dense.
    "NVIDIA L4": {"bfloat16": 121e12, "float32": 60e12},
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): bf16 peak per chip.
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbig"
    return root / "matmul_peak.json"


def _machine_key(device: jax.Device, dtype: str, n: int, options: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{device.platform}|{device.device_kind}|{platform.processor() or platform.machine()}|{os.cpu_count()}|jax{jax.__version__}|{dtype}|{n}|{opts}"


def measure_matmul_peak(
    n: int = 2048,
    dtype: str = "float32",
    repeats: int = 5,
    use_cache: bool = True,
    compiler_options: dict[str, Any] | None = None,
    refresh: bool = False,
) -> float:
    """Best observed FLOP/s of one n x n matmul in `dtype` on this process's first device (cached per machine).

    `compiler_options`: the XLA options the measured step compiles with (on CPU they pick the matmul library:
    YNNPACK, oneDNN or Eigen), so the peak is that of the kernels the step can use. On CPU all emulated
    devices share the same cores, so this one-device figure is the whole machine's peak.

    The cache keeps the best figure ever measured for the key: a measurement taken while other work shared the
    cores reads low, and only a later, quieter one can correct it. `refresh` measures again even when cached
    (the loop does so when a run's throughput exceeds the cached peak) and returns the better of the two.
    """
    options = dict(compiler_options or {})
    device = jax.local_devices()[0]  # in a multi-process job jax.devices()[0] may be another process's
    key = _machine_key(device, dtype, n, options)
    cache = _cache_path()
    cached_peak = 0.0
    if use_cache and cache.is_file():
        try:
            cached_peak = float(json.loads(cache.read_text()).get(key, 0.0))
        except (OSError, ValueError, AttributeError):
            pass
        if cached_peak > 0 and not refresh:
            return cached_peak
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x, compiler_options=options or None)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    peak = max(2.0 * n**3 / best, cached_peak)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
            cached[key] = max(peak, float(cached.get(key, 0.0)))
            cache.write_text(json.dumps(cached, indent=1))
        except (OSError, ValueError):
            pass
    return peak


def machine_peak_flops(
    dtype: str = "float32", devices: list[jax.Device] | None = None, *, compiler_options: dict[str, Any] | None = None, **kw
) -> float | None:
    """The peak FLOP/s of `devices` (default: all) computing in `dtype`, or None where it is not known.

    CPU: measured, a matmul in `dtype` with the step's `compiler_options` (all emulated devices share the cores, so one
    device's figure is the machine's). GPU/TPU: `PUBLISHED_PEAK_FLOPS` for the device kind times the device count;
    a device kind not in the table gives None (MFU is then not reported rather than guessed).
    """
    devices = jax.devices() if devices is None else devices
    device = devices[0]
    if device.platform == "cpu":
        return measure_matmul_peak(dtype=dtype, compiler_options=compiler_options, **kw)
    per_device = PUBLISHED_PEAK_FLOPS.get(device.device_kind, {}).get(dtype)
    return None if per_device is None else per_device * len(devices)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, or None without a known peak."""
    return None if peak is None else tokens_per_sec * flops_per_token / peak


def memory_record() -> dict[str, int]:
    """This process's memory: `memory/host_rss_bytes` always (Linux), and where the backend reports them (GPU, TPU;
    not XLA:CPU) `memory/device_bytes_in_use` and `memory/device_peak_bytes`, summed over the local devices."""
    record = {}
    if (rss := rss_bytes()) is not None:
        record["memory/host_rss_bytes"] = rss
    stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
    if stats:
        record["memory/device_bytes_in_use"] = sum(s.get("bytes_in_use", 0) for s in stats)
        record["memory/device_peak_bytes"] = sum(s.get("peak_bytes_in_use", 0) for s in stats)
    return record


class MetricsWriter:
    """One JSON object per logged step to `<run_dir>/metrics.jsonl`, scalars to TensorBoard under `<run_dir>/tb`."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # only the process that writes (the main one) loads it

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def write(self, step: int, record: dict[str, float], *, jsonl: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _py(v) for k, v in record.items()}}
        if jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def histogram(self, name: str, values, step: int) -> None:
        """A TensorBoard histogram of `values` at `step` (e.g. the staleness of a parameter server's pushes)."""
        if self.enabled and len(values):
            self._tb.add_histogram(name, np.asarray(values, np.float64), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _py(v):
    v = np.asarray(v).item() if hasattr(v, "shape") else v
    return float(v) if isinstance(v, (float, np.floating)) else v


def format_record(step: int, record: dict[str, float]) -> str:
    parts = [f"step {step:>6d}"]
    for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"), ("tokens_per_sec", ",.0f"), ("mfu", ".3f"), ("skipped_steps", ".0f")):
        if record.get(key) is not None:
            parts.append(f"{key} {format(record[key], fmt)}")
    return " | ".join(parts)
