"""The training loop, visible top to bottom: set up, then `for step in ...` with log/eval/checkpoint branches."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxbig.checkpoint import Checkpoints
from jaxbig.checkpoint.run import CONFIG_FILE, load_params, load_run_config
from jaxbig.compress.distill import describe, load_teacher
from jaxbig.compress.prune import sparsity_of, sparsity_table
from jaxbig.config import Config, ConfigError
from jaxbig.data import ByteTokenizer, eval_batches, load_corpus, train_batches
from jaxbig.data.packed import packed_batches, packed_eval_batches
from jaxbig.data.prepare import PreparedData
from jaxbig.optim import MAX_CONSECUTIVE_SKIPS
from jaxbig.parallel.mesh import make_mesh
from jaxbig.parallel.pipeline import bubble_fraction, num_microbatches
from jaxbig.runtime import seconds_since_process_start
from jaxbig.train import metrics as metrics_lib
from jaxbig.train.setup import build, tokenizer_of
from jaxbig.train.step import mean_loss
from jaxbig.xla_options import cache_stats, enable_compilation_cache

REFRESH_PEAK_AFTER_S = 60.0  # runs longer than this measure the CPU matmul peak again at the end (about a second)


def prepare_run_dir(cfg: Config, run_dir: Path, fresh: bool, is_main: bool = True) -> None:
    """Refuses to mix two different runs in one directory; `fresh` clears an old run first.

    Every process checks (so all of them refuse together); only the main process deletes and writes.
    """
    if fresh and not is_main:
        return  # the main process is clearing the directory
    if fresh and run_dir.exists():
        for name in ("checkpoints", "tb", "metrics.jsonl", "summary.json", CONFIG_FILE):
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    saved = run_dir / CONFIG_FILE
    if saved.exists():
        changes = cfg.model.changes_from(load_run_config(run_dir).model)
        if changes:
            raise ConfigError(
                f"run_dir {str(run_dir)!r} holds a run of a different model (changed: {', '.join(changes)}); "
                "pass --fresh to start over there, or choose another --run_dir"
            )
    if is_main:  # written atomically: other processes may be reading it for the check above
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(".yaml.tmp")
            tmp.write_text(cfg.to_yaml())
            tmp.replace(saved)
        except OSError as e:
            raise ConfigError(f"run_dir {str(run_dir)!r} is not writable ({e.strerror or e}); choose a writable --run_dir") from None


def train(
    cfg: Config, *, mesh_spec: str | None = None, fresh: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains `cfg` and returns a summary: losses, throughput, MFU, compile time.

    `stop_after` ends this invocation after that step (checkpointed) as if the job were
    interrupted there; running again resumes it.
    """
    if cfg.optim.outer == "async_ps":
        raise ConfigError("optim.outer=async_ps runs on Ray workers: train it with jaxbig.ps.train_ps (scripts/train.py does)")
    t_start = time.perf_counter()
    cache_dir = enable_compilation_cache(cfg.compile.cache_dir)  # before the first compile
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.train.run_dir)

    # --- mesh, data, model and optimizer --------------------------------------------------------
    prepared = PreparedData(cfg.data.prepared) if cfg.data.prepared else None
    tokenizer = tokenizer_of(cfg)
    mesh = make_mesh(cfg.mesh, spec=mesh_spec)
    # Every check, the optimizer, the state's layout and the jitted steps (jaxbig.train.setup, which the
    # planner shares); a bad layout or XLA profile fails here, before anything is allocated or the run dir touched.
    run = build(cfg, mesh, tokenizer=tokenizer)
    corpus = None if prepared else load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes)
    prepare_run_dir(cfg, run_dir, fresh, is_main)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    # Outside the mesh context (it runs on one device); in the compute dtype, with the step's XLA options.
    peak = metrics_lib.machine_peak_flops(cfg.model.compute_dtype(), compiler_options=run.compiler_options)

    with run.context():
        abstract = run.abstract
        teacher = load_teacher(cfg, mesh) if cfg.distill.teacher else None  # frozen, outside the train state
        train_step = run.bind(teacher.params if teacher else None)
        eval_step = run.eval_step
        say = tqdm.write if progress else print

        # Resume from the newest readable checkpoint: train state and, for packed input, the data position.
        checkpoints = Checkpoints(run_dir, cfg.train.keep_checkpoints, is_main=is_main, say=say)
        batches = None
        if prepared:
            batches = packed_batches(prepared, T, B, mesh, seed=cfg.train.seed, shuffle=cfg.data.shuffle, workers=cfg.data.workers, prefetch=cfg.data.prefetch)
            val = packed_eval_batches(prepared, T, B, mesh, cfg.train.eval_batches)
        else:
            val = eval_batches(corpus.val_BYTES, T, B, mesh, cfg.train.eval_batches)
        start, restored = checkpoints.restore_latest(abstract, batches.iterator if batches else None)
        if restored is not None:
            state = restored
        elif cfg.train.init_from:  # fine-tuning: the source run's params, a fresh optimizer state
            _, _, init_params, init_step = load_params(cfg.train.init_from, mesh=mesh)
            state = run.init_from_params(init_params)
            del init_params
            if is_main:
                say(f"initialised from {cfg.train.init_from} (its step {init_step})")
        else:
            state = run.init()
        if batches is None:  # raw-text windows: batch = f(seed, step), rebuilt from the step
            batches = train_batches(corpus.train_BYTES, T, B, mesh, seed=cfg.train.seed, shuffle=cfg.data.shuffle, start_step=start, prefetch=cfg.data.prefetch)
        writer = metrics_lib.MetricsWriter(run_dir, enabled=is_main)
        flops_per_token = cfg.model.flops_per_token(T)
        tokens_per_step = B * T
        n_params = cfg.model.num_params()

        summary: dict[str, Any] = {"start_step": start, "num_params": n_params, "peak_flops": peak, "flops_per_token": flops_per_token}
        stages = mesh.shape["pipeline"]
        pipeline_note = ""
        if stages > 1:
            m, v = num_microbatches(cfg.parallel, stages), cfg.parallel.repeats
            summary["bubble_fraction"] = bubble_fraction(stages, m, v)
            pipeline_note = (
                f"pipeline {cfg.parallel.schedule} {stages} stages x {m} microbatches"
                + (f" x {v} repeats" if v > 1 else "")
                + f", bubble {summary['bubble_fraction']:.1%} | "
            )
        if is_main:
            say(
                f"jaxbig: {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} devices"
                f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''} | "
                f"{pipeline_note}{_data_note(corpus, prepared, cfg)} | "
                f"batch {B}x{T} | peak {peak / 1e9:.0f} GFLOP/s | run_dir {run_dir}"
            )
            if teacher is not None:
                say(f"distilling from {teacher.run_dir} (step {teacher.step}, {teacher.cfg.model.num_params() / 1e6:.2f}M params): {describe(cfg.distill)}")
        if start >= cfg.train.steps:
            summary["final_eval_loss"] = mean_loss(eval_step, state.params, val)
            if is_main:
                say(f"run_dir {run_dir} is already trained to step {start} (train.steps={cfg.train.steps}); nothing to do. "
                    "Use --steps N to train longer or --fresh to start over.")
            checkpoints.close()
            batches.close()
            writer.close()
            return summary
        if start and is_main:
            say(f"resuming from the checkpoint at step {start}")

        summary["initial_eval_loss"] = mean_loss(eval_step, state.params, val)
        writer.write(start, {"eval_loss": summary["initial_eval_loss"]}, jsonl=False)
        if is_main:
            say(f"step {start:>6d} | eval_loss {summary['initial_eval_loss']:.4f}")

        # --- the loop --------------------------------------------------------------------------
        bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True, unit="step")
        clock = _Throughput(tokens_per_step, flops_per_token, peak, batches.waits)
        pending = None  # (step, device metrics, host extras) of a logged step, fetched one step late
        last_record: dict[str, float] = {}
        end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        for step in range(start + 1, end + 1):
            t_step = time.perf_counter()
            state, step_metrics = train_step(state, next(batches))
            if step == start + 1:  # the first step compiles; throughput is timed from its end
                jax.block_until_ready(step_metrics)
                summary["first_call_s"] = time.perf_counter() - t_step  # trace + compile (or cache load) + one step
                summary["first_step_s"] = time.perf_counter() - t_start
                summary["time_to_first_step_s"] = seconds_since_process_start()  # process start (imports included)
                clock.mark(step)
            if pending is not None:  # the previous logged step has finished by now (or soon)
                last_record = _flush(pending, clock, writer, bar, say, is_main, checkpoints, cfg.train.skip_nonfinite)
                pending = None
            last = step == end
            save = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or last
            if step % cfg.train.log_every == 0 or step % cfg.train.eval_every == 0 or save:
                extras = {}
                if step % cfg.train.eval_every == 0 or save:  # every checkpoint carries its eval loss (keep-best)
                    jax.block_until_ready(state)  # the step's own time counts; the eval's does not
                    with clock.paused("eval"):
                        extras["eval_loss"] = mean_loss(eval_step, state.params, val)
                pending = (step, step_metrics, extras)
            if save:  # only a state whose step was finite is written: the last checkpoint stays good
                last_record = _flush(pending, clock, writer, bar, say, is_main, checkpoints, cfg.train.skip_nonfinite)
                pending = None
                with clock.paused("checkpoint"):
                    checkpoints.save(step, state, batches.iterator, last_record["eval_loss"])
            bar.update(1)
        if pending is not None:
            last_record = _flush(pending, clock, writer, bar, say, is_main, checkpoints, cfg.train.skip_nonfinite)
        bar.close()
        checkpoints.close()
        batches.close()
        writer.close()

    step_s = tokens_per_step / float(np.median(clock.rates)) if clock.rates else None
    median_mfu = metrics_lib.mfu(float(np.median(clock.rates)), flops_per_token, peak) if clock.rates else None
    long_run = time.perf_counter() - t_start > REFRESH_PEAK_AFTER_S
    if median_mfu is not None and (median_mfu > 1 or long_run) and jax.devices()[0].platform == "cpu":
        # A cached CPU peak may have been measured while other work shared the cores (one read 38 GFLOP/s where the
        # machine does 110+), and every MFU against it reads too high. The cache keeps the best figure measured, so
        # measuring again converges on the machine's own: after any run long enough that the second it takes is
        # noise, and always when the step beat the peak (which proves it low).
        peak = metrics_lib.machine_peak_flops(cfg.model.compute_dtype(), compiler_options=run.compiler_options, refresh=True)
        median_mfu = metrics_lib.mfu(float(np.median(clock.rates)), flops_per_token, peak)
        if is_main and median_mfu > 1:
            say(f"warning: MFU {median_mfu:.2f} > 1: the matmul peak ({peak / 1e9:.0f} GFLOP/s) was measured while other work shared the cores; rerun on a quiet machine for a true MFU")
    summary.update(
        data_wait_s=sum(batches.waits[1:]),  # the first batch (pipeline start-up) falls before throughput is timed
        data_wait_fraction=sum(batches.waits[1:]) / clock.busy_s if clock.busy_s else None,
        save_blocked_s=float(np.median(checkpoints.blocked_s)) if checkpoints.blocked_s else None,
        save_blocked_fraction=float(np.median(checkpoints.blocked_s)) / step_s if checkpoints.blocked_s and step_s else None,
        best_checkpoint_step=checkpoints.best_step(),
        skipped_steps=last_record.get("skipped_steps"),
        final_loss=last_record.get("loss"),
        final_eval_loss=last_record.get("eval_loss"),
        compile_s=summary["first_call_s"] - step_s if step_s and "first_call_s" in summary else None,
        compilation_cache=dict(cache_stats, dir=str(cache_dir)) if cache_dir else None,
        tokens_per_sec=float(np.median(clock.rates)) if clock.rates else None,
        mfu=median_mfu,
        peak_flops=peak,  # per compute dtype: measured on CPU, published for known GPUs/TPUs, None (no MFU) otherwise
        steps=cfg.train.steps,
        wall_s=time.perf_counter() - t_start,
    )
    if cfg.prune.method != "none":  # what the weights hold, counted (not what the masks say)
        summary["sparsity"] = sparsity_of(state.params)
        if is_main:
            say(f"sparsity by weight and layer (prune.method={cfg.prune.method}):\n{sparsity_table(summary['sparsity'])}")
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        say(
            f"done: eval_loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f} nats/token | "
            f"median {summary['tokens_per_sec'] or 0:,.0f} tokens/s, MFU {"n/a" if summary["mfu"] is None else format(summary["mfu"], ".3f")} | "
            f"first step {summary.get('time_to_first_step_s') or summary.get('first_step_s', 0):.1f}s after start | {summary['wall_s']:.0f}s total | checkpoints in {run_dir}/checkpoints"
        )
    return summary


