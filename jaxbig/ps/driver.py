"""The driver of a parameter-server run: starts the actors, schedules rounds, logs, evaluates, checkpoints.

The driver never touches a gradient: params and pushes travel between workers and server shards (Ray's
object store). It keeps the clocks (rounds each worker has finished) and hands out work:

    for each idle worker w whose clock is at most ps.max_staleness ahead of the slowest (SSP):
        w.round(clock, indices of its next batches)       # pull, compute, push; returns a record
    on each finished round: log, evaluate, checkpoint at the step cadences of the train section

Stale-synchronous parallel (SSP; Ho et al. 2013, "More Effective Distributed ML via a Stale Synchronous
Parallel Parameter Server"): with bound s a worker may start round c+1 only while c - min(clocks) <= s, so
fast workers run ahead by at most s rounds and a straggler never blocks the rest until they are s ahead.
s = 0 is bulk-synchronous (with async_sgd the server then averages each round's gradients: synchronous
data parallelism); a large s is fully asynchronous (Hogwild-style, Recht et al. 2011, but with a
server applying pushes one at a time rather than lock-free writes).

Asynchronous local SGD (Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling", arXiv
2401.09135): a round is H local steps, and with `ps.dynamic_local_steps` (DyLU) worker i's H is
H x speed_i / fastest speed, from the speeds measured in earlier rounds, so rounds take about the same
wall time on every worker; the server applies the deltas with delayed Nesterov momentum.

Steps (the cadences and train.steps) count worker steps over all workers: batches of train.batch_size.
Worker w's k-th batch is global batch k x workers + w (`jaxbig.ps.worker.batch_index`), so one worker reads
the synchronous run's batches. Checkpoints (orbax) hold the server's params and optimizer state, its
version, and each worker's data position and clock; the driver lets the in-flight rounds finish first, so
a checkpoint is a consistent state. Re-running the same command resumes from the newest one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import ray
from jax.sharding import SingleDeviceSharding
from tqdm import tqdm

from jaxbig.checkpoint import Checkpoints
from jaxbig.checkpoint.run import load_params
from jaxbig.config import Config
from jaxbig.data import eval_batches, load_corpus
from jaxbig.ps.cluster import check_address, ray_cluster, start_servers, start_workers
from jaxbig.models.paths import nest, to_flat
from jaxbig.ps.groups import shard_groups
from jaxbig.ps.server import server_optimizer
from jaxbig.ps.setup import check_ps, param_shapes
from jaxbig.ps.worker import batch_index
from jaxbig.train import metrics as metrics_lib
from jaxbig.train.loop import prepare_run_dir
from jaxbig.train.step import mean_loss
from jaxbig.xla_options import enable_compilation_cache

WORKERS_FILE = "ps_workers.json"  # worker index -> the pid of its process (an operator's, or a test's, way to find it)


@dataclasses.dataclass
class _Position:
    """Where the run stands: what a checkpoint holds besides the server's params and optimizer state."""

    version: int  # server updates applied
    positions: list[int]  # per worker: batches handed out (its next batch is batch_index(position, w, workers))
    clocks: list[int]  # per worker: rounds finished


@dataclasses.dataclass(frozen=True)
class _Sinks:
    """Where the driver's results go."""

    evaluate: Callable[[dict], float]  # named params -> validation loss
    checkpoints: Checkpoints
    writer: metrics_lib.MetricsWriter
    say: Callable[[str], None]
    progress: bool


def _abstract_server_state(cfg: Config, run, groups: list[list[str]]) -> dict[str, Any]:
    """The checkpointed tree as ShapeDtypeStructs on the driver's first device: the orbax restore target."""
    device = SingleDeviceSharding(run.mesh.devices.flat[0])
    params = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for n, x in to_flat(run.abstract.params).items()}
    tx = server_optimizer(cfg)
    opt = tuple(jax.eval_shape(tx.init, nest({n: params[n] for n in g})) for g in groups)
    opt = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), opt)
    counter = lambda shape: jax.ShapeDtypeStruct(shape, np.int32, sharding=device)  # noqa: E731
    W = cfg.ps.workers
    return {"params": nest(params), "opt_state": opt, "version": counter(()), "positions": counter((W,)), "clocks": counter((W,))}


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and before // every < after // every


