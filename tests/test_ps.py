"""The parameter server (optim.outer=async_ps) on a real local Ray cluster: no mocks.

One Ray cluster serves the module (a private temp dir, 4 logical CPUs); each run starts its own server and
worker actors in processes of their own, each worker with its own emulated CPU devices.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY
from jaxbig.config import ConfigError, load_config
from jaxbig.optim.local_sgd import delayed_nesterov
from jaxbig.optim.push_compression import PushCodec

ray = pytest.importorskip("ray")
# Ray starts its processes with fork + exec, which runs no Python in the child; JAX's at-fork hook warns anyway.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="jaxbig-test-ray-")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cfg(text_dir, run_dir, *sets):
    """TINY as a parameter-server run; `sets` override its entries."""
    base = [*TINY, f"data.paths={text_dir}", f"train.run_dir={run_dir}", "mesh.data=1", "optim.outer=async_ps", "train.eval_every=1000"]
    keys = {s.split("=", 1)[0] for s in sets}
    return load_config(None, [*(b for b in base if b.split("=", 1)[0] not in keys), *sets])


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the pieces, no Ray


def test_delayed_nesterov_with_delay_one_is_nesterov_sgd():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    dn, ref = delayed_nesterov(0.7, 0.9, 1), optax.sgd(0.7, momentum=0.9, nesterov=True)
    s_dn, s_ref = dn.init(params), ref.init(params)
    for _ in range(4):
        g = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
        u_dn, s_dn = dn.update(g, s_dn)
        u_ref, s_ref = ref.update(g, s_ref)
        # Same operations in another association: a few float32 ulps of values ~1.
        np.testing.assert_allclose(u_dn["w"], u_ref["w"], rtol=1e-6, atol=1e-6)


def test_delayed_nesterov_folds_momentum_every_n_pushes():
    """Liu et al.'s Algorithm 3 (c = 0) by hand: each push steps by lr·Δ/N, every N-th also by lr·β·m."""
    params = {"w": jnp.zeros(2)}
    dn = delayed_nesterov(1.0, 0.5, 2)
    state = dn.init(params)
    u1, state = dn.update({"w": jnp.ones(2)}, state)
    np.testing.assert_array_equal(u1["w"], -0.5)  # push 1: the gradient term only, 1/N of it
    np.testing.assert_array_equal(state.momentum["w"], 0.0)
    u2, state = dn.update({"w": 3 * jnp.ones(2)}, state)
    # push 2 completes N=2: m = 0.5·0 + (1+3)/2 = 2; update = -(3/2 + 0.5·2) = -2.5
    np.testing.assert_array_equal(state.momentum["w"], 2.0)
    np.testing.assert_array_equal(u2["w"], -2.5)