class _Throughput:
    """Tokens/s between logged steps, excluding time spent in evals and checkpoint saves, and where the time went.

    Each measured interval (since the previous logged step) splits its wall time into `time/compute_s` (steps,
    dispatch included, less the input waits), `time/data_wait_s` (the loop waiting for its next batch),
    `time/eval_s` and `time/checkpoint_s` (how long saves held the loop: the device-to-host copy, not the write).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float, waits: list[float]):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.waits = waits  # the batch stream's per-batch input waits, appended as the loop runs
        self.rates: list[float] = []
        self._step = self._t = None
        self._paused = {"eval": 0.0, "checkpoint": 0.0}
        self._waits_seen = 0
        self.busy_s = 0.0  # time spent in measured steps (input waits included, evals and saves not)

    def mark(self, step: int) -> None:
        self._step, self._t = step, time.perf_counter()
        self._paused = dict.fromkeys(self._paused, 0.0)
        self._waits_seen = len(self.waits)

    @contextlib.contextmanager
    def paused(self, kind: str):
        t = time.perf_counter()
        yield
        self._paused[kind] += time.perf_counter() - t

    def measure(self, step: int) -> dict[str, float]:
        """Rate and time breakdown over the steps since the last mark; call once `step` has finished."""
        if self._step is None or step <= self._step:
            return {}
        busy = max(time.perf_counter() - self._t - sum(self._paused.values()), 1e-9)
        data_wait = float(sum(self.waits[self._waits_seen :]))
        self.busy_s += busy
        rate = (step - self._step) * self.tokens_per_step / busy
        self.rates.append(rate)
        breakdown = {"time/compute_s": busy - data_wait, "time/data_wait_s": data_wait, **{f"time/{k}_s": v for k, v in self._paused.items()}}
        self.mark(step)
        return {"tokens_per_sec": rate, "mfu": metrics_lib.mfu(rate, self.flops_per_token, self.peak), **breakdown}


def _host_mean(x: jax.Array) -> float:
    """A metric on the host; per-replica metrics ([N], split over data) as their mean, gathered across processes."""
    if not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils  # multi-process runs only

        return float(np.mean(multihost_utils.process_allgather(x)))
    return float(np.mean(jax.device_get(x)))


def _flush(pending, clock: _Throughput, writer, bar, say, is_main: bool, checkpoints: Checkpoints, skip_nonfinite: bool) -> dict[str, float]:
    step, device_metrics, extras = pending
    record = {k: _host_mean(v) for k, v in device_metrics.items()}
    watched = {k: record[k] for k in ("loss", "grad_norm", "replica_grad_norm") if k in record}
    if not all(np.isfinite(v) for v in watched.values()) and not skip_nonfinite:
        raise FloatingPointError(
            f"{', '.join(f'{k} {v}' for k, v in watched.items())} at step {step}; stopping. The last checkpoint, step "
            f"{checkpoints.latest_step()}, is good. Lower optim.learning_rate, raise optim.warmup_steps, or set "
            "train.skip_nonfinite=true to skip such steps"
        )
    if skip_nonfinite and record.get("nonfinite_streak", 0) >= MAX_CONSECUTIVE_SKIPS:
        raise FloatingPointError(
            f"{int(record['nonfinite_streak'])} non-finite steps in a row up to step {step} (train.skip_nonfinite skipped them); "
            f"stopping. The last checkpoint, step {checkpoints.latest_step()}, is good. Lower optim.learning_rate"
        )
    record.update(clock.measure(step))
    record.update(metrics_lib.memory_record())
    record.update(extras)
    writer.write(step, record)
    if is_main:
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        say(metrics_lib.format_record(step, record))
    return record


def _data_note(corpus, prepared: PreparedData | None, cfg: Config) -> str:
    if prepared is None:
        return f"corpus {len(corpus.train_BYTES) / 1e6:.1f}M train / {len(corpus.val_BYTES) / 1e6:.1f}M val bytes ({corpus.source})"
    splits = prepared.manifest["splits"]
    return (
        f"prepared {prepared.root} ({prepared.tokenizer.name}, {splits['train']['tokens'] / 1e6:.1f}M train / "
        f"{splits['val']['tokens'] / 1e6:.1f}M val tokens, packed, {cfg.data.workers} workers)"
    )


__all__ = ["ByteTokenizer", "prepare_run_dir", "train"]