class _Log:
    """Push records between two log lines, reduced to one metrics.jsonl record and a staleness histogram."""

    def __init__(self, cfg: Config, writer: metrics_lib.MetricsWriter):
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.writer, self.records, self.t = writer, [], time.perf_counter()

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self, step: int, version: int, speeds: list, extras: dict) -> dict:
        recs, self.records = self.records, []
        now, dt = time.perf_counter(), time.perf_counter() - self.t
        self.t = now
        out: dict[str, Any] = dict(extras, version=version)
        if recs:
            staleness = [r["staleness"] for r in recs]
            out.update(
                loss=float(np.mean([r["loss"] for r in recs])),
                staleness_mean=float(np.mean(staleness)),
                staleness_max=int(max(staleness)),
                clock_gap_max=int(max(r["clock_gap"] for r in recs)),
                pushes=len(recs),
                bytes_pushed=int(sum(r["bytes_pushed"] for r in recs)),
                bytes_pulled=int(sum(r["bytes_pulled"] for r in recs)),
                tokens_per_sec=sum(r["steps"] for r in recs) * self.tokens_per_step / max(dt, 1e-9),
            )
            self.writer.histogram("staleness", staleness, step)
        known = [(s, i) for i, s in enumerate(speeds) if s is not None]
        if known:
            out["slowest_worker"] = min(known)[1]
            out.update({f"speed_w{i}": s for s, i in known})
        self.writer.write(step, out)
        return out