def test_delayed_nesterov_over_n_pushes_is_one_nesterov_step_on_their_mean():
    """N pushes (one per worker, as a synchronous round delivers them) move θ as synchronous DiLoCo's outer step:
    Nesterov SGD on the mean pseudo-gradient (the paper's footnote 5). A DN that applied each whole Δ would move
    N times too far and fails this."""
    rng = np.random.default_rng(1)
    N = 3
    params = {"w": jnp.zeros((4, 5), jnp.float32)}
    dn, ref = delayed_nesterov(0.7, 0.9, N), optax.sgd(0.7, momentum=0.9, nesterov=True)
    s_dn, s_ref = dn.init(params), ref.init(params)
    for _ in range(4):
        deltas = [{"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)} for _ in range(N)]
        moved = jnp.zeros((4, 5), jnp.float32)
        for d in deltas:
            u, s_dn = dn.update(d, s_dn)
            moved = moved + u["w"]
        u_ref, s_ref = ref.update({"w": sum(d["w"] for d in deltas) / N}, s_ref)
        # The same sums in another association over values ~1 (momentum up to ~3): a few float32 ulps each.
        np.testing.assert_allclose(moved, u_ref["w"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "topk", "powersgd", "bf16"])
def test_push_codec_error_feedback_sends_everything_eventually(method):
    """With error feedback, what was decoded over k pushes plus the residual is exactly what was pushed."""
    from jaxbig.optim.compression import MatrixView

    shapes = {"a/w": (64, 48), "b": (300,)}
    views = {"a/w": MatrixView(rows=(0,), cols=(1,)), "b": None}
    codec = PushCodec(method, shapes, fraction=0.05, rank=2, views=views)
    state = codec.init()
    rng = np.random.default_rng(1)
    pushed = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    got = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    for _ in range(3):
        update = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        payload, state = codec.encode(update, state)
        for n, v in codec.decode(payload).items():
            got[n] += np.asarray(v)
            pushed[n] += update[n]
    assert codec.nbytes(payload) < sum(4 * np.prod(s) for s in shapes.values())  # fewer bytes than float32
    for n in shapes:
        # Sums of 3 values ~N(0,1) and their float32 re-additions: a few ulps of numbers < 10.
        np.testing.assert_allclose(got[n] + np.asarray(state.residual[n]), pushed[n], atol=1e-5)


def _server_pushes(cfg, shapes, steps: int = 3, workers: int = 1):
    """`steps` rounds of int8-coded random gradients from `workers` workers, as the worker would send them."""
    from jaxbig.ps.setup import push_codec

    codec, rng = push_codec(cfg), np.random.default_rng(2)
    states = [codec.init() for _ in range(workers)]
    rounds = []
    for _ in range(steps):
        pushes = []
        for w in range(workers):
            payload, states[w] = codec.encode({n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}, states[w])
            pushes.append(payload)
        rounds.append(pushes)
    return rounds, codec


def test_server_shards_and_synchronous_rounds_change_no_number(text_dir, tmp_path):
    """The server's logic in-process (ServerShard is a plain class Ray wraps): params split over 3 shards end where
    1 shard ends; a synchronous round of 2 pushes applies their mean once; a retried push is applied once.

    The shards run the same elementwise AdamW as separately compiled programs: a few float32 roundings of params
    ~0.1 per step, so 1e-6 absolute, against updates of ~1e-3 (lr 3e-3 after warm-up).
    """
    from jaxbig.ps.groups import shard_groups
    from jaxbig.ps.server import ServerShard
    from jaxbig.ps.setup import param_shapes

    cfg = _cfg(text_dir, tmp_path, "optim.compression=int8", "optim.warmup_steps=0", "ps.workers=1")
    shapes = param_shapes(cfg)
    params = {n: (0.1 * np.random.default_rng(1).normal(size=s)).astype(np.float32) for n, s in shapes.items()}
    rounds, codec = _server_pushes(cfg, shapes)
    whole = ServerShard(cfg, params)
    groups = shard_groups(shapes, 3)
    shards = [ServerShard(cfg, {n: params[n] for n in g}) for g in groups]
    for clock, (payload,) in enumerate(rounds):
        assert whole.push(0, clock, payload) == (clock, clock + 1)
        for shard, g in zip(shards, groups):
            shard.push(0, clock, {n: payload[n] for n in g})
    assert whole.push(0, 2, rounds[2][0]) == (2, 3)  # the same round again (a retry): not applied twice
    version, ref = whole.pull()
    split = {n: v for shard in shards for n, v in shard.pull()[1].items()}
    assert version == 3 and sorted(split) == sorted(ref)
    for n in ref:
        np.testing.assert_allclose(split[n], ref[n], rtol=0, atol=1e-6)
    assert max(np.abs(ref[n] - params[n]).max() for n in ref) > 1e-3  # they did move

    # SGD here: AdamW's first update would not tell a mean from a sum (it is invariant to the gradient's scale).
    sgd = ("optim.optimizer=sgd", "optim.weight_decay=0", "optim.warmup_steps=0")
    sync = _cfg(text_dir, tmp_path, *sgd, "optim.compression=int8", "ps.workers=2", "ps.max_staleness=0", "train.steps=300")
    pairs, _ = _server_pushes(sync, shapes, steps=1, workers=2)
    exact = _cfg(text_dir, tmp_path, *sgd, "ps.workers=1", "train.steps=150")  # the same schedule: 300 / 2 updates
    rounds_server, mean_server = ServerShard(sync, params), ServerShard(exact, params)
    assert rounds_server.push(0, 0, pairs[0][0]) == (0, 0)  # half a round: nothing applied yet
    assert rounds_server.push(1, 0, pairs[0][1]) == (0, 1)
    decoded = [codec.decode(p) for p in pairs[0]]
    mean = {n: (np.asarray(decoded[0][n]) + np.asarray(decoded[1][n])) / 2 for n in shapes}
    mean_server.push(0, 0, {n: (v,) for n, v in mean.items()})  # pushes without compression are the float32 arrays
    got, want = rounds_server.pull()[1], mean_server.pull()[1]
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=1e-6)


def test_bad_input_fails_in_one_line_before_anything_starts(text_dir, tmp_path):
    from jaxbig.ps.cluster import check_address
    from jaxbig.ps.driver import train_ps

    errors = []
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.outer=async_ps", "ps.max_staleness=-1"])
    errors.append(str(e.value))
    assert "ps.max_staleness=-1" in errors[-1]
    run_dir = tmp_path / "never"
    with pytest.raises(ConfigError) as e:  # 9 x 1 devices on a host of 8
        train_ps(_cfg(text_dir, run_dir, "ps.workers=9"), progress=False)
    errors.append(str(e.value))
    assert "ps.workers=9" in errors[-1] and "8" in errors[-1]
    with pytest.raises(ConfigError) as e:  # tensor=4 in a worker of 2 devices
        train_ps(_cfg(text_dir, run_dir, "ps.devices_per_worker=2", "mesh.tensor=4"), progress=False)
    errors.append(str(e.value))
    assert "ps.devices_per_worker=2" in errors[-1]
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError) as e:
        train_ps(_cfg(text_dir, run_dir), ray_address=f"127.0.0.1:{port}", progress=False)
    errors.append(str(e.value))
    assert f"127.0.0.1:{port} is not reachable" in errors[-1]
    with pytest.raises(ConfigError):
        check_address("nohostport")
    assert all("\n" not in m for m in errors), errors
    assert not run_dir.exists()  # nothing was written


