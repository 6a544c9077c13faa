"""Pruning and distillation on the real corpus: the validation loss they cost or buy.

`--pruning`: the `small` model trained dense, with gradual 50% magnitude pruning (per layer,
Zhu & Gupta cubic ramp) and with 2:4 N:M sparsity, each for the same number of steps, same
seed and data order; the sparsity actually reached is counted in the final weights.

`--distill`: a `tiny`-width student (d_model 128) on `small`'s data settings, trained from
scratch and distilled from the dense `small` run (the teacher) for the same number of steps.

Both write their section of docs/benchmarks.md between their markers. The dense `small` run
is shared: `--distill` reuses it as the teacher when `--pruning` has trained it (same steps).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import flax
import jax
import optax

from jaxbig.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RUNS = ROOT / "runs" / "bench-sparsity"
PRUNE_MARKERS = ("<!-- bench:pruning:start -->", "<!-- bench:pruning:end -->")
DISTILL_MARKERS = ("<!-- bench:distill:start -->", "<!-- bench:distill:end -->")
STUDENT = ["model.d_model=128", "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=32", "model.d_ff=512"]  # tiny's width

PRUNE_INTRO = """## Pruning: validation loss at 50% and 2:4 sparsity

`small` trained dense and with pruning for the same steps, seed and data order
(`jaxbig.compress.prune`: masks in the optimizer state, pruned weights exactly 0). Pruned: the
attention and MLP weights of every block (`prune.include`), not the embedding, output head or
norms; "sparsity" is counted in the final weights (exact zeros) over those weights, and over all
weight matrices. Re-run with `python scripts/bench.py --pruning` (runs already trained with the
same config under runs/bench-sparsity are reused; delete that directory to retrain).
"""

DISTILL_INTRO = """## Distillation: a student from a larger teacher vs the same student from scratch

