"""kill -9 at any moment, re-run the same command: the run continues bit for bit as if never interrupted.

The run reads packed rows from prepared shards through grain worker processes, so the data
position that must survive is the iterator's state in the checkpoint, not just the step.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

STEPS = 12


@pytest.fixture(scope="module")
def command(repo, prepared_dir, tiny_overrides):
    def make(run_dir) -> list[str]:
        sets = tiny_overrides + [
            f"data.prepared={prepared_dir}",
            "data.workers=2",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.eval_every=100",
        ]
        return [sys.executable, str(repo / "scripts" / "train.py"), "--mesh", "4x2", "--steps", str(STEPS), "--run_dir", str(run_dir), "--no-progress"] + [
            f"--set={s}" for s in sets
        ]

    return make


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _losses(run_dir) -> dict[int, float]:
    """Per-step training losses; a re-run's record of a step replaces the killed run's."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(command(run_dir), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _kill_when(cmd, should_kill) -> subprocess.Popen:
    """Starts `cmd` in its own process group and SIGKILLs the group (trainer and grain workers) when `should_kill(line)`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if should_kill(line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    return proc


def _resume_and_compare(cmd, run_dir, reference) -> int:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    start = json.loads((run_dir / "summary.json").read_text())["start_step"]
    resumed = _losses(run_dir)
    for step in range(start + 1, STEPS + 1):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]!r} != {reference[step]!r} (resumed from {start})"
    return start


def test_sigkill_at_a_random_step_then_rerun_matches_the_uninterrupted_run(command, reference, tmp_path):
    kill_at = random.Random().randint(2, STEPS - 2)
    run_dir = tmp_path / "run"
    proc = _kill_when(command(run_dir), lambda line: line.startswith(f"step {kill_at:>6d} |"))
    assert proc.returncode == -signal.SIGKILL, f"not killed at step {kill_at}"
    start = _resume_and_compare(command(run_dir), run_dir, reference)
    assert start <= kill_at and start % 3 == 0, (start, kill_at)


def test_sigkill_while_an_async_save_is_in_flight(command, reference, tmp_path):
    """Killed while orbax is still writing a checkpoint: that one never counts, the previous one does."""
    for attempt in range(3):  # a save of this tiny model takes milliseconds; watch closely, retry if it was missed
        run_dir = tmp_path / f"run{attempt}"
        ckpt_dir = run_dir / "checkpoints"
        proc = subprocess.Popen(command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
        in_flight = None
        while proc.poll() is None and in_flight is None:
            names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
            tmp = [n for n in names if "orbax-checkpoint-tmp" in n and not n.startswith(("3.", "3-"))]  # not the first save
            if tmp:
                os.killpg(proc.pid, signal.SIGKILL)
                in_flight = tmp[0]
            else:
                time.sleep(0.0005)
        proc.wait(timeout=60)
        if in_flight is not None and (ckpt_dir / in_flight).exists():  # killed mid-write: the half checkpoint is on disk
            break
    else:
        pytest.fail("three runs finished or committed their saves before the kill landed")
    interrupted_step = int(in_flight.split(".")[0])
    start = _resume_and_compare(command(run_dir), run_dir, reference)
    assert start < interrupted_step, (start, in_flight)