def train_ps(
    cfg: Config, *, ray_address: str | None = None, fresh: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains `cfg` (optim.outer=async_ps) on Ray actors and returns a summary; `stop_after` ends this
    invocation at the first checkpoint at or after that step, as if the driver were killed there."""
    t_start = time.perf_counter()
    enable_compilation_cache(cfg.compile.cache_dir)
    ps, W = cfg.ps, cfg.ps.workers
    # --- every check before anything starts or is written ------------------------------------------
    if ray_address:
        check_address(ray_address)
    run = check_ps(cfg)  # the driver's Run: one worker's layout on this host's first devices (init, eval)
    groups = shard_groups(param_shapes(cfg), ps.num_server_shards)
    corpus = load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes)
    run_dir = Path(cfg.train.run_dir)
    prepare_run_dir(cfg, run_dir, fresh)
    say = tqdm.write if progress else print
    B, T = cfg.train.batch_size, cfg.data.seq_len
    end = cfg.train.steps

    with run.context():
        val = eval_batches(corpus.val_BYTES, T, B, run.mesh, cfg.train.eval_batches)
        checkpoints = Checkpoints(run_dir, cfg.train.keep_checkpoints, say=say)
        start, restored = checkpoints.restore_latest(_abstract_server_state(cfg, run, groups))
        if restored is not None:
            restored = jax.device_get(restored)
            params = to_flat(restored["params"])
            opt_states, version = list(restored["opt_state"]), int(restored["version"])
            positions, clocks = [int(p) for p in restored["positions"]], [int(c) for c in restored["clocks"]]
        else:
            if cfg.train.init_from:
                _, _, init_params, _ = load_params(cfg.train.init_from, mesh=run.mesh)
                state = run.init_from_params(init_params)
            else:
                state = run.init()
            params = to_flat(jax.device_get(state.params))
            del state
            opt_states, version, positions, clocks = None, 0, [0] * W, [0] * W
        writer = metrics_lib.MetricsWriter(run_dir)
        evaluate = lambda flat: mean_loss(run.eval_step, jax.device_put(nest(flat), run.shardings.params), val)  # noqa: E731
        summary: dict[str, Any] = {"start_step": start, "num_params": cfg.model.num_params(), "workers": W, "algorithm": ps.algorithm}
        if start >= end:
            summary["final_eval_loss"] = evaluate(params)
            say(f"run_dir {run_dir} is already trained to step {start} (train.steps={end}); nothing to do")
            checkpoints.close()
            writer.close()
            return summary
        summary["initial_eval_loss"] = evaluate(params)
        writer.write(start, {"eval_loss": summary["initial_eval_loss"], "version": version, "wall_s": 0.0}, jsonl=False)

    with run.context(), ray_cluster(cfg, ray_address):  # the driver's evaluations trace under the run's mesh and rules
        shards = start_servers(cfg, [{n: params[n] for n in g} for g in groups], opt_states, version)
        workers = start_workers(cfg, shards, groups)
        pids = ray.get([w.pid.remote() for w in workers])  # waits until every worker has built its step
        (run_dir / WORKERS_FILE).write_text(json.dumps({str(i): p for i, p in enumerate(pids)}))
        say(
            f"jaxbig ps: {ps.algorithm} | {W} workers x {ps.devices_per_worker} {jax.default_backend()} devices, "
            f"{ps.num_server_shards} server shard(s) | max_staleness {ps.max_staleness}"
            + (f" | H {ps.local_steps}{' (DyLU)' if ps.dynamic_local_steps else ''}" if ps.algorithm == "async_local_sgd" else "")
            + (f" | slowdown {','.join(f'{f:g}' for f in ps.worker_slowdown)}" if ps.worker_slowdown else "")
            + f" | push {cfg.optim.compression} | {summary['num_params'] / 1e6:.2f}M params | run_dir {run_dir}"
            + (f" | resuming at step {start}, server version {version}" if start else "")
        )
        say(f"step {start:>6d} | eval_loss {summary['initial_eval_loss']:.4f}")
        summary["rounds_start_s"] = time.perf_counter() - t_start  # actors up and compiled: the first round starts
        sinks = _Sinks(evaluate, checkpoints, writer, say, progress)
        at = _Position(version, positions, clocks)
        summary.update(_schedule(cfg, workers, shards, pids, sinks, at, start=start, stop_after=stop_after, t_start=t_start))
    checkpoints.close()
    writer.close()
    summary["wall_s"] = time.perf_counter() - t_start
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    say(
        f"done: eval_loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f} | server version {summary['version']} | "
        f"staleness mean {summary['staleness_mean']:.2f} max {summary['staleness_max']} | {summary['worker_restarts']} worker restarts | "
        f"{summary['wall_s']:.0f}s total | checkpoints in {run_dir}/checkpoints"
    )
    return summary


def _current_pid(worker, timeout_s: float = 300.0) -> int:
    """The worker's process id, waiting while Ray restarts it (importing JAX and compiling take seconds)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return ray.get(worker.pid.remote())
        except ray.exceptions.ActorUnavailableError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _schedule(cfg: Config, workers: list, shards: list, pids: list[int], sinks: _Sinks, at: _Position, *, start: int, stop_after: int | None, t_start: float) -> dict:
    """The round scheduler: SSP admission, DyLU, failures, and the log/eval/checkpoint cadences; updates `at`."""
    ps, W, tc, end = cfg.ps, cfg.ps.workers, cfg.train, cfg.train.steps
    evaluate, checkpoints, writer, say, progress = sinks.evaluate, sinks.checkpoints, sinks.writer, sinks.say, sinks.progress
    positions, clocks = at.positions, at.clocks
    local = ps.algorithm == "async_local_sgd"
    in_flight: dict[Any, tuple] = {}  # ObjectRef -> (worker, clock, schedule step, indices, clock gap)
    speeds: list[float | None] = [None] * W
    log = _Log(cfg, writer)
    done = assigned = start
    saving = False  # a checkpoint is due: no new rounds until the in-flight ones finish
    restarts = 0
    staleness_all: list[int] = []
    evals: list[tuple[int, float, float]] = []
    last_eval = None
    bar = tqdm(total=end, initial=start, disable=not progress, dynamic_ncols=True, unit="step")

    def submit(w: int, spec: tuple | None = None) -> None:
        nonlocal assigned
        if spec is None:
            n = 1
            if local:
                n = ps.local_steps
                if ps.dynamic_local_steps and speeds[w] is not None:
                    n = max(1, round(ps.local_steps * speeds[w] / max(s for s in speeds if s is not None)))
            n = min(n, end - assigned)
            indices = [batch_index(positions[w] + k, w, W) for k in range(n)]
            spec = (w, clocks[w], assigned, indices, clocks[w] - min(clocks))
            positions[w] += n
            assigned += n
        in_flight[workers[w].round.remote(spec[1], spec[2], spec[3])] = spec

    def pull_params() -> dict:
        return {n: v for _, part in ray.get([s.pull.remote() for s in shards]) for n, v in part.items()}

    probes: dict[Any, tuple] = {}  # ObjectRef of a restarted worker's pid() -> the round it must redo
    counted: set[int] = set()  # workers whose death a failed round reported, not yet seen back

    def rejoined(w: int, pid: int) -> None:
        """Worker w answers from a new process: a restart, counted here unless a failed round already counted it
        (a worker killed while idle is restarted by Ray before any call fails)."""
        nonlocal restarts
        if w not in counted:
            restarts += 1
            say(f"worker {w} died between rounds; Ray restarted it")
        counted.discard(w)
        pids[w] = pid
        (Path(tc.run_dir) / WORKERS_FILE).write_text(json.dumps({str(i): p for i, p in enumerate(pids)}))
        say(f"worker {w} is back (pid {pid}) and rejoined from the server's params")
    while done < end or in_flight or probes:
        busy = {spec[0] for spec in [*in_flight.values(), *probes.values()]}
        if not saving:
            for w in range(W):
                if w not in busy and assigned < end and clocks[w] - min(clocks) <= ps.max_staleness:
                    submit(w)
        if not in_flight and not probes:
            break
        ready, _ = ray.wait([*in_flight, *probes], num_returns=1)
        if ready[0] in probes:  # a worker that died: back yet?
            spec = probes.pop(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.ActorUnavailableError:  # still restarting (importing, compiling)
                time.sleep(0.5)
                probes[workers[spec[0]].pid.remote()] = spec
                continue
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"worker {spec[0]} died and cannot be restarted (ps.max_restarts={ps.max_restarts}): {str(e)[:300]}") from e
            submit(spec[0], spec)
            continue
        spec = in_flight.pop(ready[0])
        w = spec[0]
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            restarts += 1
            counted.add(w)
            say(f"worker {w} died during round {spec[1]} ({type(e).__name__}); Ray restarts it and it redoes the round from the server's params")
            probes[workers[w].pid.remote()] = spec
            continue
        record["clock_gap"] = spec[4]
        if record["pid"] != pids[w]:
            rejoined(w, record["pid"])
        clocks[w] += 1
        speeds[w] = record["speed"]
        at.version = max(at.version, record["version"])
        staleness_all.append(record["staleness"])
        log.add(record)
        before, done = done, done + record["steps"]
        bar.update(record["steps"])
        slow = min(range(W), key=lambda i: speeds[i] if speeds[i] is not None else float("inf"))
        bar.set_postfix(version=at.version, slowest=f"w{slow} {speeds[slow] or 0:.2f} step/s", loss=f"{record['loss']:.3f}", refresh=False)
        last = done >= end
        stop = stop_after is not None and done >= stop_after
        if _crossed(before, done, tc.checkpoint_every) or last or stop:
            saving = True
        extras = {"wall_s": time.perf_counter() - t_start}
        if _crossed(before, done, tc.eval_every) and not saving:
            extras["eval_loss"] = last_eval = evaluate(pull_params())  # while the others keep training
            evals.append((done, extras["wall_s"], last_eval))
        if saving and not in_flight:  # every round handed out is in: the server state is consistent
            params = pull_params()
            states = ray.get([s.state.remote() for s in shards])
            at.version = states[0][2]
            extras["eval_loss"] = last_eval = evaluate(params)
            evals.append((done, extras["wall_s"], last_eval))
            tree = {
                "params": nest(params),
                "opt_state": tuple(s[1] for s in states),
                "version": np.int32(at.version),
                "positions": np.asarray(positions, np.int32),
                "clocks": np.asarray(clocks, np.int32),
            }
            checkpoints.save(done, tree, None, last_eval)
            saving = False
            if stop and not last:
                say(f"stopping at step {done} (stop_after={stop_after}); re-run to resume")
                end = done  # no more rounds
        if _crossed(before, done, tc.log_every) or "eval_loss" in extras or done >= end:
            rec = log.flush(done, at.version, speeds, extras)
            say(metrics_lib.format_record(done, rec) + f" | version {at.version} | staleness {rec.get('staleness_mean', 0):.2f}/{rec.get('staleness_max', 0)}")
    bar.close()
    for w in range(W):  # a worker that died after its last round: the summary still counts its restart
        pid = _current_pid(workers[w])
        if pid != pids[w]:
            rejoined(w, pid)
    return {
        "steps": done,
        "version": at.version,
        "final_eval_loss": last_eval,
        "staleness_mean": float(np.mean(staleness_all)) if staleness_all else 0.0,
        "staleness_max": int(max(staleness_all)) if staleness_all else 0,
        "pushes": len(staleness_all),
        "worker_restarts": restarts,
        "evals": evals,
        "positions": list(positions),
    }


__all__ = ["WORKERS_FILE", "train_ps"]