# --------------------------------------------------------------------------- on Ray


def test_one_worker_without_staleness_matches_the_synchronous_run(cluster, text_dir, tmp_path):
    """ps.workers=1 (a 2-device tensor-parallel worker), ps.max_staleness=0, the params split over 2 server shards:
    per-step losses equal jaxbig's synchronous loop's on the same 2-device mesh within 1e-5.

    Same seed, same batches, same optimizer; the worker's gradient program and the server's update program are
    compiled apart from the fused train step, so XLA may associate float32 sums differently. With SGD an update
    is lr·g, so a relative gradient difference of a few float32 ulps (~1e-7·|g|) moves each param by ~1e-7·lr·|g|
    and the loss by far less than 1e-6 over these steps (loss ~5.5, whose own rounding is ~5.5·6e-8·log2(B·T·V)
    ≈ 6e-6 at most); 1e-5 is the issue's bound and sits above both. Measured here: identical (difference 0.0).
    """
    from jaxbig.ps.driver import train_ps
    from jaxbig.train.loop import train

    # The worker is itself a mesh: 2 devices, tensor-parallel, laid out as the synchronous run lays out its 2.
    sets = ["optim.optimizer=sgd", "optim.learning_rate=0.5", "optim.weight_decay=0", "train.log_every=1", "train.steps=6", "mesh.tensor=2"]
    sync = load_config(None, [*TINY, f"data.paths={text_dir}", f"train.run_dir={tmp_path / 'sync'}", "mesh.data=1", "train.eval_every=1000", *sets])
    train(sync, progress=False)
    ps = _cfg(text_dir, tmp_path / "ps", *sets, "ps.workers=1", "ps.max_staleness=0", "ps.devices_per_worker=2", "ps.num_server_shards=2")
    summary = train_ps(ps, progress=False)
    sync_losses = {r["step"]: r["loss"] for r in _records(tmp_path / "sync") if "loss" in r}
    ps_losses = {r["step"]: r["loss"] for r in _records(tmp_path / "ps") if "loss" in r}
    assert sorted(ps_losses) == sorted(sync_losses) == list(range(1, 7))
    np.testing.assert_allclose([ps_losses[s] for s in range(1, 7)], [sync_losses[s] for s in range(1, 7)], rtol=0, atol=1e-5)
    assert summary["version"] == 6 and summary["staleness_max"] == 0
    sync_summary = json.loads((tmp_path / "sync" / "summary.json").read_text())
    assert abs(summary["final_eval_loss"] - sync_summary["final_eval_loss"]) < 1e-5


