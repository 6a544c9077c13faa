"""Serving under load: latency and throughput of the embedded server on TF and ONNX Runtime, batched and unbatched, vs the SavedModel in-process.

    python scripts/bench.py --serving [--seconds 30] [--clients 8]

A tiny model (configs/tiny.yaml shapes, a few training steps: speed does not depend on the
weights) is exported as float32 version 1 and served by `scripts/serve.py --server embedded` in
its own process (so clients and server do not share a GIL). Each load run: `--clients` threads,
half REST (columnar JSON) and half gRPC (`PredictionServiceStub`), each sending one [1, 32] token
request after another for `--seconds`; a third of the way in, version 2 appears under the base
path (staged beforehand and renamed in, the last step of `scripts/export.py`, so the exporter's
CPU does not distort the clients) and must be picked up with zero errors. Every response is
checked against the SavedModel's own output for the version that answered. The overhead row is
one client at a time against one thread calling the loaded SavedModel directly.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:serving:start -->", "<!-- bench:serving:end -->"
SECTION_INTRO = """## Serving: the embedded TF-Serving-compatible server under load

`benchmarks/serving.py` (`python scripts/bench.py --serving`): 8 concurrent clients (half REST,
half gRPC) for 30 s against `scripts/serve.py --server embedded`, while a new version is
picked up mid-run; every response is checked against the SavedModel's output for the version that
answered. Latency is per request as the client sees it; the overhead row compares one request at a
time over each protocol with one thread calling the same loaded SavedModel in-process.

Reading the numbers: on this shared 2-core CPU one model call takes 1.5 ms, which is small next to
the server's per-request work in Python (JSON, gRPC, the GIL). Merging requests therefore saves little,
while the batch timeout and the first call at each new padded batch shape cost time: one XLA compilation
per shape and version, about 1 s here, which shows up in the batched p99. So batching costs throughput
here. It pays when the model call dominates (bigger models, accelerators). The unbatched p50 under load
is mostly queueing: 8 clients share 2 cores with the server and with other jobs.
"""


# ---- a server in its own process ---------------------------------------------------------------
class ServerProcess:
    """`scripts/serve.py` in a subprocess; `rest` and `grpc` are its addresses once it answers."""

    def __init__(self, base_path: Path, name: str, *extra: str, server: str = "embedded", timeout: float = 300.0):
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        args = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model_base_path", str(base_path), "--model_name", name,
                "--rest_port", "0", "--grpc_port", "0", "--server", server, *extra]
        self.log = []
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.rest = self.grpc = None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # blocks until the server prints its addresses (or exits)
            self.log.append(line)
            if m := re.match(r"REST (\S+)", line):
                self.rest = m.group(1)
            if m := re.match(r"gRPC (\S+)", line):
                self.grpc = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.grpc is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-40:]))
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self._drain.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def stage_version(source: Path, base_path: Path, version: int) -> Callable[[], None]:
    """Copies a version directory next to the base path now; the returned function renames it in (atomic)."""
    staged = base_path / f".staged-{version}"
    shutil.copytree(source, staged)
    return lambda: staged.rename(base_path / str(version))


# ---- load ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadResult:
    seconds: float
    latencies: dict[str, list[float]]  # protocol -> seconds per successful request
    errors: list[str]
    versions: collections.Counter  # version that answered -> requests (gRPC reports it)
    switched_at: float | None = None  # seconds into the run when the new version first answered

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def percentile(self, q: float, protocol: str | None = None) -> float:
        lat = [x for p, v in self.latencies.items() if protocol in (None, p) for x in v]
        return float(np.percentile(lat, q)) if lat else float("nan")


SWITCH_WAIT_S = 120.0  # the longest a run waits, after the new version is written, for the server to answer with it


def run_load(
    clients: list[tuple[str, Callable[[], int | None]]],
    seconds: float,
    during: Callable[[], None] | None = None,
    during_at: float = 1 / 3,
    until_version: int | None = None,
) -> LoadResult:
    """Each (protocol, call) runs in its own thread, back to back, for `seconds`; `during()` runs in between.

    `call()` sends one request, checks the answer (raising on a wrong one) and returns the version that answered (or None).
    With `until_version`, the run goes on past `seconds` until that version has answered for a quarter
    of `seconds` (waiting at most 4 x `seconds`, or SWITCH_WAIT_S after `during()` returns if that is later), so a
    slow export or a slow load cannot end the run before the switch.
    """
    latencies = {p: [] for p, _ in clients}
    errors, versions, first_seen = [], collections.Counter(), {}
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = [t0 + seconds]

    def client(protocol, call):
        while (start := time.perf_counter()) < deadline[0]:
            try:
                version = call()
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever raised it
                with lock:
                    errors.append(f"{protocol}: {type(e).__name__}: {e}"[:300])
                continue
            done = time.perf_counter()
            with lock:
                latencies[protocol].append(done - start)
                versions[version] += 1
                if version not in first_seen:
                    first_seen[version] = done - t0
                    if version == until_version:
                        deadline[0] = max(t0 + seconds, done + seconds / 4)

    if until_version is not None:
        deadline[0] = t0 + 4 * seconds  # shortened to max(seconds, switch + seconds / 4) once the version answers
    threads = [threading.Thread(target=client, args=c, daemon=True) for c in clients]
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(seconds * during_at)
        during()
        with lock:
            if until_version is not None and until_version not in first_seen:
                # The switch is timed from the version's arrival, not the run's start: an export slowed by the
                # load itself (8 clients on a few shared cores) must not leave the server no time to pick it up.
                # Loading a SavedModel (and replaying its warmup) under that load can take tens of seconds on two
                # cores; the wait is capped, and ends a quarter of `seconds` after the version first answers.
                deadline[0] = max(deadline[0], time.perf_counter() + max(seconds, SWITCH_WAIT_S))
    for t in threads:
        t.join()
    newest = max((v for v in versions if v is not None), default=None)
    return LoadResult(time.perf_counter() - t0, latencies, errors, versions, first_seen.get(newest) if len(versions) > 1 else None)


def checked_calls(rest_url: str, grpc_target: str, name: str, tokens: np.ndarray, expected: dict[int, np.ndarray], atol: float = 1e-5):
    """A REST and a gRPC call factory whose answers must equal `expected[version]` (REST: one of them)."""
    from jaxbig.serve.client import GrpcClient, RestClient

    def rest():
        client = RestClient(rest_url, name)

        def call():
            got = np.asarray(client._json("POST", f"/v1/models/{name}:predict", {"inputs": {"tokens": tokens.tolist()}})["outputs"], np.float32)
            if not any(np.allclose(got, want, rtol=0, atol=atol) for want in expected.values()):
                raise AssertionError("REST logits match no served version")
            return None

        return call

    def grpc_():
        client = GrpcClient(grpc_target, name)

        def call():
            got = client.predict({"tokens": tokens})["logits"]
            np.testing.assert_allclose(got, expected[client.last_version], rtol=0, atol=atol)
            return client.last_version

        return call

    return rest, grpc_


# ---- the benchmark --------------------------------------------------------------------------------
def _direct(version_dir: Path, tokens: np.ndarray, seconds: float, runtime: str = "tf") -> tuple[list[float], np.ndarray]:
    """Latencies of one thread calling the version's serving_default in-process (TF SavedModel or ONNX Runtime), and its answer."""
    if runtime == "onnx":
        from jaxbig.serve.onnx_runtime import OnnxModel

        model = OnnxModel(version_dir)
        call = lambda: model.forward(tokens)  # noqa: E731
    else:
        import tensorflow as tf

        fn, x = tf.saved_model.load(str(version_dir)).signatures["serving_default"], tf.constant(tokens)
        call = lambda: fn(tokens=x)["logits"].numpy()  # noqa: E731
    out = call()
    lat, deadline = [], time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        call()
        lat.append(time.perf_counter() - start)
    return lat, out


