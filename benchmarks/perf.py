"""Training speed on this machine: jaxbig's loop per config and mesh, against the hand-written step and the peers.

    python scripts/bench.py --perf [--config tiny small d512] [--meshes 1x1 4x2] [--steps 30]
    python scripts/bench.py --perf --check [--margin 0.15]

Each (config, mesh) is one `scripts/train.py` process, as a user runs it, with a fresh
compilation cache: tokens/s and step times come from the loop's own per-step measurement
(`metrics.jsonl`, `train.log_every=1`; the loop fetches metrics a step late, so logging every step
adds no host sync), compile time and time to first step from its `summary.json`, peak host memory
from the kernel's accounting of the child (`wait4`). 1x1 runs with one CPU device, 4x2 with 8
emulated ones; both use the same global batch.

The one-device rows race the PyTorch eager peer (`benchmarks/peers/torch_llama.py`, run with
`.venv-peers/bin/python` when `make bench-peers` has built it) on the same shapes: per shape and
dtype, `--rounds` rounds of one jaxbig process and one PyTorch process, the order alternating
from round to round, so both see the same state of the host; the ratio is taken within a round
(float32 against PyTorch float32, `model.dtype=bfloat16` against PyTorch's bfloat16 autocast).
The loop table's one-device row pools the timed steps of all rounds.

Beside it, in the same invocation: time to first step of `tiny` (what `make train` runs) with a
cold and a warm compilation cache; and the hand-written JAX step (`benchmarks/handwritten.py`, in
this process, one device).

Each CPU model keeps its own section in docs/benchmarks.md (`bench:perf:<cpu>`), with its own
`perf:baseline`: speeds differ by vendor (issue 26), so a run replaces only its own CPU's table.

FLOPs are model FLOPs (`ModelConfig.flops_per_token`: 6 x matmul params + the causal attention
term), the same formula for every implementation, so GFLOP/s compare across block types. MFU is
against the peak for float32 (a 2048² float32 matmul measured in this process with jaxbig's XLA options on CPU;
the published table on known GPUs/TPUs).

`--check` re-runs the loop table (one process per row, no peers) and exits 1 when a config's tokens/s
is more than `--margin` below the baseline recorded in docs/benchmarks.md for this CPU model (the
`perf:baseline` line of its `bench:perf:<cpu>` section), so a change that slows training is caught by hand or by `make bench-check`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import optax

from benchmarks import harness
from jaxbig.config import load_config
from jaxbig.xla_options import compiler_options

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = re.compile(r"<!-- bench:perf:([a-z0-9-]+):start -->(.*?)<!-- bench:perf:\1:end -->", re.S)
BASELINE = re.compile(r"<!-- perf:baseline (\{.*?\}) -->")
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SECTION_INTRO = """## Performance: tokens/s, model FLOP/s and start-up, against the hand-written step and the peers

