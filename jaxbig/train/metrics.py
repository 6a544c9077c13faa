"""Throughput, MFU against a measured matmul peak, and the metric sinks (console, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbig"
    return root / "matmul_peak.json"


def _machine_key(device: jax.Device, dtype: str, n: int) -> str:
    return f"{device.platform}|{device.device_kind}|{platform.processor() or platform.machine()}|{os.cpu_count()}|jax{jax.__version__}|{dtype}|{n}"


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5, use_cache: bool = True) -> float:
    """Best observed FLOP/s of one n x n matmul on this process's first device (cached per machine).

    On CPU all emulated devices share the same cores, so this one-device figure is the whole
    machine's peak; on accelerators the machine's peak is this times the device count.
    """
    device = jax.local_devices()[0]  # in a multi-process job jax.devices()[0] may be another process's
    key = _machine_key(device, dtype, n)
    cache = _cache_path()
    if use_cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if key in cached:
                return float(cached[key])
        except (OSError, ValueError):
            pass
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    peak = 2.0 * n**3 / best
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
            cached[key] = peak
            cache.write_text(json.dumps(cached, indent=1))
        except (OSError, ValueError):
            pass
    return peak


def machine_peak_flops(devices: list[jax.Device] | None = None, **kw) -> float:
    devices = jax.devices() if devices is None else devices
    per_device = measure_matmul_peak(**kw)
    return per_device if devices[0].platform == "cpu" else per_device * len(devices)


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
        if key in record:
            parts.append(f"{key} {format(record[key], fmt)}")
    return " | ".join(parts)
