"""Plan a layout before launching it: compile the train step on abstract inputs, read memory and traffic.

`plan_layout(cfg, mesh)` builds the run exactly as the train loop does (`jaxbig.train.setup.build`:
the same checks, optimizer, layer runner, state layout, step and XLA options), lowers and
compiles that step for the abstract train state (ShapeDtypeStructs carrying their shardings;
nothing is allocated) over the mesh, and reads from the compiled program:

- per-device bytes of params, optimizer state and batch, from the compiled executable's
  input shardings (their sum is checked against the compiler's argument size);
- temporaries (activations kept for the backward pass, gradients, workspace) from the
  compiled memory analysis;
- collective bytes sent per device per step, by kind and by mesh axes (`jaxbig.parallel.hlo`,
  loop bodies counted once per iteration);
- the pipeline bubble (p-1)/(v*m+p-1) for p stages, m microbatches and v repeats.

Because the step is the loop's own, a config that trains plans the program it trains with: a
pipeline layout with its collective-permutes and microbatch loop, gradient accumulation with its
microbatch loop, compression or DiLoCo with the data-parallel step under `shard_map` and the
optimizer's own collectives (DiLoCo's periodic average sits in a conditional branch and is
counted as if taken), distillation with the teacher's params as an input (read from the
teacher run's config; its checkpoint is not loaded).

The analytic per-device param bytes (`analytic_param_bytes`) come from the model's shapes and
the mesh sizes alone, for comparison with the compiled figure.

The mesh is normally emulated: `scripts/plan.py` gives the CPU backend as many devices as the
mesh needs, so a 256-device layout is planned on a laptop. The memory figures are then the CPU
compiler's; an accelerator's compiler fuses and schedules differently, so read temporaries as
an estimate there, while params and optimizer state follow from the layout alone.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxbig.config import Config, ModelConfig, ParallelConfig
from jaxbig.parallel.hlo import KINDS, parse_collectives
from jaxbig.parallel.pipeline import bubble_fraction, num_microbatches
from jaxbig.train.setup import build

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
    teacher_bytes: float  # distillation: the teacher's params, an input of the step (0 without)
    other_input_bytes: float  # the step counter
    argument_bytes: float  # compiler's argument size (all inputs)
    output_bytes: float  # compiler's output size, aliased (donated) part included
    alias_bytes: float  # outputs written in place of donated inputs
    temp_bytes: float  # activations, gradients and workspace live during the step
    collectives: dict[str, float]  # kind -> bytes sent per device per step
    collective_axes: dict[str, dict[str, float]]  # kind -> {"data,fsdp": bytes, ...}
    collective_runs: dict[str, int]  # kind -> collective ops run per step
    promoted_bytes: float  # of the all-reduce bytes: bf16 reductions the CPU backend ran in f32
    conditional_bytes: float  # of all the bytes: collectives in conditional branches, counted as if taken (DiLoCo's sync)
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
    """Compiles the train step `cfg` runs on `mesh` (`jaxbig.train.setup.build`) on abstract inputs and reads its per-device memory and traffic."""
    run = build(cfg, mesh)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    abstract, batch = run.abstract, run.abstract_batch()
    t0 = time.perf_counter()
    lowered = run.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    (state_in, batch_in, *teacher_in), _ = compiled.input_shardings  # a teacher's params (distillation) come third
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
        teacher_bytes=_bytes_per_device(run.teacher.abstract, teacher_in[0]) if run.teacher else 0.0,
        other_input_bytes=_bytes_per_device(abstract.step, state_in.step),
        argument_bytes=float(mem.argument_size_in_bytes),
        output_bytes=float(mem.output_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes),
        temp_bytes=float(mem.temp_size_in_bytes),
        collectives=by_kind,
        collective_axes=by_axes,
        collective_runs=runs,
        promoted_bytes=sum(c.wire_bytes * c.count for c in collectives if c.promoted),
        conditional_bytes=sum(c.wire_bytes * c.count for c in collectives if c.conditional),
        unknown_trip_counts=any(not c.count_known for c in collectives),
        bubble=bubble_fraction(stages, m, v) if stages > 1 else 0.0,
        schedule=f"{cfg.parallel.schedule}{f' x{v}' if v > 1 else ''}, {m} microbatches" if stages > 1 else "",
        lower_s=t1 - t0,
        compile_s=t2 - t1,
    )


# --------------------------------------------------------------------------- reporting


def format_bytes(b: float) -> str:
    """`1.50 MiB`, `512 B`: bytes in the largest binary unit that keeps them >= 1."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b:,.0f} B"


def format_plan(p: Plan) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    inputs = p.param_bytes + p.opt_bytes + p.batch_bytes + p.teacher_bytes + p.other_input_bytes
    lines = [
        f"plan {p.name}: {p.num_params / 1e9:.3f}B params | mesh {mesh} ({p.devices} devices) | global batch {p.batch[0]}x{p.batch[1]} tokens",
        f"lowered in {p.lower_s:.1f} s, compiled in {p.compile_s:.1f} s (XLA CPU backend, emulated devices)",
        "per device memory:",
        f"  params            {format_bytes(p.param_bytes):>12}   analytic {format_bytes(p.param_bytes_analytic)} ({p.param_error:+.2%})",
        f"  optimizer state   {format_bytes(p.opt_bytes):>12}",
        f"  batch             {format_bytes(p.batch_bytes):>12}",
        *([f"  teacher params    {format_bytes(p.teacher_bytes):>12}   distillation: the frozen teacher, an input of the step"] if p.teacher_bytes else []),
        f"  inputs total      {format_bytes(inputs):>12}   compiler's argument size {format_bytes(p.argument_bytes)}",
        f"  temporaries       {format_bytes(p.temp_bytes):>12}   activations, gradients, workspace (compiled memory analysis)",
        f"  outputs, not aliased {format_bytes(p.output_bytes - p.alias_bytes):>9}",
        f"  peak              {format_bytes(p.peak_bytes):>12}",
        "collective bytes sent per device per step (ring estimate; over mesh axes):",
    ]
    for kind in KINDS:
        axes = ", ".join(f"{a} {format_bytes(b)}" for a, b in sorted(p.collective_axes[kind].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {kind:<19}{format_bytes(p.collectives[kind]):>12}   {p.collective_runs[kind]} ops run" + (f"; {axes}" if axes else ""))
    if p.promoted_bytes:
        lines.append(
            f"  ({format_bytes(p.promoted_bytes)} of the all-reduce bytes are bf16 reductions the CPU backend runs in f32; "
            "half that on GPU/TPU)"
        )
    if p.conditional_bytes:
        lines.append(
            f"  ({format_bytes(p.conditional_bytes)} of them sit in conditional branches, counted as if taken: "
            "e.g. DiLoCo's synchronisation, which runs once every optim.sync_every steps)"
        )
    if p.unknown_trip_counts:
        lines.append("  (some collectives sit in loops of unknown trip count and are counted once)")
    lines.append(f"pipeline bubble: {p.bubble:.1%}" + (f" ({p.mesh['pipeline']} stages, {p.schedule})" if p.schedule else " (no pipeline axis)"))
    return "\n".join(lines)


__all__ = ["Plan", "analytic_param_bytes", "format_bytes", "format_plan", "pipeline_bubble", "plan_layout"]
