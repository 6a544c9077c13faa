"""Two processes x 4 emulated CPU devices (gloo on 127.0.0.1) train like one process x 8, and a dead peer stops the job.

Each test launches `scripts/train.py` as subprocesses, every wait bounded by a timeout, so a hang
fails the test instead of stalling CI.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from jaxbig.config import load_config
from jaxbig.train.loop import train
from jaxbig.checkpoint.run import load_params
from conftest import TINY_MODEL  # the shared tiny model and batch (tests/conftest.py)
from tests.numerics import LINEAR_SGD, assert_within, backward_chain, forward_chain, sgd_trajectory_bound, tolerance

TINY = [
    *TINY_MODEL,
    "data.val_fraction=0.2",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "train.checkpoint_every=0",
]
# SGD linear in the gradient (tests/numerics.py): the same per-device program, but gloo's all-reduce across processes
# may sum in another order than the in-process one, and Adam would turn that rounding into visible updates.
LR = 0.1
TINY += [f"optim.{k}={v}" for k, v in (LINEAR_SGD | {"learning_rate": LR}).items()]
# One of the two messages a survivor stops with (see jaxbig/parallel/distributed.py): ours, when a
# collective fails on the dead peer's closed socket; JAX's, when the coordination service notices.
PEER_LOST = re.compile(r"another process has most likely died|another task died")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(repo, run_dir, text_dir, steps: int, log_dir, *extra: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a 2-process job, 4 CPU devices each, mesh 4x2 over all 8; output to log_dir/p{i}.log."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    sets = [a for o in [*TINY, f"data.paths={text_dir}"] for a in ("--set", o)]
    port = _free_port()
    procs = []
    for i in range(2):
        args = ["--mesh", "4x2", "--run_dir", str(run_dir), "--steps", str(steps), "--no-progress", *sets]
        args += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i), *extra]
        log = open(log_dir / f"p{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "scripts/train.py", *args], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGKILL until continued on some systems
            p.kill()
            p.wait(timeout=10)


def _records(run_dir, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records}


def _losses(run_dir) -> dict[int, float]:
    return _records(run_dir, "loss")


def test_two_processes_train_like_one(repo, tmp_path, text_dir):
    """Per-step loss and final params of 2 processes x 4 devices == 1 process x 8 devices (mesh 4x2) over 20 steps,
    within float32 rounding (tests/numerics.py: the all-reduces' order may differ, SGD's drift adds up step by step)."""
    two = tmp_path / "two"
    procs = _launch(repo, two, text_dir, 20, tmp_path)
    try:
        # The one-process reference runs here meanwhile (this pytest process has 8 CPU devices).
        one = tmp_path / "one"
        cfg = load_config(None, [*TINY, f"data.paths={text_dir}", f"train.run_dir={one}", "train.steps=20", "mesh.data=4", "mesh.tensor=2"])
        train(cfg, mesh_spec="4x2", progress=False)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        _stop(procs)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert "process 1 of 2" in logs[1] and "step     20" in logs[0] and "step     20" not in logs[1]  # only process 0 reports

    ref, got = _losses(one), _losses(two)
    assert sorted(got) == list(range(1, 21))  # one line per step: process 1 wrote nothing
    assert (two / "summary.json").is_file() and (two / "config.yaml").is_file()
    model = cfg.model
    B, T = cfg.train.batch_size, cfg.data.seq_len
    n_fwd, n_bwd = forward_chain(model, B, T) + 8, backward_chain(model, B, T) + 8  # + the all-reduces over 8 devices
    grad_norm = max(_records(one, "grad_norm").values())
    _, _, p_two, step = load_params(two)
    _, _, p_one, _ = load_params(one)
    p_scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(p_one))
    for s in ref:  # step s's loss is taken at the params of s - 1 steps: |dL| <= ||g|| ||dp||
        drift = sgd_trajectory_bound(s - 1, LR, n_bwd, grad_norm, p_scale)
        assert_within(got[s], ref[s], tolerance(n_fwd, ref[s]) + grad_norm * drift, f"step {s} loss")
    # The checkpoint both processes saved together restores to the same params.
    assert step == 20
    drift = sgd_trajectory_bound(20, LR, n_bwd, grad_norm, p_scale)
    for a, b in zip(jax.tree.leaves(p_two), jax.tree.leaves(p_one)):
        assert_within(a, b, drift, "params after 20 steps")


def test_a_lost_process_stops_the_job_within_a_minute(repo, tmp_path, text_dir):
    """Process 1 of one job is killed (its sockets close); process 1 of another is frozen (a host
    that lost power or network: sockets stay open, heartbeats stop). Both jobs' process 0 must exit
    non-zero with a clear message within 60 s, not hang. The two jobs run at once to save time."""
    jobs = {"killed": signal.SIGKILL, "frozen": signal.SIGSTOP}
    procs, logs = {}, {}
    for name in jobs:
        (tmp_path / name).mkdir()
        procs[name] = _launch(repo, tmp_path / name / "run", text_dir, 10_000, tmp_path / name, "--heartbeat_timeout", "10")
        logs[name] = tmp_path / name / "p0.log"
    try:
        deadline = time.monotonic() + 240
        lost = {}
        while len(lost) < len(jobs):  # mid-run: once a job's processes have stepped together, lose its process 1
            for name, sig in jobs.items():
                if name not in lost and "step      2 " in logs[name].read_text():
                    procs[name][1].send_signal(sig)
                    lost[name] = time.monotonic()
                assert all(p.poll() is None for p in procs[name]) or name in lost, logs[name].read_text()[-3000:]
            assert time.monotonic() < deadline, "no job reached step 2 in 240 s:\n" + logs["killed"].read_text()[-3000:]
            time.sleep(0.2)
        codes, waited = {}, {}
        for name in jobs:
            codes[name] = procs[name][0].wait(timeout=max(1.0, 60 - (time.monotonic() - lost[name])))
            waited[name] = time.monotonic() - lost[name]
    finally:
        for name in jobs:
            _stop(procs[name])
    for name in jobs:
        out = logs[name].read_text()
        assert codes[name] != 0, out[-3000:]
        assert waited[name] < 60, (name, waited[name])
        assert PEER_LOST.search(out), out[-3000:]
    # A frozen peer keeps its sockets open: only the coordination service's heartbeat check can stop the job.
    assert "stopped sending heartbeats" in logs["frozen"].read_text()


# --------------------------------------------------------------------------- in-process, fast


def test_resolve_reads_flags_then_env_then_slurm():
    from jaxbig.parallel.distributed import resolve

    assert resolve(env={}) is None  # nothing set: one process
    spec = resolve("10.0.0.1:1234", 4, 2, env={"JAXBIG_PROCESS_ID": "3"})
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 4, 2)  # flags win
    spec = resolve(env={"JAXBIG_COORDINATOR": "h:1", "JAXBIG_NUM_PROCESSES": "2", "JAXBIG_PROCESS_ID": "1", "JAX_PROCESS_ID": "0"})
    assert (spec.num_processes, spec.process_id, spec.sources["process_id"]) == (2, 1, "JAXBIG_PROCESS_ID")
    spec = resolve(env={"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    assert spec.coordinator_address == "h:2"
    slurm = {"SLURM_STEP_NODELIST": "gpu[017-020,031],cpu1", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_ID": "4097"}
    spec = resolve(env=slurm)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("gpu017:61441", 8, 5)  # JAX's port rule: 4097 % 4096 + 61440
    assert resolve(env={**slurm, "JAXBIG_COORDINATOR_PORT": "7000"}).coordinator_address == "gpu017:7000"
    assert resolve(env={**slurm, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # a one-task srun step
    assert resolve(env={k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None  # salloc shell, not an srun step


def test_resolve_names_the_bad_value_and_the_fix():
    import pytest

    from jaxbig.config import ConfigError
    from jaxbig.parallel.distributed import first_slurm_host, resolve

    with pytest.raises(ConfigError, match=r"half specified: num_processes=2 \(from --num_processes\), but coordinator_address and process_id not set"):
        resolve(num_processes=2, env={})
    with pytest.raises(ConfigError, match=r"process_id=2 \(from JAXBIG_PROCESS_ID\) must be in 0..1 for num_processes=2"):
        resolve("h:1", 2, env={"JAXBIG_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match=r"num_processes='two' \(from JAXBIG_NUM_PROCESSES\) is not an integer"):
        resolve("h:1", process_id=0, env={"JAXBIG_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match=r"coordinator_address='h' \(from --coordinator_address\) must be HOST:PORT"):
        resolve("h", 2, 0, env={})
    assert first_slurm_host("node7") == "node7" and first_slurm_host("a1,a2") == "a1" and first_slurm_host("n[3-5]") == "n3"


def test_each_process_reads_the_rows_its_devices_hold():
    """On a 2-process 4x2 mesh, process 0 (devices 0-3) holds rows 0-3 of 8, process 1 rows 4-7; with the
    batch replicated over processes (tensor=8), each reads all rows, as make_array_from_process_local_data needs."""
    from jaxbig.config import MeshConfig
    from jaxbig.data.pipeline import batch_sharding, process_rows
    from jaxbig.parallel.mesh import make_mesh

    devices = jax.devices()
    halves = (devices[:4], devices[4:])  # what jax.distributed gives each of 2 processes x 4 devices
    sharding = batch_sharding(make_mesh(MeshConfig(data=4, tensor=2)), 8, 32)
    assert [process_rows(sharding, 8, h).tolist() for h in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    replicated = batch_sharding(make_mesh(MeshConfig(data=1, tensor=8)), 8, 32)
    assert [process_rows(replicated, 8, h).tolist() for h in halves] == [list(range(8))] * 2
    fsdp = batch_sharding(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 8, 32)
    assert [process_rows(fsdp, 8, h).tolist() for h in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert process_rows(sharding, 8).tolist() == list(range(8))  # one process holds everything
