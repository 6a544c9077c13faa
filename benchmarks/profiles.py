"""Speed options one at a time against a baseline (XLA's defaults, scanned layers): which pay here, and what they do to the loss.

    python scripts/bench.py --profiles [--config small d512] [--repeats 5] [--set model.dtype=bfloat16 ...]

For each config, every variant (an XLA option profile from `jaxbig.xla_options`, or a model
option: dot_product attention, unrolled layers, bf16 compute, remat) is built from the same
seed, compiled in this process (one device), run 3 steps on the same batches to compare its loss
with the baseline's, then timed in alternating rounds (the order reversed every round) so slow
drifts in the machine's load hit every variant alike. `--set` overrides apply to every variant
(e.g. measure the profiles on top of bf16). The measured best profile per backend is what
`compile.xla_profile=auto` uses (`jaxbig.xla_options.AUTO`).
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.perf import DOC, config_path
from jaxbig.config import MeshConfig, load_config
from jaxbig.data import batch_sharding, load_corpus, train_batches
from jaxbig.optim import build_optimizer
from jaxbig.parallel.mesh import make_mesh
from jaxbig.train.state import init_train_state
from jaxbig.train.step import jit_train_step, make_train_step
from jaxbig.xla_options import AUTO, PROFILES, compiler_options

START, END = "<!-- bench:profiles:start -->", "<!-- bench:profiles:end -->"
SECTION_INTRO = """## Speed options: XLA CPU profiles, attention, layer scan, bf16, remat

