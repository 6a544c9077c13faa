"""The collective-bytes-by-layout section of docs/benchmarks.md, from the planner's `Plan`s.

`scripts/plan.py --all-layouts --write-benchmarks` plans each layout (`jaxbig.train.plan`) and
writes this section with the harness's `write_section`.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import jax

from benchmarks.harness import write_section
from jaxbig.parallel.hlo import KINDS
from jaxbig.train.plan import Plan, format_bytes

START, END = "<!-- bench:collectives:start -->", "<!-- bench:collectives:end -->"
TITLE = "## Collective bytes per step by layout (scripts/plan.py)"


def markdown_table(plans: list[Plan]) -> str:
    """One row per plan: memory per device and collective bytes per step per device."""
    head = (
        "| layout | devices | params/device (analytic) | optimizer/device | temporaries/device | peak/device | "
        + " | ".join(KINDS)
        + " | bubble | compile (s) |"
    )
    rows = [head, "|" + "---|" * 1 + "---:|" * (7 + len(KINDS))]
    for p in plans:
        cells = [
            layout_name(p),
            str(p.devices),
            f"{format_bytes(p.param_bytes)} ({format_bytes(p.param_bytes_analytic)})",
            format_bytes(p.opt_bytes),
            format_bytes(p.temp_bytes),
            format_bytes(p.peak_bytes),
            *(format_bytes(p.collectives[k]) if p.collectives[k] else "0" for k in KINDS),
            f"{p.bubble:.1%}" if p.schedule else "-",
            f"{p.compile_s:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def layout_name(p: Plan) -> str:
    """`data=2,tensor=2,pipeline=2 (gpipe, 4 microbatches)`; the axes of size 1 left out."""
    layout = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 device"
    return layout + (f" ({p.schedule})" if p.schedule else "")


def axes_breakdown(p: Plan) -> str:
    """`data=4,tensor=2: all-reduce over tensor 6.0 MiB, over data 4.3 MiB; ...` (bytes per device per step)."""
    parts = []
    for kind in KINDS:
        if p.collective_axes[kind]:
            axes = sorted(p.collective_axes[kind].items(), key=lambda kv: -kv[1])
            parts.append(f"{kind} " + ", ".join(f"over {a.replace(',', '+')} {format_bytes(b)}" for a, b in axes))
    return f"{layout_name(p)}: " + ("; ".join(parts) if parts else "no collectives")


def benchmark_section(plans: list[Plan], command: str) -> str:
    """The docs/benchmarks.md section: how it was measured, the table, and the bytes by mesh axes."""
    first = plans[0]
    return "\n".join(
        [
            f"Command: `{command}`  ",
            f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; jax {jax.__version__}; XLA CPU backend, "
            f"{max(p.devices for p in plans)} emulated devices on {os.cpu_count()} CPU cores, 1-minute load average "
            f"{os.getloadavg()[0]:.1f} (compile times vary with it; the bytes do not)  ",
            f"Model: {first.name} ({first.num_params / 1e6:.2f}M params), global batch {first.batch[0]}x{first.batch[1]} tokens, "
            "one train step (forward, backward, AdamW update)  ",
            "Bytes are what one device sends per step, ring estimate (all-reduce 2(n-1)/n of the buffer, all-gather and "
            "all-to-all (n-1)/n, collective-permute 1), collectives inside the layer scan counted once per layer and those "
            "inside a pipeline schedule's loop once per schedule step. Bubble: (p-1)/(v*m+p-1) for p stages, m microbatches, "
            "v repeats. "
            "On CPU, XLA reduces FSDP gradients with all-reduce rather than reduce-scatter (see docs/parallelism.md).",
            "",
            markdown_table(plans),
            "",
            "Bytes by the mesh axes each collective runs over:",
            "",
            *(f"- {axes_breakdown(p)}" for p in plans),
        ]
    )


def write_benchmarks(path: Path, plans: list[Plan], command: str) -> None:
    """Replaces this section of `path` (docs/benchmarks.md), appending it under its title when missing."""
    write_section(path, benchmark_section(plans, command), START, END, intro=f"{TITLE}\n")


__all__ = ["END", "START", "TITLE", "axes_breakdown", "benchmark_section", "layout_name", "markdown_table", "write_benchmarks"]