def prepare_exports(work: Path, steps: int, versions=((1, "none"), (2, "int8")), fmt: str = "all") -> tuple[Path, Path]:
    """(run, staging): configs/tiny.yaml trained `steps` steps on 40 stdlib modules, exported as `versions`
    ((version, quantization) pairs) under staging in `fmt` (all: the SavedModel for TF, onnx/ for ONNX Runtime)."""
    from jaxbig.config import load_config
    from jaxbig.data.corpus import stdlib_root
    from jaxbig.export.bundle import export_run
    from jaxbig.train.loop import train

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in sorted(stdlib_root().glob("*.py"))[:40]:
        (corpus / f.name).write_bytes(f.read_bytes())
    run = work / "run"
    overrides = [f"train.steps={steps}", "optim.warmup_steps=1", f"train.run_dir={run}", f"data.paths={corpus}", "train.log_every=1000", "train.eval_every=1000", "mesh.data=-1"]
    train(load_config(ROOT / "configs" / "tiny.yaml", overrides), progress=False)
    staging = work / "staging"
    for version, quantize in versions:
        export_run(run, staging, version, quantize=quantize, format=fmt)
    return run, staging


def _onnx_expected(staging: Path, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """What ONNX Runtime answers in-process for each version (its int8 is ONNX Runtime's, not the SavedModel's)."""
    from jaxbig.serve.onnx_runtime import OnnxModel

    return {v: OnnxModel(staging / str(v)).forward(tokens) for v in (1, 2)}


def main(args, command: str) -> int:
    import tempfile

    from jaxbig.serve.client import RestClient

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    _, staging = prepare_exports(work, steps=args.steps or 5)
    tokens = np.random.default_rng(0).integers(1, 256, (1, 32)).astype(np.int32)
    direct_lat, ref1 = _direct(staging / "1", tokens, args.seconds / 3)
    _, ref2 = _direct(staging / "2", tokens, 0.0)
    in_process = {(rt, v): _direct(staging / str(v), tokens, args.seconds / 6, rt)[0] for rt in args.runtimes for v in (1, 2)}
    expected = {"tf": {1: ref1, 2: ref2}, "onnx": _onnx_expected(staging, tokens)}
    rows, sequential = [], {}
    batched = ["--enable_batching", "--max_batch_size", "8", "--batch_timeout_micros", "2000"]
    for runtime, mode, extra in [(rt, m, e) for rt in args.runtimes for m, e in (("unbatched", []), ("batched", batched))]:
        base = work / f"exports-{runtime}-{mode}" / "tiny"
        base.mkdir(parents=True)
        shutil.copytree(staging / "1", base / "1")
        swap = stage_version(staging / "2", base, 2)
        with ServerProcess(base, "tiny", *extra, "--runtime", runtime) as server:
            rest, grpc_ = checked_calls(server.rest, server.grpc, "tiny", tokens, expected[runtime])
            mode = f"{runtime}, {mode}"
            if mode == "tf, unbatched":  # one request at a time: the per-request overhead
                for protocol, make in (("REST", rest), ("gRPC", grpc_)):
                    call = make()
                    for _ in range(20):
                        call()
                    sequential[protocol] = run_load([(protocol, call)], args.seconds / 3).percentile(50)
            clients = [("REST", rest()) if i % 2 == 0 else ("gRPC", grpc_()) for i in range(args.clients)]
            print(f"{mode}: {args.clients} clients for {args.seconds:.0f} s, version 2 arrives at {args.seconds / 3:.0f} s ...", flush=True)
            result = run_load(clients, args.seconds, during=swap, until_version=2)
            status = RestClient(server.rest, "tiny").status()
            metrics = __import__("requests").get(server.rest + "/monitoring/prometheus/metrics").text
        if result.errors:
            print("\n".join(result.errors[:20]), file=sys.stderr)
        rows.append((mode, result, status, _mean_batch(metrics)))
    text = _report(rows, direct_lat, sequential, args, command, load=(load_before, os.getloadavg()[0]), in_process=in_process)
    print(text)
    if not args.no_write:
        from benchmarks.harness import write_section

        write_section(DOC, text, START, END, SECTION_INTRO)
        print(f"wrote {DOC}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.errors for _, r, _, _ in rows) else 0


def _mean_batch(metrics: str) -> float:
    def value(name):
        m = re.search(rf"^{name} (\S+)$", metrics, re.M)
        return float(m.group(1)) if m else 0.0

    count = value("jaxbig_serving_batch_requests_count")
    return value("jaxbig_serving_batch_requests_sum") / count if count else 1.0


def _report(rows, direct_lat, sequential, args, command: str, load: tuple[float, float], in_process: dict | None = None) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()} with {os.cpu_count()} CPU cores (shared), TF {__import__('tensorflow').__version__}; "
        f"model: configs/tiny.yaml shapes (d_model 128, 4 layers), float32 (version 1; int8 version 2 from a third of the way in), one request = tokens [1, 32] -> logits [1, 32, 256]. "
        f"Command: `{command}`. 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (other jobs share the cores).",
        "",
        "| run | requests | errors | throughput (req/s) | p50 ms (REST / gRPC) | p99 ms (REST / gRPC) | mean requests per model call | version 2 first answered at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r, status, batch in rows:
        states = ", ".join(f"v{s['version']} {s['state']}" for s in status)
        switched = f"{r.switched_at:.1f} s" if r.switched_at is not None else "not seen"
        lines.append(
            f"| {mode}, {args.clients} clients, {r.seconds:.0f} s | {r.requests} | {len(r.errors)} | {r.requests / r.seconds:.0f} | "
            f"{ms(r.percentile(50, 'REST'))} / {ms(r.percentile(50, 'gRPC'))} | {ms(r.percentile(99, 'REST'))} / {ms(r.percentile(99, 'gRPC'))} | "
            f"{batch:.2f} | {switched} ({states}) |"
        )
    direct = statistics.median(direct_lat)
    lines += [
        "",
        "| one request at a time | p50 ms | overhead over in-process |",
        "|---|---|---|",
        f"| SavedModel called in-process (`tf.saved_model.load`, one thread) | {ms(direct)} | - |",
    ]
    for protocol, p50 in sequential.items():
        lines.append(f"| {protocol} to the embedded server | {ms(p50)} | +{ms(p50 - direct)} ms ({p50 / direct:.1f}x) |")
    if in_process:  # the runtimes side by side, one thread in-process, no server
        names = {"tf": "TF SavedModel (`tf.saved_model.load`)", "onnx": "ONNX Runtime (`OnnxModel`, all optimisations)"}
        lines += ["", "| in-process, one thread | float32 p50 / p99 ms | int8 p50 / p99 ms |", "|---|---|---|"]
        for rt in dict.fromkeys(rt for rt, _ in in_process):
            cells = [f"{ms(np.percentile(in_process[rt, v], 50))} / {ms(np.percentile(in_process[rt, v], 99))}" for v in (1, 2)]
            lines.append(f"| {names[rt]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