Written by `python scripts/bench.py --perf` (`benchmarks/perf.py`), one section per CPU model. Every jaxbig
figure is the training loop as users run it (`scripts/train.py`), one process per row. `make bench-check`
re-runs the table and fails when tokens/s drops more than 15% below the baseline recorded for its CPU model.
"""
BF16_CONFIGS = ("small", "d512")  # also run with model.dtype=bfloat16 on one device
SKIP_STEPS = 2  # the first timed steps after the compile step (caches and allocator warming up)


@dataclasses.dataclass
class LoopRun:
    config: str
    mesh: str
    batch: int
    seq_len: int
    tokens_per_step: int
    flops_per_token: float
    num_params: int
    step_s: list[float]  # per step, from the loop's per-step tokens/s
    first_call_s: float
    compile_s: float
    time_to_first_step_s: float
    peak_rss_mib: float
    final_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / statistics.median(self.step_s)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.step_s)
        return 1e3 * s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def cpu_key(cpu: str) -> str:
    """The section key of a CPU model name: "Intel(R) Xeon(R) Processor" -> "intel-r-xeon-r-processor"."""
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "unknown-cpu"


def markers(cpu: str) -> tuple[str, str]:
    key = cpu_key(cpu)
    return f"<!-- bench:perf:{key}:start -->", f"<!-- bench:perf:{key}:end -->"


def config_path(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "configs" / f"{name}.yaml"


def train_process(config: str, mesh: str, steps: int, cache_dir: Path, sets: list[str] = ()) -> LoopRun:
    """One `scripts/train.py` run; its per-step times, start-up figures and peak RSS."""
    cfg = load_config(config_path(config))
    run_dir = Path(tempfile.mkdtemp(prefix=f"perf-{Path(config).stem}-"))
    devices = 1 if mesh == "1x1" else 8
    overrides = [
        "train.log_every=1",
        f"train.eval_every={steps}",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps)}",
        f"compile.cache_dir={cache_dir}",
        *sets,
    ]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config_path(config)), "--mesh", mesh, "--steps", str(steps)]
    cmd += ["--run_dir", str(run_dir), "--fresh", "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the device count comes from JAX_NUM_CPU_DEVICES; options from compile.xla_profile
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][SKIP_STEPS:]
    if len(rates) < 3:
        raise ValueError(f"--steps {steps} leaves {len(rates)} timed steps after the compile step and {SKIP_STEPS} warm-up steps; use --steps >= {SKIP_STEPS + 5}")
    bf16 = "model.dtype=bfloat16" in sets
    return LoopRun(
        config=Path(config).stem + (" bf16" if bf16 else ""),
        mesh=mesh,
        batch=cfg.train.batch_size,
        seq_len=cfg.data.seq_len,
        tokens_per_step=tokens,
        flops_per_token=summary["flops_per_token"],
        num_params=summary["num_params"],
        step_s=[tokens / r for r in rates],
        first_call_s=summary["first_call_s"],
        compile_s=summary["compile_s"],
        time_to_first_step_s=summary["time_to_first_step_s"],
        peak_rss_mib=usage.ru_maxrss / 1024,
        final_loss=summary["final_loss"],
    )


def pooled(rounds: list[LoopRun]) -> LoopRun:
    """One loop-table row from a config's rounds: the timed steps of all of them (the median is over the pool),
    the first round's start-up figures (each round has a fresh cache) and the largest peak RSS."""
    return dataclasses.replace(rounds[0], step_s=[s for r in rounds for s in r.step_s], peak_rss_mib=max(r.peak_rss_mib for r in rounds))


@dataclasses.dataclass
class Duel:
    """jaxbig's loop (`scripts/train.py`, one device) against the PyTorch peer on one shape and dtype, in rounds
    that alternate which process runs first; `jaxbig[k]` and `torch[k]` ran back to back."""

    config: str  # "small" (float32) or "small bf16" (model.dtype=bfloat16 against PyTorch's bfloat16 autocast)
    jaxbig: list[LoopRun]
    torch: list[dict]

    def ratios(self) -> list[float]:
        return [j.tokens_per_s / t["tokens_per_s"] for j, t in zip(self.jaxbig, self.torch, strict=True)]

    def ratio(self) -> float:
        return statistics.median(self.ratios())


def duel_table(duels: list[Duel]) -> list[str]:
    rows = ["| shape | compute dtype | round (first to run) | jaxbig tokens/s | PyTorch eager tokens/s | jaxbig / PyTorch |", "|---|---|---|---:|---:|---:|"]
    for d in duels:
        shape, _, dtype = d.config.partition(" ")
        dtype = "bfloat16 (jaxbig `model.dtype=bfloat16`, PyTorch autocast)" if dtype else "float32"
        for k, (j, t, r) in enumerate(zip(d.jaxbig, d.torch, d.ratios())):
            rows.append(f"| {shape} | {dtype} | {k + 1} ({'jaxbig' if k % 2 == 0 else 'PyTorch'}) | {j.tokens_per_s:,.0f} | {t['tokens_per_s']:,.0f} | {r:.2f} |")
        rows.append(f"| {shape} | {dtype} | **median of rounds** | | | **{d.ratio():.2f}** |")
    return rows


def torch_peer(config: str, steps: int, extra: list[str] = ()) -> dict:
    """The PyTorch eager peer (`benchmarks/peers/torch_llama.py` in .venv-peers) on `config`'s shape."""
    cfg = load_config(config_path(config))
    m = cfg.model
    cmd = [str(PEER_PYTHON), str(ROOT / "benchmarks" / "peers" / "torch_llama.py")]
    cmd += ["--d-model", str(m.d_model), "--layers", str(m.num_layers), "--heads", str(m.num_heads), "--kv-heads", str(m.num_kv_heads)]
    cmd += ["--head-dim", str(m.head_dim), "--d-ff", str(m.d_ff), "--vocab", str(m.vocab_size), "--seq-len", str(cfg.data.seq_len)]
    cmd += ["--batch", str(cfg.train.batch_size), "--steps", str(steps), "--threads", str(os.cpu_count()), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["label"] = f"PyTorch {result['torch_version']} eager, {result['threads']} threads" + "".join(f" `{a}`" for a in extra)
    return result


MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+)")