The student has `tiny`'s width (d_model 128, 1.1M params) and `small`'s data settings; the
teacher is the dense `small` run of the pruning benchmark (3.5M params). Both students run the
same steps, seed, data order and optimizer; "val loss" is next-token cross-entropy on the
validation split (the distillation term is training-only). Re-run with `python scripts/bench.py --distill`.
"""


def prune_variants(steps: int) -> dict[str, list[str]]:
    """variant -> overrides; pruning starts after the 30 warmup steps, magnitude ramps until 60% of the run."""
    start, end = 30, max(30, int(0.6 * steps))
    return {
        "dense": [],
        "magnitude 50%": ["prune.method=magnitude", "prune.sparsity=0.5", f"prune.start_step={start}", f"prune.end_step={end}", "prune.update_every=10"],
        "2:4": ["prune.method=nm", "prune.n=2", "prune.m=4", f"prune.start_step={start}", f"prune.end_step={start}"],
    }


@dataclasses.dataclass
class Result:
    name: str
    cfg: Config
    summary: dict

    @property
    def val_loss(self) -> float:
        return self.summary["final_eval_loss"]

    @property
    def seconds_per_step(self) -> float:
        tps = self.summary.get("tokens_per_sec")
        return self.cfg.train.batch_size * self.cfg.data.seq_len / tps if tps else float("nan")


def _finished(cfg: Config) -> dict | None:
    """The summary of a run already trained with exactly this config to its last step, else None."""
    run_dir = Path(cfg.train.run_dir)
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()) or saved.read_text() != cfg.to_yaml():
        return None
    loaded = json.loads(summary.read_text())
    return loaded if loaded.get("steps") == cfg.train.steps and loaded.get("final_eval_loss") is not None else None


def _train(cfg: Config, fresh: bool, say) -> dict:
    """Trains `cfg` (from scratch when `fresh`), or reuses a finished run of the same config (delete runs/bench-sparsity to retrain)."""
    from jaxbig.train.loop import train

    done = _finished(cfg)
    if done is not None:
        say(f"reusing the finished run {cfg.train.run_dir}", flush=True)
        return done
    t = time.perf_counter()
    summary = train(cfg, fresh=fresh, progress=False)
    summary["bench_wall_s"] = time.perf_counter() - t
    return summary


def dense_config(preset: Path, steps: int, extra: list[str]) -> Config:
    return load_config(preset, [f"train.steps={steps}", f"train.run_dir={RUNS / 'small-dense'}", *extra])


def run_pruning(preset: Path, steps: int, extra: list[str], say=print, only: list[str] | None = None) -> list[Result]:
    results = []
    for name, overrides in prune_variants(steps).items():
        if only and name not in only:
            continue
        run_dir = RUNS / ("small-dense" if name == "dense" else "small-" + name.replace(" ", "").replace("%", "pct").replace(":", "of"))
        cfg = load_config(preset, [f"train.steps={steps}", f"train.run_dir={run_dir}", *overrides, *extra])
        summary = _train(cfg, True, say)
        if "sparsity" not in summary:  # dense: counted all the same (no zeros expected)
            from jaxbig.compress.prune import sparsity_by_layer
            from jaxbig.checkpoint.run import load_params
            from jaxbig.export.artifact import flatten_params

            summary["sparsity"] = sparsity_by_layer(flatten_params(load_params(run_dir)[2]))
        results.append(Result(name, cfg, summary))
        say(f"{name}: val loss {summary['final_eval_loss']:.4f} after {steps} steps ({summary.get('bench_wall_s', summary['wall_s']):.0f} s)", flush=True)
    return results


def _pruned_sparsity(report: dict, include=("blocks/attn/w", "blocks/mlp/w")) -> tuple[float, float]:
    """(sparsity over the pruned weights, sparsity over all weight matrices)."""
    pruned = [e for p, e in report.items() if p.startswith(include)]
    over = sum(e["zeros"] for e in pruned) / sum(e["size"] for e in pruned)
    return over, sum(e["zeros"] for e in report.values()) / sum(e["size"] for e in report.values())


def _header(cfg: Config, command: str, load: tuple[float, float]) -> list[str]:
    o = cfg.optim
    return [
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}  ",
        f"Machine: {os.cpu_count()} CPU cores (shared), {len(jax.devices())} {jax.devices()[0].platform} device; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after  ",
        f"Run: batch {cfg.train.batch_size}×{cfg.data.seq_len}, {cfg.train.steps} steps, {o.optimizer} lr {o.learning_rate} "
        f"({o.schedule}, {o.warmup_steps} warmup steps), val loss over {cfg.train.eval_batches} validation batches of the stdlib corpus.  ",
    ]


def pruning_report(results: list[Result], *, command: str, load: tuple[float, float]) -> str:
    from jaxbig.compress.prune import sparsity_table

    base = results[0]
    lines = _header(base.cfg, command, load)
    lines[-1] += f"\nModel: {base.cfg.model.num_params() / 1e6:.2f}M params ({base.cfg.model.num_layers} layers, d_model {base.cfg.model.d_model}).  "
    lines += ["", "| variant | schedule | sparsity of pruned weights | of all matrices | val loss | vs dense | s / step |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r.cfg.prune
        if p.method == "magnitude":
            sched = f"cubic {p.initial_sparsity:.0%} → {p.sparsity:.0%}, steps {p.start_step}–{p.end_step} every {p.update_every}, per {p.scope}"
        elif p.method == "nm":
            sched = f"{p.n}:{p.m} along the contracted axis, one shot at step {p.start_step}"
        else:
            sched = "—"
        over, total = _pruned_sparsity(r.summary["sparsity"])
        diff = "—" if r is base else f"{r.val_loss / base.val_loss - 1:+.2%}"
        lines.append(f"| {r.name} | {sched} | {over:.1%} | {total:.1%} | {r.val_loss:.4f} | {diff} | {r.seconds_per_step:.2f} |")
    for r in results[1:]:
        lines += ["", f"Sparsity reached by weight and layer, {r.name} (exact zeros in the final weights):", "", sparsity_table(r.summary["sparsity"])]
    return "\n".join(lines)


def run_distill(preset: Path, steps: int, extra: list[str], say=print) -> tuple[Result, list[Result]]:
    teacher_cfg = dense_config(preset, steps, extra)
    summary_file = Path(teacher_cfg.train.run_dir) / "summary.json"
    if summary_file.is_file():  # the pruning benchmark's dense run, whatever its length (its config is left as it is)
        from jaxbig.checkpoint.run import load_run_config

        teacher_cfg = load_run_config(teacher_cfg.train.run_dir)
        teacher_summary = json.loads(summary_file.read_text())
        say(f"teacher: the finished run {teacher_cfg.train.run_dir} ({teacher_cfg.train.steps} steps)", flush=True)
    else:
        teacher_summary = _train(teacher_cfg, False, say)
    if teacher_summary.get("final_eval_loss") is None:
        raise RuntimeError(f"teacher run {teacher_cfg.train.run_dir} has no final eval loss")
    teacher = Result(f"teacher (`{preset.stem}`, {teacher_cfg.train.steps} steps)", teacher_cfg, teacher_summary)
    say(f"teacher: val loss {teacher.val_loss:.4f}", flush=True)
    students = []
    for name, overrides in (("student from scratch", []), ("student distilled", [f"distill.teacher={teacher_cfg.train.run_dir}"])):
        run_dir = RUNS / ("student-scratch" if not overrides else "student-distilled")
        cfg = load_config(preset, [f"train.steps={steps}", f"train.run_dir={run_dir}", *STUDENT, *overrides, *extra])
        summary = _train(cfg, True, say)
        students.append(Result(name, cfg, summary))
        say(f"{name}: val loss {summary['final_eval_loss']:.4f} ({summary.get('bench_wall_s', summary['wall_s']):.0f} s)", flush=True)
    return teacher, students


def distill_report(teacher: Result, students: list[Result], *, command: str, load: tuple[float, float]) -> str:
    from jaxbig.compress.distill import describe

    scratch = students[0]
    lines = _header(scratch.cfg, command, load)
    d = students[1].cfg.distill
    lines[-1] += f"\nDistillation: {describe(d)}; teacher run `{Path(d.teacher).relative_to(ROOT) if Path(d.teacher).is_relative_to(ROOT) else d.teacher}`.  "
    lines += ["", "| model | params | layers × d_model | val loss | vs scratch student | s / step |", "|---|---:|---|---:|---:|---:|"]
    for r in [teacher, *students]:
        m = r.cfg.model
        diff = "—" if r is scratch or r is teacher else f"{r.val_loss - scratch.val_loss:+.4f} ({r.val_loss / scratch.val_loss - 1:+.2%})"
        sps = r.seconds_per_step
        sps = f"{sps:.2f}" if sps == sps else "(trained earlier)"
        lines.append(f"| {r.name} | {m.num_params() / 1e6:.2f}M | {m.num_layers} × {m.d_model} | {r.val_loss:.4f} | {diff} | {sps} |")
    return "\n".join(lines)


def main(args, command: str) -> int:
    """`scripts/bench.py --pruning` / `--distill`."""
    from benchmarks import harness
    from jaxbig.config import ConfigError

    steps = args.steps or 300
    name = (args.config or ["small"])[0]
    preset = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "configs" / f"{name}.yaml"
    load_before = os.getloadavg()[0]
    try:
        if args.pruning:
            results = run_pruning(preset, steps, args.set, only=args.variants)
            text, (start, end), intro = pruning_report(results, command=command, load=(load_before, os.getloadavg()[0])), PRUNE_MARKERS, PRUNE_INTRO
        else:
            teacher, students = run_distill(preset, steps, args.set)
            text, (start, end), intro = distill_report(teacher, students, command=command, load=(load_before, os.getloadavg()[0])), DISTILL_MARKERS, DISTILL_INTRO
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if not args.no_write:
        harness.write_section(DOC, text, start, end, intro)
        print(f"wrote {DOC}")
    return 0


__all__ = ["distill_report", "main", "prune_variants", "pruning_report", "run_distill", "run_pruning"]
