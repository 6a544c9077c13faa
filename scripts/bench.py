"""Tokens/s and MFU of jaxbig's train step against a hand-written JAX step of the same model.

    python scripts/bench.py [--config tiny small] [--steps N] [--repeats 40] [--no-write]

One device, one process, alternating timed rounds (see benchmarks/harness.py). Prints the
table and writes it to docs/benchmarks.md between the `bench:foundation` markers.

    python scripts/bench.py --compression [--config small] [--steps 128] [--methods none int8 powersgd ...]

Gradient compression and DiLoCo on 8 (emulated) data replicas (see benchmarks/compression.py):
bytes over the data axis per step for every method, and the validation loss after `--steps`
steps on the real corpus for `--methods`; writes the `bench:compression` section and
docs/compression_loss.png.

    python scripts/bench.py --data [--config small] [--steps 40]

The input pipeline and checkpoints (see benchmarks/data_ckpt.py): packed-pipeline tokens/s
with 0 and 2 workers against what training consumes, step time waiting on data, loop time
blocked per async save, and save/restore throughput against a plain copy; writes the
`bench:data` section.

    python scripts/bench.py --ps [--config small] [--steps 192]

The parameter server (see benchmarks/ps.py): 3 Ray workers, one 3x slower, synchronous vs async SGD
(bound 4) vs async local SGD (H=8, delayed Nesterov, dynamic local updates) to the same token budget:
wall-clock to a target validation loss, the loss at the budget, staleness; writes `bench:ps`.

    python scripts/bench.py --ps --faults [--seeds 0 1 2] [--steps 192]

Async local SGD per seed, uninterrupted and with worker 0 killed by SIGKILL at half the budget: the validation
loss at the budget of each; writes `bench:ps-faults`.

    python scripts/bench.py --serving [--seconds 30] [--clients 8] [--runtimes tf onnx]

The embedded TF-Serving-compatible server under load (see benchmarks/serving.py): p50/p99 latency
and throughput over REST and gRPC, batched and unbatched, on the TF runtime and ONNX Runtime (float32
version 1, int8 version 2 arriving mid-run), with a version switch mid-run, and the
overhead over calling the SavedModel in-process; writes the `bench:serving` section.

    python scripts/bench.py --monitoring [--seconds 30] [--clients 8] [--rounds 2]

The same load with model monitoring off, on, and on with 1% request logging, alternating (benchmarks/monitoring.py);
writes the `bench:monitoring` section.

    python scripts/bench.py --perf [--config tiny small d512] [--meshes 1x1 4x2] [--steps 30] [--rounds 2]
    python scripts/bench.py --perf --check [--margin 0.15]

Training speed (see benchmarks/perf.py): for each config and mesh, one `scripts/train.py`
process: tokens/s, model GFLOP/s, MFU, step-time median and spread, compile time, time to first
step, peak host memory; one device in --rounds rounds against the PyTorch eager peer on the same
shape, alternating which process runs first; tiny's time to first step with a cold and a warm
compilation cache; the hand-written step. Writes this CPU model's `bench:perf:<cpu>` section. With
--check, exits 1 when a run is more than --margin below this CPU's recorded baseline (writes nothing).

    python scripts/bench.py --profiles [--config small d512]

Speed options one by one against the defaults (see benchmarks/profiles.py): XLA CPU option
profiles, dot_product attention, unrolled layers, bf16 compute, remat; compiled in one process
and timed in alternating rounds, with the loss difference each causes. Writes `bench:profiles`.

    python scripts/bench.py --pruning [--steps 300] [--set prune.update_every=20 ...]
    python scripts/bench.py --distill [--steps 300] [--set distill.weight=0.5 --set distill.temperature=1]

Pruning and distillation on the real corpus (see benchmarks/sparsity.py): `small` dense vs 50%
magnitude and 2:4 sparsity; a tiny-width student from scratch vs distilled from the dense
`small` run. Writes the `bench:pruning` / `bench:distill` sections.
"""

from __future__ import annotations

import time

CLOCK_START = time.perf_counter()  # before the heavy imports: the time-to-first-step clock

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
# The foundation benchmark measures one device, the process's first; the compression benchmark
# and data benchmarks need 8 (emulated) devices (the ps benchmark: 3 workers x 1 device of them), so only they emulate them (before jax is imported).
if "--compression" in sys.argv[1:] or "--data" in sys.argv[1:] or "--ps" in sys.argv[1:]:
    from jaxbig.runtime import emulate_cpu_devices

    emulate_cpu_devices(8)