def test_async_local_sgd_survives_a_killed_worker_and_a_stopped_driver(cluster, text_dir, tmp_path):
    """Async local SGD, 2 workers (one 2x slower), staleness bound 1, int8 pushes.

    The first driver run has worker 0 killed with SIGKILL mid-run and stops after the checkpoint at step 12
    (as if the driver were killed there); the same call again resumes from it and finishes.
    """
    from jaxbig.ps.driver import WORKERS_FILE, train_ps

    run_dir = tmp_path / "run"
    cfg = _cfg(
        text_dir, run_dir, "ps.algorithm=async_local_sgd", "ps.workers=2", "ps.local_steps=4", "ps.worker_slowdown=1,2",
        "ps.max_staleness=1", "optim.compression=int8", "optim.outer_learning_rate=0.7",
        "optim.outer_momentum=0.5", "train.steps=24", "train.checkpoint_every=12", "train.log_every=2",
    )  # fmt: skip
    killed = []

    def kill_worker_mid_run():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            metrics = run_dir / "metrics.jsonl"
            if (run_dir / WORKERS_FILE).exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
                pid = json.loads((run_dir / WORKERS_FILE).read_text())["0"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)

    thread = threading.Thread(target=kill_worker_mid_run, daemon=True)
    thread.start()
    first = train_ps(cfg, progress=False, stop_after=12)
    thread.join(timeout=5)
    assert killed, "the run ended before the worker could be killed"
    assert first["worker_restarts"] >= 1 and 12 <= first["steps"] < 24
    assert json.loads((run_dir / WORKERS_FILE).read_text())["0"] != killed[0]  # a new process took its place

    second = train_ps(cfg, progress=False)
    assert second["start_step"] == first["steps"]  # resumed from the checkpoint the first driver left
    assert second["steps"] == 24 and sum(second["positions"]) == 24  # every batch read once, by position
    assert second["version"] > first["version"]
    records = [r for r in _records(run_dir) if "pushes" in r]
    assert max(r["clock_gap_max"] for r in records) <= 1  # SSP: no round started more than 1 ahead of the slowest
    assert max(r["staleness_max"] for r in records) >= 1  # the fast worker did run ahead
    # int8 pushes: 1 byte per entry + 4 bytes of scale per 256 (padded per tensor), against 4 bytes per float32.
    pushed = sum(r["bytes_pushed"] for r in records) / sum(r["pushes"] for r in records)
    assert pushed < 0.3 * 4 * cfg.model.num_params()
    assert np.isfinite(second["final_eval_loss"]) and second["final_eval_loss"] < first["initial_eval_loss"] - 0.3


def test_driver_killed_with_sigkill_resumes_when_the_same_command_runs_again(cluster, text_dir, tmp_path, repo):
    """`scripts/train.py` as a user runs it, joined to this module's cluster (`--ray_address`): the driver process is
    killed with SIGKILL once its first checkpoint is committed, and the same command run again resumes from the
    newest checkpoint and finishes, every batch read once (by position). Ray reaps the dead driver's actors itself."""
    run_dir = tmp_path / "run"
    sets = [
        *TINY, f"data.paths={text_dir}", "mesh.data=1", "optim.outer=async_ps", "train.eval_every=1000",
        "ps.algorithm=async_local_sgd", "ps.workers=2", "ps.local_steps=4", "ps.worker_slowdown=1,2",
        "train.steps=24", "train.checkpoint_every=8", "train.log_every=4",
    ]  # fmt: skip
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "scripts/train.py", "--no-progress", "--run_dir", str(run_dir), "--ray_address", address]
    command += [f"--set={s}" for s in sets]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}  # the script sets its devices

    def committed() -> list[int]:  # orbax renames a step's directory into place once it is complete
        ckpt = run_dir / "checkpoints"
        return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []

    log = tmp_path / "first.log"  # a file, not a pipe: a pipe nobody reads fills up and blocks the driver
    with open(log, "w") as out:
        first = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not committed() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, f"the driver ended before its first checkpoint:\n{log.read_text()[-2000:]}"
    assert committed(), "no checkpoint within 600 s"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    latest = committed()[-1]
    assert latest < 24 and not (run_dir / "summary.json").exists()  # killed mid-run, before its summary

    second = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == latest  # resumed from the newest checkpoint the killed driver left
    assert summary["steps"] == 24 and sum(summary["positions"]) == 24  # every batch read once, by position
    assert f"resuming at step {latest}" in second.stdout + second.stderr


