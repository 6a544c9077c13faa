"""Plan a layout before launching it: compile the train step on abstract inputs, read memory and traffic.

`plan_layout(cfg, mesh)` builds the abstract train state (ShapeDtypeStructs carrying their
shardings; nothing is allocated), lowers and compiles the jitted train step for it over the
mesh, and reads from the compiled program:

- per-device bytes of params, optimizer state and batch, from the compiled executable's
  input shardings (their sum is checked against the compiler's argument size);
- temporaries (activations kept for the backward pass, gradients, workspace) from the
  compiled memory analysis;
- collective bytes sent per device per step, by kind and by mesh axes (`jaxbig.parallel.hlo`,
  loop bodies counted once per iteration);
- the pipeline bubble (p-1)/(v*m+p-1) for p stages, m microbatches and v repeats.

The step is built the way the train loop builds it (`jaxbig.train.loop.train`): the same layout,
batch and pipeline checks, and the layer runner for the mesh (`layer_runner`: a plain scan, or the
configured GPipe/circular schedule over the `pipeline` axis), so a pipeline layout is planned with
the collective-permutes and microbatch loop it would run.

The analytic per-device param bytes (`analytic_param_bytes`) come from the model's shapes and
the mesh sizes alone, for comparison with the compiled figure.

The mesh is normally emulated: `scripts/plan.py` gives the CPU backend as many devices as the
mesh needs, so a 256-device layout is planned on a laptop. The memory figures are then the CPU
compiler's; an accelerator's compiler fuses and schedules differently, so read temporaries as
an estimate there, while params and optimizer state follow from the layout alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxbig.config import Config, ConfigError, ModelConfig, ParallelConfig
from jaxbig.data.pipeline import batch_sharding, check_batch_divides
from jaxbig.optim import build_optimizer
from jaxbig.parallel.guards import check_layout
from jaxbig.parallel.hlo import KINDS, parse_collectives
from jaxbig.parallel.pipeline import bubble_fraction, check_pipeline, layer_runner, num_microbatches
from jaxbig.parallel.rules import rules_for, use_rules
from jaxbig.train.state import abstract_train_state, logical_axes
from jaxbig.train.step import jit_train_step, make_train_step

GiB = 2**30


def pipeline_bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of a GPipe/circular step: (p-1)/(v*m+p-1), m as the schedule runs it (0 = 2 x stages); 0 without pipelining."""
    if stages <= 1:
        return 0.0
    return bubble_fraction(stages, num_microbatches(ParallelConfig(microbatches=microbatches), stages), repeats)


def analytic_param_bytes(model: ModelConfig, sizes: dict[str, int]) -> float:
    """Per-device param bytes if every weight is split as the rules intend: matrices over fsdp x tensor
    (and their layer stack over pipeline), norm scales replicated. Counts add up to `model.num_params()`."""
    D, F, L, H, N, K, V = model.d_model, model.d_ff, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size
    fsdp, tensor, pipeline = sizes.get("fsdp", 1), sizes.get("tensor", 1), sizes.get("pipeline", 1)
    kv_split = tensor if N % tensor == 0 else 1  # fewer KV heads than tensor shards: replicated (see rules.py)
    groups = [  # (params, devices sharing them)
        (L * (2 * D * H * K + 3 * D * F), fsdp * tensor * pipeline),  # wq, wo, MLP
        (L * 2 * D * N * K, fsdp * kv_split * pipeline),  # wk, wv
        (L * 2 * D, pipeline),  # attention and MLP norm scales
        (V * D * (1 if model.tie_embeddings else 2), fsdp * tensor),  # embedding (+ untied output head)
        (D, 1),  # final norm
    ]
    count = sum(n for n, _ in groups)
    if count != model.num_params():  # the two formulas must describe the same model
        raise AssertionError(f"analytic groups count {count} params, ModelConfig.num_params() says {model.num_params()}")
    itemsize = jnp.dtype(model.param_dtype).itemsize
    return sum(n * itemsize / d for n, d in groups)


