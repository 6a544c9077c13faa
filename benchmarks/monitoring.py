"""What model monitoring costs on the request path: the embedded server under load with monitoring off and on.

    python scripts/bench.py --monitoring [--seconds 20] [--clients 8] [--rounds 2]

A tiny model (configs/tiny.yaml shapes, float32 SavedModel) is served by `scripts/serve.py --server embedded`
on the TF runtime, unbatched, in three set-ups: `--monitoring off`, `--monitoring on` (the default), and on with
request logging of 1% of requests. Each load run is benchmarks/serving.py's: `--clients` threads, half REST and
half gRPC, each sending one [1, 32] token request after another for `--seconds`, every answer checked against the
SavedModel's own output. The set-ups alternate for `--rounds` rounds (off, on, on+log, off, ...) so that a change in
the machine's other load hits all of them alike; the table gives each set-up's p50 and p99 over all its rounds, and
each round's p50 (their spread is the noise the comparison has to beat).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import machine_cpu, write_section
from benchmarks.serving import DOC, ServerProcess, checked_calls, prepare_exports, run_load

START, END = "<!-- bench:monitoring:start -->", "<!-- bench:monitoring:end -->"
SECTION_INTRO = """## Serving: what model monitoring costs

`benchmarks/monitoring.py` (`python scripts/bench.py --monitoring`): the embedded server under the 8-client load of
the serving benchmark with model monitoring off, on (drift, quality and generate metrics: jaxbig.serve.monitor),
and on with 1% request logging. On the request path monitoring only queues the request's arrays; its statistics
run on one background thread, which still shares the CPU with the requests.
"""
SETUPS = {"off": ["--monitoring", "off"], "on": ["--monitoring", "on"], "on + request logging 1%": ["--monitoring", "on", "--request_logging_sample_rate", "0.01"]}


def main(args, command: str) -> int:
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    _, staging = prepare_exports(work, steps=args.steps or 5, versions=((1, "none"),), fmt="savedmodel")
    tokens = np.random.default_rng(0).integers(1, 256, (1, 32)).astype(np.int32)
    import tensorflow as tf

    expected = {1: tf.saved_model.load(str(staging / "1")).signatures["serving_default"](tokens=tf.constant(tokens))["logits"].numpy()}
    latencies = {name: [] for name in SETUPS}
    errors = 0
    for round_ in range(args.rounds):
        for i, (name, flags) in enumerate(SETUPS.items()):
            base = work / f"round{round_}-setup{i}" / "tiny"
            shutil.copytree(staging / "1", base / "1")
            extra = [*flags, "--request_logging_dir", str(base.parent / "logs")] if "--request_logging_sample_rate" in flags else flags
            with ServerProcess(base, "tiny", "--runtime", "tf", *extra) as server:
                rest, grpc_ = checked_calls(server.rest, server.grpc, "tiny", tokens, expected)
                clients = [("REST", rest()) if i % 2 == 0 else ("gRPC", grpc_()) for i in range(args.clients)]
                run_load(clients, 3.0)  # warm: the first calls at a new shape
                print(f"round {round_ + 1}, monitoring {name}: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
                result = run_load(clients, args.seconds)
            errors += len(result.errors)
            latencies[name].append([x for v in result.latencies.values() for x in v])
    text = _report(latencies, errors, args, command, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(DOC, text, START, END, SECTION_INTRO)
        print(f"wrote {DOC}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if errors else 0


def _report(latencies: dict[str, list[list[float]]], errors: int, args, command: str, load: tuple[float, float]) -> str:
    """One row per set-up: percentiles over all its rounds, and each round's p50 (the spread is the machine's noise)."""
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    base = float(np.percentile([x for r in latencies["off"] for x in r], 50))
    lines = [
        f"Measured {datetime.date.today()} on {machine_cpu()} ({os.cpu_count()} cores, shared with other jobs: 1-minute load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after). Model: configs/tiny.yaml shapes, float32 SavedModel on the TF runtime, unbatched; "
        f"one request = tokens [1, 32] -> logits [1, 32, 256]; {args.clients} clients (half REST, half gRPC), {args.rounds} rounds of "
        f"{args.seconds:.0f} s per set-up, alternating; {errors} errors. Command: `{command}`.",
        "",
        "| monitoring | requests | p50 ms | p99 ms | p50 vs off | p50 per round, ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, rounds in latencies.items():
        lat = [x for r in rounds for x in r]
        p50 = float(np.percentile(lat, 50))
        per_round = " / ".join(ms(float(np.percentile(r, 50))) for r in rounds)
        lines.append(f"| {name} | {len(lat)} | {ms(p50)} | {ms(float(np.percentile(lat, 99)))} | {(p50 / base - 1) * 100:+.1f}% | {per_round} |")
    return "\n".join(lines)