from benchmarks import harness  # noqa: E402
from jaxbig.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None, help="preset names (configs/NAME.yaml) or YAML paths (default: tiny small; --compression: small)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default: about 4 s worth); --compression: training steps (default 128)")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds per implementation, alternating which goes first (default 40 rounds of about 0.5 s for the hand-written comparison, 8 for --profiles)",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {harness.DOC.relative_to(ROOT)}")
    parser.add_argument("--compression", action="store_true", help="the gradient-compression / DiLoCo benchmark instead")
    parser.add_argument("--data", action="store_true", help="the input-pipeline and checkpoint benchmark instead")
    parser.add_argument("--pruning", action="store_true", help="the pruning benchmark (small: dense, 50%% magnitude, 2:4)")
    parser.add_argument("--variants", nargs="+", default=None, help="--pruning: train only these (dense, 'magnitude 50%%', 2:4); --ps: only the variants whose name contains one of these (e.g. local); finished runs are reused")
    parser.add_argument("--distill", action="store_true", help="the distillation benchmark (tiny-width student: scratch vs distilled from small)")
    parser.add_argument("--methods", nargs="+", default=None, help="--compression: methods to train (default: none int8 powersgd powersgd-2it powersgd-r8 diloco)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="--compression, --data, --pruning, --distill: config override for every run")
    parser.add_argument("--perf", action="store_true", help="the training-speed benchmark (loop per config and mesh, start-up, peers)")
    parser.add_argument("--meshes", nargs="+", default=None, help="--perf: meshes to run (default: 1x1 4x2)")
    parser.add_argument("--check", action="store_true", help="--perf: compare with the recorded baseline; exit 1 on a regression")
    parser.add_argument("--margin", type=float, default=0.15, help="--perf --check: allowed shortfall below the baseline (default 0.15)")
    parser.add_argument("--maxtext-python", default=None, metavar="PYTHON", help="--perf: an interpreter with `pip install maxtext` (benchmarks/peers/maxtext.md) to run MaxText beside jaxbig")
    parser.add_argument("--profiles", action="store_true", help="XLA option profiles and speed options, one by one against the defaults")
    parser.add_argument("--serving", action="store_true", help="the serving load benchmark instead")
    parser.add_argument("--ps", action="store_true", help="the parameter-server benchmark: sync vs async SGD vs async local SGD, 3 workers, one 3x slower")
    parser.add_argument("--faults", action="store_true", help="--ps: async local SGD per seed uninterrupted and with a worker killed (SIGKILL) mid-run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--ps --faults: train.seed of each pair of runs")
    parser.add_argument("--seconds", type=float, default=30.0, help="--serving: length of each load run")
    parser.add_argument("--clients", type=int, default=8, help="--serving: concurrent clients (half REST, half gRPC)")
    parser.add_argument("--monitoring", action="store_true", help="serving with model monitoring off vs on (p50/p99 at --clients, --seconds per run)")
    parser.add_argument("--rounds", type=int, default=2, help="--monitoring: rounds of the off/on set-ups; --perf: rounds of jaxbig against the PyTorch peer; both alternating which runs first")
    parser.add_argument("--runtimes", nargs="+", default=["tf", "onnx"], choices=("tf", "onnx"), help="--serving: the embedded server's runtimes to load (TF, ONNX Runtime)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 8 if args.profiles else 40
    if args.data:
        from benchmarks import data_ckpt

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return data_ckpt.main(args, command)
    if args.perf or args.profiles:
        from benchmarks import perf, profiles

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return perf.main(args, command) if args.perf else profiles.main(args, command)
    if args.ps:
        from benchmarks import ps

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return ps.main(args, command)
    if args.monitoring:
        from benchmarks import monitoring

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return monitoring.main(args, command)
    if args.serving:
        from benchmarks import serving

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return serving.main(args, command)
    if args.pruning or args.distill:
        if args.pruning and args.distill:
            parser.error("--pruning and --distill are separate runs; pass one (--pruning first: --distill reuses its dense run as the teacher)")
        from benchmarks import sparsity

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return sparsity.main(args, command)
    if args.compression:
        from benchmarks import compression

        command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        return compression.main(args, command)
    args.config = args.config or ["tiny", "small"]
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        parser.error(f"--steps and --repeats must be >= 1, got --steps {args.steps} --repeats {args.repeats}")

    load_before = os.getloadavg()[0]
    results, to_first_step = [], None
    try:
        for name in args.config:
            path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "configs" / f"{name}.yaml"
            cfg = load_config(path)
            print(f"{path.stem}: compiling both steps, then {args.repeats} alternating timed rounds ...", flush=True)
            first_config = not results
            result, first = harness.bench_config(path.stem, cfg, steps=args.steps, rounds=args.repeats, clock_start=CLOCK_START if first_config else None)
            to_first_step = first if first_config else to_first_step
            results.append(result)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = harness.measure_peak()
    command = "python scripts/bench.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    text = harness.report(results, peak, command=command, to_first_step=to_first_step, load=(load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        harness.write_section(harness.DOC, text)
        print(f"wrote {harness.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