def _bytes_per_device(tree, shardings) -> float:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) laid out by `shardings`."""
    total = 0.0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Plan:
    """What one train step of `cfg` on `mesh` needs per device, as the compiler sees it."""

    name: str
    mesh: dict[str, int]
    devices: int
    batch: tuple[int, int]  # (B, T) global
    num_params: int
    param_bytes: float  # per device, from the compiled input shardings
    param_bytes_analytic: float  # per device, from the shapes and mesh sizes alone
    opt_bytes: float
    batch_bytes: float
    other_input_bytes: float  # the step counter
    argument_bytes: float  # compiler's argument size (all inputs)
    output_bytes: float  # compiler's output size, aliased (donated) part included
    alias_bytes: float  # outputs written in place of donated inputs
    temp_bytes: float  # activations, gradients and workspace live during the step
    collectives: dict[str, float]  # kind -> bytes sent per device per step
    collective_axes: dict[str, dict[str, float]]  # kind -> {"data,fsdp": bytes, ...}
    collective_runs: dict[str, int]  # kind -> collective ops run per step
    promoted_bytes: float  # of the all-reduce bytes: bf16 reductions the CPU backend ran in f32
    unknown_trip_counts: bool  # some collective sits in a loop of unknown length (counted once)
    bubble: float
    schedule: str  # "" without a pipeline axis, else e.g. "gpipe, 4 microbatches" or "circular x2, 8 microbatches"
    lower_s: float
    compile_s: float

    @property
    def peak_bytes(self) -> float:
        """Inputs + outputs not written in place + temporaries: the step's footprint on one device."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def param_error(self) -> float:
        return self.param_bytes / self.param_bytes_analytic - 1.0


def plan_layout(cfg: Config, mesh: Mesh, name: str = "") -> Plan:
    """Compiles cfg's train step for `mesh` on abstract inputs and reads its per-device memory and traffic."""
    # The train loop's checks and layer runner (jaxbig/train/loop.py), in its order.
    check_layout(cfg.model, mesh)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    check_batch_divides(B, mesh)
    check_pipeline(cfg, dict(mesh.shape))
    run_layers = layer_runner(mesh, cfg.parallel)
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.parallel.sequence_parallel)):
        _, shardings, abstract = abstract_train_state(cfg.model, tx, mesh, cfg.train.seed)
        graphdef, _, _ = logical_axes(cfg.model)
        bsharding = batch_sharding(mesh, B, T)
        batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsharding) for k in ("inputs", "targets")}
        step = jit_train_step(make_train_step(graphdef, tx, schedule, run_layers), shardings, bsharding)
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    (state_in, batch_in), _ = compiled.input_shardings
    mem = compiled.memory_analysis()
    collectives = parse_collectives(compiled.as_text(), mesh)
    by_kind = {k: 0.0 for k in KINDS}
    by_axes: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    runs = {k: 0 for k in KINDS}
    for c in collectives:
        sent = c.wire_bytes * c.count
        by_kind[c.kind] += sent
        key = ",".join(c.axes) or "?"
        by_axes[c.kind][key] = by_axes[c.kind].get(key, 0.0) + sent
        runs[c.kind] += c.count
    sizes = dict(mesh.shape)
    stages = sizes.get("pipeline", 1)
    m, v = num_microbatches(cfg.parallel, stages), cfg.parallel.repeats
    return Plan(
        name=name,
        mesh=sizes,
        devices=mesh.devices.size,
        batch=(B, T),
        num_params=cfg.model.num_params(),
        param_bytes=_bytes_per_device(abstract.params, state_in.params),
        param_bytes_analytic=analytic_param_bytes(cfg.model, sizes),
        opt_bytes=_bytes_per_device(abstract.opt_state, state_in.opt_state),
        batch_bytes=_bytes_per_device(batch, batch_in),
        other_input_bytes=_bytes_per_device(abstract.step, state_in.step),
        argument_bytes=float(mem.argument_size_in_bytes),
        output_bytes=float(mem.output_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes),
        temp_bytes=float(mem.temp_size_in_bytes),
        collectives=by_kind,
        collective_axes=by_axes,
        collective_runs=runs,
        promoted_bytes=sum(c.wire_bytes * c.count for c in collectives if c.promoted),
        unknown_trip_counts=any(not c.count_known for c in collectives),
        bubble=bubble_fraction(stages, m, v) if stages > 1 else 0.0,
        schedule=f"{cfg.parallel.schedule}{f' x{v}' if v > 1 else ''}, {m} microbatches" if stages > 1 else "",
        lower_s=t1 - t0,
        compile_s=t2 - t1,
    )


# --------------------------------------------------------------------------- reporting


def _size(b: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b:,.0f} B"