def maxtext_peer(python: str, config: str, steps: int, xla_options: dict | None = None) -> dict:
    """MaxText's own trainer on `config`'s shape: one device, float32 activations, synthetic data, a fresh cache.

    `python` is an interpreter where `pip install maxtext` was done (benchmarks/peers/maxtext.md);
    nothing of MaxText is in this repository. Everything else is its default Llama block (remat
    full, scanned layers). tokens/s from its per-step `seconds`, the first 3 steps dropped; time to
    first step from starting the process to its `completed step: 0` line. `xla_options`: XLA
    DebugOptions fields (jaxbig's `compile.xla_profile=auto`) passed to MaxText's process as XLA_FLAGS,
    since MaxText compiles with process-wide flags; None: MaxText's defaults (XLA_FLAGS removed).
    """
    cfg = load_config(config_path(config))
    m = cfg.model
    base_yml = subprocess.run(
        [python, "-c", "import maxtext, pathlib; print(pathlib.Path(maxtext.__file__).parent / 'configs' / 'base.yml')"],
        capture_output=True, text=True,
    )
    if base_yml.returncode != 0:
        raise RuntimeError(f"--maxtext-python {python}: cannot import maxtext ({base_yml.stderr.strip()[-300:]}); see benchmarks/peers/maxtext.md")
    work = Path(tempfile.mkdtemp(prefix="perf-maxtext-"))
    overrides = {
        "run_name": "perf", "base_output_directory": str(work / "out"), "hardware": "cpu", "skip_jax_distributed_system": "true",
        "dataset_type": "synthetic", "enable_checkpointing": "false", "enable_tensorboard": "false", "dtype": "float32",
        "jax_cache_dir": str(work / "cache"), "base_emb_dim": m.d_model, "base_num_query_heads": m.num_heads,
        "base_num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "base_mlp_dim": m.d_ff, "base_num_decoder_layers": m.num_layers,
        "vocab_size": m.vocab_size, "max_target_length": cfg.data.seq_len, "per_device_batch_size": cfg.train.batch_size, "steps": steps,
    }
    cmd = [python, "-m", "maxtext.trainers.pre_train.train", base_yml.stdout.strip(), *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "DECOUPLE_GCLOUD": "TRUE", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    env.pop("XLA_FLAGS", None)
    if xla_options:
        env["XLA_FLAGS"] = " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in xla_options.items())
    seconds, first = {}, None
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
        log = []
        for line in proc.stdout:
            log.append(line)
            hit = MAXTEXT_STEP.search(line)
            if hit:
                first = first if first is not None else time.perf_counter() - t0
                seconds[int(hit.group(1))] = float(hit.group(2))
        if proc.wait() != 0 or len(seconds) < 5:
            raise RuntimeError(f"MaxText failed or logged {len(seconds)} steps:\n{''.join(log[-40:])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = [v for k, v in sorted(seconds.items()) if k >= 3]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flags = f"with jaxbig's XLA options (XLA_FLAGS={env['XLA_FLAGS']})" if xla_options else "its default XLA options"
    label = f"MaxText (pip `maxtext`), its default Llama block, float32 activations, {flags}"
    return {"label": label, "tokens_per_s": tokens / statistics.median(timed), "first_step_s": first}


# --------------------------------------------------------------------------- report


def _is_bf16(name: str) -> bool:
    """A row that computes in bfloat16: jaxbig's `model.dtype=bfloat16` runs ("small bf16") and peers run `--dtype bfloat16`."""
    return name.endswith(" bf16") or "bfloat16" in name


def loop_table(runs: list[LoopRun], peak: float | None, bf16_peak: float | None) -> list[str]:
    rows = [
        "| config | mesh | params | batch B×T | FLOPs/token | tokens/s | model GFLOP/s | MFU | step ms median (p10–p90) "
        "| compile s | time to first step s | peak RSS MiB | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        flops = r.tokens_per_s * r.flops_per_token
        rows.append(
            f"| {r.config} | {r.mesh} | {r.num_params / 1e6:.2f}M | {r.batch}×{r.seq_len} | {r.flops_per_token / 1e6:.1f}M | {r.tokens_per_s:,.0f} | {flops / 1e9:.1f} "
            f"| {harness.mfu_cell(flops, bf16_peak if _is_bf16(r.config) else peak)} | {statistics.median(r.step_s) * 1e3:.0f} ({r.quantile_ms(0.1):.0f}–{r.quantile_ms(0.9):.0f}) "
            f"| {r.compile_s:.1f} | {r.time_to_first_step_s:.1f} | {r.peak_rss_mib:,.0f} | {r.final_loss:.3f} |"
        )
    return rows


def mesh_ratios(runs: list[LoopRun]) -> list[str]:
    by = {(r.config, r.mesh): r for r in runs}
    out = []
    for (config, mesh), r in by.items():
        single = by.get((config, "1x1"))
        if mesh != "1x1" and single:
            out.append(f"{config}: {mesh} / 1x1 = {r.tokens_per_s / single.tokens_per_s:.3f}")
    return out


def side_by_side(runs: list[LoopRun], hand: dict[str, harness.Result], peers: dict[str, list[dict]], peak: float | None, bf16_peak: float | None) -> list[str]:
    """Per shape: jaxbig's loop (float32, bf16), the hand-written step, and each peer; ratios against jaxbig float32.
    MFU against the peak of the row's compute dtype (bfloat16 rows: XLA's bfloat16 matmul peak, for every implementation)."""
    rows = ["| shape | implementation | tokens/s | model GFLOP/s | MFU (peak of the row's dtype) | jaxbig f32 / this |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        if r.mesh != "1x1" or r.config.endswith(" bf16"):
            continue
        base = r.tokens_per_s
        entries = [("jaxbig, float32 (`scripts/train.py`, 1 device)", base)]
        bf16 = next((b for b in runs if b.config == f"{r.config} bf16" and b.mesh == "1x1"), None)
        if bf16:
            entries.append(("jaxbig, `model.dtype=bfloat16` (float32 params)", bf16.tokens_per_s))
        if r.config in hand:
            entries.append(("hand-written JAX step, like for like: jaxbig's attention op, XLA options, layer layout (in-process)", hand[r.config].median["handwritten"]))
            entries.append(("hand-written JAX step, out of the box: autodiff attention, XLA defaults (in-process)", hand[r.config].median["handwritten-defaults"]))
        for p in peers.get(r.config, []):
            entries.append((p["label"], p["tokens_per_s"]))
        for name, rate in entries:
            flops = rate * r.flops_per_token
            rows.append(f"| {r.config} | {name} | {rate:,.0f} | {flops / 1e9:.1f} | {harness.mfu_cell(flops, bf16_peak if _is_bf16(name) else peak)} | {base / rate:.2f} |")
    return rows


def report(runs, cold_warm, hand, peers, peak, bf16_peak=None, *, command: str, load: tuple[float, float], duels: list[Duel] = ()) -> str:
    cpu, isa = harness.machine_cpu(), harness.machine_isa()
    lines = [
        f"### {cpu} ({', '.join(f.upper().replace('_', '-') for f in isa.split() if f.startswith(('amx_bf16', 'avx512_bf16', 'avx512f'))) or isa})",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}  ",
        f"Machine: {harness.machine()}; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after  ",
        f"Peak (2048² float32 matmul with the step's XLA options, one device): {harness.peak_text(peak)}; "
        f"bfloat16 (with the bfloat16 step's options, the denominator of every bfloat16 row's MFU): {harness.peak_text(bf16_peak)}  ",
        "",
        "**jaxbig's training loop** (`scripts/train.py --config C --mesh M`, fresh compilation cache; per-step times from the loop, "
        f"the first {SKIP_STEPS} after the compile step dropped):",
        "",
        *loop_table(runs, peak, bf16_peak),
    ]
    if mesh_ratios(runs):
        lines += ["", "Same global batch on 8 emulated devices vs one device (tokens/s ratio; a figure, not a target: 8 devices emulated on the host's cores): " + "; ".join(mesh_ratios(runs)) + "  "]
    if cold_warm:
        cold, warm = cold_warm
        lines.append(
            f"Time to first step, `tiny` on 4x2 (process start to the first finished step, `make train`'s command): "
            f"**{cold.time_to_first_step_s:.1f} s cold** (empty compilation cache; compile {cold.compile_s:.1f} s), "
            f"**{warm.time_to_first_step_s:.1f} s warm** (second run, same cache; compile {warm.compile_s:.1f} s); target < 10 s warm."
        )
    if duels:
        worst = min(duels, key=Duel.ratio)
        lines += [
            "",
            f"**jaxbig against PyTorch eager, one device, same Llama and batch** ({len(duels[0].ratios())} rounds per row, one "
            "`scripts/train.py` process and one `benchmarks/peers/torch_llama.py` process per round, the first to run alternating; "
            "the ratio is taken within a round):",
            "",
            *duel_table(duels),
            "",
            f"jaxbig ≥ 1.0x PyTorch eager (median of rounds) on every row: **{'yes' if worst.ratio() >= 1.0 else 'no'}** "
            f"(lowest: {worst.config}, {worst.ratio():.2f}).  ",
        ]
    lines += ["", "**Side by side, one device, same shapes** (model FLOPs by the same formula for all; jaxbig's and PyTorch's "
              "rows pool the rounds above, so read ratios between them in the table above):", "", *side_by_side(runs, hand, peers, peak, bf16_peak)]
    if not any(p["label"].startswith("PyTorch") for ps in peers.values() for p in ps):
        lines += ["", "PyTorch peer not run: `make bench-peers` builds `.venv-peers` (torch 2.13 CPU) first."]
    for config, ps in peers.items():
        for p in ps:
            if p.get("first_step_s") is not None:
                lines.append(f"{config}, {p['label']}: first step {p['first_step_s']:.1f} s after process start.  ")
    baseline = {f"{r.config}@{r.mesh}": round(r.tokens_per_s) for r in runs}
    lines += ["", f"<!-- perf:baseline {json.dumps(baseline)} -->"]
    return "\n".join(lines)


def read_baseline(cpu: str, path: Path = DOC) -> dict[str, float]:
    """The `perf:baseline` recorded in `cpu`'s section of `path`."""
    text = path.read_text() if path.is_file() else ""
    sections = {m.group(1): m.group(2) for m in SECTION.finditer(text)}
    m = BASELINE.search(sections.get(cpu_key(cpu), ""))
    if not m:
        have = ", ".join(sections) or "none"
        raise ValueError(f"no `perf:baseline` for CPU {cpu!r} in {path} (sections: {have}); record one on this machine with `python scripts/bench.py --perf` first")
    return json.loads(m.group(1))


def write_cpu_section(path: Path, cpu: str, body: str) -> None:
    """Replaces `cpu`'s `bench:perf` section in `path`; a CPU model without one gets a new section after the last
    existing one (after the performance intro when there is none), so every CPU measured keeps its table."""
    start, end = markers(cpu)
    text = path.read_text() if path.is_file() else ""
    existing = list(SECTION.finditer(text))
    if start in text or not existing:
        harness.write_section(path, body, start, end, SECTION_INTRO)
        return
    at = existing[-1].end()
    path.write_text(text[:at] + f"\n\n{start}\n{body}\n{end}" + text[at:])


def check(runs: list[LoopRun], baseline: dict[str, float], margin: float) -> list[str]:
    """Lines naming every run slower than (1 - margin) x its baseline; empty when none is."""
    slow = []
    for r in runs:
        key = f"{r.config}@{r.mesh}"
        if key in baseline and r.tokens_per_s < (1 - margin) * baseline[key]:
            slow.append(f"{key}: {r.tokens_per_s:,.0f} tokens/s < {1 - margin:.2f} x baseline {baseline[key]:,.0f}")
    return slow


def main(args, command: str) -> int:
    configs = args.config or ["tiny", "small", "d512"]
    meshes = args.meshes or ["1x1", "4x2"]
    steps = args.steps or 30
    rounds = 1 if args.check else args.rounds
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: the PyTorch comparison needs at least 1 round (2 alternate which process runs first)")
    cpu = harness.machine_cpu()
    load_before = os.getloadavg()[0]
    cache_root = Path(tempfile.mkdtemp(prefix="perf-xla-cache-"))
    dtypes = {config: [[]] + ([["model.dtype=bfloat16"]] if config in BF16_CONFIGS else []) for config in configs}
    race = not args.check and PEER_PYTHON.exists() and "1x1" in meshes
    try:
        runs, duels = [], []
        if "1x1" in meshes:
            for config in configs:
                for sets in dtypes[config]:
                    peer_args = ["--dtype", "bfloat16"] if sets else []
                    mine, theirs = [], []
                    for k in range(rounds):
                        order = ("jaxbig", "torch") if k % 2 == 0 else ("torch", "jaxbig")
                        for who in order if race else ("jaxbig",):
                            print(f"{config} {' '.join(sets)} round {k + 1}/{rounds}: {'scripts/train.py 1x1' if who == 'jaxbig' else 'PyTorch eager ' + ' '.join(peer_args)}, {steps} steps ...", flush=True)
                            if who == "jaxbig":
                                mine.append(train_process(config, "1x1", steps, cache_root / f"{config}-{len(sets)}-{k}", sets))
                                print(f"  {mine[-1].tokens_per_s:,.0f} tokens/s, first step after {mine[-1].time_to_first_step_s:.1f} s", flush=True)
                            else:
                                theirs.append(torch_peer(config, max(10, steps), peer_args))
                                print(f"  {theirs[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
                    runs.append(pooled(mine))
                    if race:
                        duels.append(Duel(config=runs[-1].config, jaxbig=mine, torch=theirs))
        for i, (config, mesh) in enumerate((c, m) for c in configs for m in meshes if m != "1x1"):
            print(f"{config} on {mesh}: {steps} steps ...", flush=True)
            runs.append(train_process(config, mesh, steps, cache_root / f"mesh-{i}"))
            print(f"  {runs[-1].tokens_per_s:,.0f} tokens/s, first step after {runs[-1].time_to_first_step_s:.1f} s", flush=True)
        if args.check:
            baseline = read_baseline(cpu)
            slow = check(runs, baseline, args.margin)
            for r in runs:
                key = f"{r.config}@{r.mesh}"
                print(f"{key}: {r.tokens_per_s:,.0f} tokens/s (baseline {baseline.get(key, float('nan')):,.0f})")
            if slow:
                print("slower than the recorded baseline:\n  " + "\n  ".join(slow), file=sys.stderr)
                return 1
            print(f"no run more than {args.margin:.0%} below its baseline")
            return 0
        cold_warm = None
        if "tiny" in configs:
            print("tiny on 4x2, cold then warm compilation cache ...", flush=True)
            cache = cache_root / "start-up"
            cold_warm = (train_process("tiny", "4x2", 12, cache), train_process("tiny", "4x2", 12, cache))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    hand, peers = {}, {}
    for config in configs:
        print(f"{config}: hand-written step and jaxbig's step, alternating rounds ...", flush=True)
        hand[config], _ = harness.bench_config(config, load_config(config_path(config)), steps=None, rounds=args.repeats)
        peers[config] = []
        for d in duels:
            if d.config.split(" ")[0] == config:
                rates = [t["tokens_per_s"] for t in d.torch]
                label = d.torch[0]["label"] + f", median of {len(rates)} rounds"
                peers[config].append({**d.torch[0], "label": label, "tokens_per_s": statistics.median(rates)})
        if args.maxtext_python and config in ("small", "d512"):
            jaxbig_xla = compiler_options("auto", "cpu", "float32")  # what jaxbig's float32 step compiles with
            for xla in (None, jaxbig_xla):  # MaxText as it comes, then with the XLA options jaxbig uses
                print(f"{config}: MaxText {'with jaxbig XLA options' if xla else 'defaults'} ...", flush=True)
                peers[config].append(maxtext_peer(args.maxtext_python, config, 15, xla))
    peak, bf16_peak = harness.measure_peak(), harness.measure_peak("bfloat16")
    load = (load_before, os.getloadavg()[0])
    text = report(runs, cold_warm, hand, peers, peak, bf16_peak, command=command, load=load, duels=duels)
    foundation = harness.report(list(hand.values()), peak, command=command, to_first_step=None, load=load)  # same rounds
    print(text + "\n\n" + foundation)
    if not args.no_write:
        write_cpu_section(DOC, cpu, text)
        harness.write_section(DOC, foundation)
        print(f"wrote {DOC} (sections bench:perf:{cpu_key(cpu)} and bench:foundation)")
    return 0