def test_fault_benchmark_kills_a_worker_per_seed_and_reports_the_difference(cluster, text_dir, tmp_path):
    """`bench.py --ps --faults` on TINY: one seed, an uninterrupted run and one whose worker 0 is SIGKILLed at half
    the budget; both must finish the budget, the killed one with a restart. The report's verdict is the mean
    difference against the 3% bound: shown both ways by moving the killed run's loss across it."""
    from benchmarks import ps as bench_ps

    extra = [*TINY, f"data.paths={text_dir}", "ps.workers=2", "ps.worker_slowdown=1,2", "ps.local_steps=2", "ps.max_staleness=1"]
    rows = bench_ps.faults(None, 12, 1, [0], tmp_path, extra)
    (row,) = rows
    assert row["killed_at"] >= 6 and row["killed"]["worker_restarts"] >= 1 and row["uninterrupted"]["worker_restarts"] == 0
    assert row["killed"]["steps"] == row["uninterrupted"]["steps"] == 12
    assert json.loads((tmp_path / "seed0-killed" / "ps_workers.json").read_text())["0"] != row["killed_pid"]  # a new process
    whole = row["uninterrupted"]["final_eval_loss"]
    for factor, verdict in ((1.02, "**met**"), (1.04, "**missed**")):
        row["killed"] = {**row["killed"], "final_eval_loss": whole * factor}
        text = bench_ps.report_faults(rows, command="test", load=(0.0, 0.0))
        assert f"{verdict} on the mean over 1 seeds ({(factor - 1) * 100:+.1f}%)" in text, text


def test_ps_benchmark_reuses_only_finished_runs_of_the_same_config(text_dir, tmp_path):
    """`bench.py --ps --variants local` trains only the local-SGD rows; a row it reuses must have a finished run of
    exactly its config (else a one-line error names it before anything trains), and the report says which rows
    were reused. With every row finished and none selected, nothing trains."""
    from benchmarks import ps as bench_ps

    extra = [*TINY, f"data.paths={text_dir}"]
    with pytest.raises(ConfigError, match=r"'sync \(max_staleness=0\)' has no finished run of this config"):
        bench_ps.run(None, 12, 1, tmp_path, extra, only=["local"])
    for i, (name, sets) in enumerate(bench_ps.VARIANTS.items()):
        cfg = load_config(None, bench_ps._overrides([*bench_ps.COMMON, *sets, "train.steps=12", "train.eval_every=1", "train.log_every=1", f"train.run_dir={tmp_path / str(i)}"], extra))
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.yaml").write_text(cfg.to_yaml())
        summary = {"version": 4, "wall_s": 9.0, "rounds_start_s": 1.0, "final_eval_loss": 3.0 + i / 100, "evals": [[12, 8.0 + i, 3.0 + i / 100]], "staleness_mean": 0.5, "staleness_max": 1, "worker_restarts": 0}
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(summary))
    results = bench_ps.run(None, 12, 1, tmp_path, extra, only=["no such variant"])
    assert list(results) == list(bench_ps.VARIANTS) and all(r["reused"] for r in results.values())
    text = bench_ps.report(results, command="test", load=(0.0, 0.0))
    assert "Rows from an earlier run of the same command and config" in text and "| 3.0300 | +1.0% |" in text
    assert "\n  steps: 12\n" in cfg.to_yaml()
    (tmp_path / "0" / "config.yaml").write_text(cfg.to_yaml().replace("\n  steps: 12\n", "\n  steps: 13\n"))  # another budget
    with pytest.raises(ConfigError, match="has no finished run of this config"):
        bench_ps.run(None, 12, 1, tmp_path, extra, only=["local"])