def format_plan(p: Plan) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    inputs = p.param_bytes + p.opt_bytes + p.batch_bytes + p.other_input_bytes
    lines = [
        f"plan {p.name}: {p.num_params / 1e9:.3f}B params | mesh {mesh} ({p.devices} devices) | global batch {p.batch[0]}x{p.batch[1]} tokens",
        f"lowered in {p.lower_s:.1f} s, compiled in {p.compile_s:.1f} s (XLA CPU backend, emulated devices)",
        "per device memory:",
        f"  params            {_size(p.param_bytes):>12}   analytic {_size(p.param_bytes_analytic)} ({p.param_error:+.2%})",
        f"  optimizer state   {_size(p.opt_bytes):>12}",
        f"  batch             {_size(p.batch_bytes):>12}",
        f"  inputs total      {_size(inputs):>12}   compiler's argument size {_size(p.argument_bytes)}",
        f"  temporaries       {_size(p.temp_bytes):>12}   activations, gradients, workspace (compiled memory analysis)",
        f"  outputs, not aliased {_size(p.output_bytes - p.alias_bytes):>9}",
        f"  peak              {_size(p.peak_bytes):>12}",
        "collective bytes sent per device per step (ring estimate; over mesh axes):",
    ]
    for kind in KINDS:
        axes = ", ".join(f"{a} {_size(b)}" for a, b in sorted(p.collective_axes[kind].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {kind:<19}{_size(p.collectives[kind]):>12}   {p.collective_runs[kind]} ops run" + (f"; {axes}" if axes else ""))
    if p.promoted_bytes:
        lines.append(
            f"  ({_size(p.promoted_bytes)} of the all-reduce bytes are bf16 reductions the CPU backend runs in f32; "
            "half that on GPU/TPU)"
        )
    if p.unknown_trip_counts:
        lines.append("  (some collectives sit in loops of unknown trip count and are counted once)")
    lines.append(f"pipeline bubble: {p.bubble:.1%}" + (f" ({p.mesh['pipeline']} stages, {p.schedule})" if p.schedule else " (no pipeline axis)"))
    return "\n".join(lines)


def markdown_table(plans: list[Plan]) -> str:
    """One row per plan: memory per device and collective bytes per step per device."""
    head = (
        "| layout | devices | params/device (analytic) | optimizer/device | temporaries/device | peak/device | "
        + " | ".join(KINDS)
        + " | bubble | compile (s) |"
    )
    rows = [head, "|" + "---|" * 1 + "---:|" * (7 + len(KINDS))]
    for p in plans:
        layout = _layout(p)
        cells = [
            layout,
            str(p.devices),
            f"{_size(p.param_bytes)} ({_size(p.param_bytes_analytic)})",
            _size(p.opt_bytes),
            _size(p.temp_bytes),
            _size(p.peak_bytes),
            *(_size(p.collectives[k]) if p.collectives[k] else "0" for k in KINDS),
            f"{p.bubble:.1%}" if p.schedule else "-",
            f"{p.compile_s:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _layout(p: Plan) -> str:
    """`data=2,tensor=2,pipeline=2 (gpipe, 4 microbatches)`; the axes of size 1 left out."""
    layout = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 device"
    return layout + (f" ({p.schedule})" if p.schedule else "")


def axes_breakdown(p: Plan) -> str:
    """`data=4,tensor=2: all-reduce over tensor 6.0 MiB, over data 4.3 MiB; ...` (bytes per device per step)."""
    layout = _layout(p)
    parts = []
    for kind in KINDS:
        if p.collective_axes[kind]:
            axes = sorted(p.collective_axes[kind].items(), key=lambda kv: -kv[1])
            parts.append(f"{kind} " + ", ".join(f"over {a.replace(',', '+')} {_size(b)}" for a, b in axes))
    return f"{layout}: " + ("; ".join(parts) if parts else "no collectives")


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


def write_section(path: Path, start: str, end: str, body: str, title: str) -> None:
    """Replaces the text between the `start`/`end` markers in `path` (appending `title` and the section if missing)."""
    text = path.read_text() if path.is_file() else ""
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: section, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{section}\n"
    path.write_text(text)


def devices_needed(sizes: dict[str, int]) -> int:
    """Devices a fully specified mesh needs; a -1 axis cannot be emulated without a count."""
    if any(v == -1 for v in sizes.values()):
        raise ConfigError(
            f"mesh {','.join(f'{k}={v}' for k, v in sizes.items())}: plan emulates exactly the devices the mesh names, "
            "so give every axis a size (no -1), or pass --devices N"
        )
    return int(np.prod(list(sizes.values())))


__all__ = ["Plan", "analytic_param_bytes", "axes_breakdown", "benchmark_section", "devices_needed", "format_plan", "markdown_table", "pipeline_bubble", "plan_layout", "write_section"]