Written by `python scripts/bench.py --profiles` (`benchmarks/profiles.py`): each option alone
against a baseline (XLA's default options, layers under `lax.scan`, gate and up as two matmuls), then jaxbig's defaults with
the options not taken added back; one device, compiled in one process and timed in alternating
rounds. "loss Δ" is the loss after 3 identical steps minus the baseline's. Options are kept as defaults
only where they pay here; every one stays switchable in the config. MFU is against a matmul in
the variant's own compute dtype with its own XLA options (a bf16 row against a bf16 peak).
"""
BASELINE = "baseline: XLA defaults, scanned layers"
MODEL_OPTIONS = {  # variant -> overrides, each alone on top of the baseline
    "attention=dot_product": ["model.attention=dot_product"],
    "scan_layers=false (unrolled)": ["model.scan_layers=false"],
    "dtype=bfloat16": ["model.dtype=bfloat16"],
    "remat=minimal": ["model.remat=minimal"],
    "remat=full": ["model.remat=full"],
    "fused_mlp (gate and up as one matmul)": ["model.fused_mlp=true"],
}
ON_DEFAULTS = {  # the options not taken, once more on top of jaxbig's defaults
    f"defaults + dtype=bfloat16 (xla_profile=auto = {AUTO.get('cpu', {}).get('bfloat16')} on CPU)": ["model.dtype=bfloat16"],
    "defaults + remat=minimal": ["model.remat=minimal"],
    "defaults + attention=dot_product": ["model.attention=dot_product"],
    "defaults with fused_mlp=false": ["model.fused_mlp=false"],
}


def _merged(base: list[str], sets: list[str]) -> list[str]:
    """`base` overrides with `sets` on top (a key in both takes `sets`' value)."""
    keys = {o.split("=", 1)[0] for o in sets}
    return [o for o in base if o.split("=", 1)[0] not in keys] + sets


def variants(backend: str) -> dict[str, list[str]]:
    """Variant name -> config overrides. The first is the baseline every other is compared with."""
    base = ["compile.xla_profile=default", "model.scan_layers=true", "model.fused_mlp=false"]
    out = {BASELINE: base}
    out.update({f"xla_profile={name}": _merged(base, [f"compile.xla_profile={name}"]) for name in PROFILES.get(backend, {}) if name != "default"})
    out.update({name: _merged(base, sets) for name, sets in MODEL_OPTIONS.items()})
    out[f"jaxbig defaults (xla_profile=auto = {AUTO.get(backend, {}).get('float32', 'default')}, scan_layers=false, fused_mlp=true)"] = []
    out.update(ON_DEFAULTS)
    return out


def sweep(config: str, sets: list[str], rounds: int, round_s: float = 4.0) -> list[dict]:
    backend = jax.default_backend()
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    base = load_config(config_path(config), sets)
    B, T = base.train.batch_size, base.data.seq_len
    corpus = load_corpus(base.data.paths, base.data.val_fraction, max_bytes=4 * 2**20)
    stream = train_batches(corpus.train_BYTES, T, B, mesh, seed=0, prefetch=0)
    warm = [next(stream) for _ in range(3)]
    rows, states, compiled, one = [], {}, {}, 0.0
    with jax.set_mesh(mesh):
        for name, overrides in variants(backend).items():
            cfg = load_config(config_path(config), [*sets, *overrides])
            tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
            graphdef, state, shardings, _ = init_train_state(cfg.model, tx, mesh, 0)
            step = jit_train_step(
                make_train_step(graphdef, tx, schedule), shardings, batch_sharding(mesh, B, T),
                compiler_options=compiler_options(cfg.compile.xla_profile, backend, cfg.model.compute_dtype(backend)),
            )
            t = time.perf_counter()
            options = compiler_options(cfg.compile.xla_profile, backend, cfg.model.compute_dtype(backend))
            peak = harness.measure_peak(cfg.model.compute_dtype(backend), options)  # this variant's dtype and kernels
            compiled[name] = step.lower(state, warm[0]).compile()
            compile_s = time.perf_counter() - t
            for batch in warm:
                t = time.perf_counter()
                state, metrics = compiled[name](state, batch)
                jax.block_until_ready(state)
                one = max(one, time.perf_counter() - t)  # the slowest variant's warm step sizes the rounds
            states[name] = state
            rows.append({"variant": name, "peak": peak, "compile_s": compile_s, "loss": float(metrics["loss"]), "rates": []})
            print(f"  {config} {name}: compiled in {compile_s:.1f} s, loss after 3 steps {rows[-1]['loss']:.6f}", flush=True)
        steps = max(2, round(round_s / one))
        batches = [next(stream) for _ in range(steps)]
        for r in range(rounds):
            for row in rows if r % 2 == 0 else rows[::-1]:
                name, state = row["variant"], states[row["variant"]]
                t = time.perf_counter()
                for batch in batches:
                    state, metrics = compiled[name](state, batch)
                jax.block_until_ready(state)
                row["rates"].append(steps * B * T / (time.perf_counter() - t))
                states[name] = state
    for row in rows:
        row.update(config=config, steps=steps, median=statistics.median(row["rates"]), flops_per_token=base.model.flops_per_token(T))
    return rows


def table(rows: list[dict]) -> list[str]:
    baselines = {r["config"]: r for r in rows if r["variant"] == BASELINE}
    out = [
        "| config | variant | tokens/s | × baseline | model GFLOP/s | MFU | rounds min–max | compile s | loss Δ after 3 steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        default = baselines[r["config"]]
        flops = r["median"] * r["flops_per_token"]
        out.append(
            f"| {r['config']} | {r['variant']} | {r['median']:,.0f} | **{r['median'] / default['median']:.3f}** | {flops / 1e9:.1f} "
            f"| {harness.mfu_cell(flops, r['peak'])} | {min(r['rates']):,.0f}–{max(r['rates']):,.0f} | {r['compile_s']:.1f} | {r['loss'] - default['loss']:+.1e} |"
        )
    return out


def main(args, command: str) -> int:
    configs = args.config or ["small", "d512"]
    load_before = os.getloadavg()[0]
    rows = []
    for config in configs:
        print(f"{config}: compiling every variant, then {args.repeats} alternating rounds ...", flush=True)
        rows += sweep(config, args.set, args.repeats)
    backend = jax.default_backend()
    lines = [
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; jax {jax.__version__}  ",
        f"Machine: {harness.machine()}; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        "MFU: against a 2048² matmul in each variant's compute dtype with its XLA options (measured here)  ",
        f"Method: one device; {args.repeats} alternating rounds of "
        + ", ".join(f"{c}: {next(r['steps'] for r in rows if r['config'] == c)} steps" for c in configs)
        + f"; medians. `compile.xla_profile=auto` on {backend} is `{AUTO.get(backend, {})}` by compute dtype.",
        "",
        *table(rows),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        harness.write_section(DOC, text, START, END, SECTION_INTRO)
        print(f"wrote {DOC}")
    return 0
