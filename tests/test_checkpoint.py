"""Checkpoints: keep-last-K plus best, damaged checkpoints detected and skipped, failed saves and diverged runs
leave the last good checkpoint, and a resume onto another mesh restores the same params."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig.checkpoint import CHECKSUMS, CheckpointError, Checkpoints
from jaxbig.config import ConfigError, load_config
from jaxbig.parallel.mesh import parse_mesh_spec
from jaxbig.train.loop import train
from jaxbig.checkpoint.run import load_params
from tests.numerics import assert_close, forward_chain


def _state(v: float) -> dict:
    rng = np.random.default_rng(int(v))  # incompressible: damage lands in array data, not only in metadata
    return {"w": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)), "b": jnp.arange(8.0) * v}


def _abstract(tree):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)


def test_keeps_the_last_k_and_the_best(tmp_path):
    ck = Checkpoints(tmp_path, keep=2, say=lambda m: None)
    for step, loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0]):
        ck.save(step, _state(step), eval_loss=loss)
    ck.close()
    assert ck.manager.all_steps() == [2, 4, 5] and ck.best_step() == 2
    for step in (2, 4, 5):  # every kept step has its checksums once the saves are done
        assert (tmp_path / "checkpoints" / str(step) / CHECKSUMS).is_file()


def test_checksums_are_xxh3_and_older_sha256_steps_still_verify(tmp_path):
    """New steps record XXH3-128 digests; a step checksummed with sha256 (before) is checked with sha256; both catch a
    flipped byte that keeps the size."""
    import hashlib
    import json

    from jaxbig.checkpoint.integrity import DIGEST, verify, write_checksums

    (tmp_path / "state").mkdir()
    for i in range(3):
        (tmp_path / "state" / f"f{i}").write_bytes(np.random.default_rng(i).bytes(100_000 + i))
    write_checksums(tmp_path)
    sums = json.loads((tmp_path / CHECKSUMS).read_text())
    assert set(sums) == {"state/f0", "state/f1", "state/f2"} and all(DIGEST in v and "sha256" not in v for v in sums.values())
    assert verify(tmp_path) is None
    old = {rel: {"bytes": v["bytes"], "sha256": hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()} for rel, v in sums.items()}
    (tmp_path / CHECKSUMS).write_text(json.dumps(old))
    assert verify(tmp_path) is None
    for algorithm, sums_now in (("sha256", old), (DIGEST, None)):
        if sums_now is None:
            write_checksums(tmp_path)
        data = bytearray((tmp_path / "state" / "f1").read_bytes())
        data[500] ^= 0x01
        (tmp_path / "state" / "f1").write_bytes(bytes(data))
        assert verify(tmp_path) == f"state/f1 does not match its {algorithm} (corrupted)"
        data[500] ^= 0x01
        (tmp_path / "state" / "f1").write_bytes(bytes(data))


def _largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "_METADATA" not in p.name and p.suffix != ".json"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "truncate_metadata_without_checksums"])
def test_a_damaged_newest_checkpoint_is_reported_moved_aside_and_skipped(tmp_path, damage):
    ck = Checkpoints(tmp_path, keep=3, say=lambda m: None)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    ck.close()
    step_dir = tmp_path / "checkpoints" / "2"
    victim = _largest_array_file(step_dir)
    if damage == "flip_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete":
        victim.unlink()
    else:  # killed before its checksums were written, then damaged: the restore itself fails
        (step_dir / CHECKSUMS).unlink()
        meta = step_dir / "state" / "_METADATA"
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    said = []
    ck = Checkpoints(tmp_path, keep=3, say=said.append)
    step, state = ck.restore_latest(_abstract(_state(0.0)))
    assert step == 1
    np.testing.assert_array_equal(state["w"], _state(1.0)["w"])
    assert len(said) == 1 and "checkpoint at step 2 is unusable" in said[0] and "falling back" in said[0]
    moved = list((tmp_path / "corrupted_checkpoints").glob("2-*"))
    assert len(moved) == 1 and not step_dir.exists()  # kept for inspection, out of the manager's way
    assert ck.manager.all_steps() == [1]
    ck.save(2, _state(2.5))  # the step can be written again
    ck.close()


def test_an_intact_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    ck.save(1, _state(1.0))
    ck.close()
    other = _abstract({"w": jnp.zeros((32, 64)), "b": jnp.zeros(8)})
    ck = Checkpoints(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match="intact but does not fit this run"):
        ck.restore_latest(other)
    ck.close()
    assert (tmp_path / "checkpoints" / "1").is_dir()


# --- the loop -------------------------------------------------------------------------------------


def _cfg(tiny_overrides, run_dir, text_dir, *extra):
    mine = {e.split("=")[0] for e in extra}
    base = [o for o in tiny_overrides if o.split("=")[0] not in mine]
    return load_config(None, base + [f"train.run_dir={run_dir}", f"data.paths={text_dir}", "data.val_fraction=0.2", *extra])


def _losses(run_dir) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; a re-run's record of a step replaces the earlier one."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_corrupted_newest_checkpoint_falls_back_and_the_run_resumes_exactly(tmp_path, tiny_overrides, text_dir, capsys):
    run_dir = tmp_path / "r"
    cfg = _cfg(tiny_overrides, run_dir, text_dir, "train.steps=10", "train.checkpoint_every=5", "train.log_every=1", "mesh.data=4", "mesh.tensor=2")
    train(cfg, progress=False)
    reference = _losses(run_dir)
    victim = _largest_array_file(run_dir / "checkpoints" / "10")
    victim.write_bytes(victim.read_bytes()[:-100])
    capsys.readouterr()
    summary = train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "checkpoint at step 10 is unusable" in out and "truncated" in out
    assert summary["start_step"] == 5
    resumed = _losses(run_dir)
    assert [resumed[s] for s in range(6, 11)] == [reference[s] for s in range(6, 11)]  # bit for bit
    assert len(list((run_dir / "corrupted_checkpoints").iterdir())) == 1


DIVERGE = ["optim.optimizer=sgd", "optim.learning_rate=1000", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.schedule=constant", "mesh.data=1"]


def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_overrides, text_dir):
    run_dir = tmp_path / "r"
    cfg = _cfg(tiny_overrides, run_dir, text_dir, "train.steps=30", "train.checkpoint_every=2", "train.log_every=1", *DIVERGE)
    with pytest.raises(FloatingPointError, match=r"at step (\d+); stopping. The last checkpoint, step (\d+), is good") as e:
        train(cfg, mesh_spec="1x1", progress=False)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    _, _, params, step = load_params(run_dir)
    assert step < bad_step and step % 2 == 0
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))

    skipping = _cfg(tiny_overrides, tmp_path / "s", text_dir, "train.steps=8", "train.skip_nonfinite=true", *DIVERGE)
    summary = train(skipping, mesh_spec="1x1", progress=False)
    assert summary["skipped_steps"] >= 1 and summary["steps"] == 8
    _, _, params, _ = load_params(tmp_path / "s")
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_an_unwritable_run_dir_is_refused(tmp_path, tiny_overrides, text_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run_dir .*file/run' is not writable .*choose a writable --run_dir"):
        train(_cfg(tiny_overrides, blocker / "run", text_dir, "train.steps=10"), progress=False)


FULL_DISK = """
import resource, signal, sys, runpy
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_save_that_fails_on_a_full_disk_says_so_and_keeps_earlier_checkpoints(tmp_path, tiny_overrides, text_dir, repo):
    run_dir = tmp_path / "r"
    args = [str(repo / "scripts" / "train.py"), "--run_dir", str(run_dir), "--steps", "6", "--mesh", "4x2", "--no-progress"]
    extra = [f"data.paths={text_dir}", "data.val_fraction=0.2", "train.checkpoint_every=3", "optim.warmup_steps=2"]
    args += [f"--set={o}" for o in tiny_overrides if not o.startswith("optim.warmup_steps")] + [f"--set={o}" for o in extra]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    first = subprocess.run([sys.executable, *args[:4], "3", *args[5:]], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    limited = subprocess.run([sys.executable, "-c", FULL_DISK, "40000", *args], capture_output=True, text=True, env=env, timeout=300)
    assert limited.returncode == 1, limited.stderr[-3000:]
    assert "saving the checkpoint at step 6" in limited.stderr and "latest complete: step 3" in limited.stderr, limited.stderr[-3000:]
    assert "error: saving the checkpoint at step 6" in limited.stderr, limited.stderr[-1500:]  # among orbax's own traces
    # Nothing earlier was damaged: the same command without the limit resumes from step 3.
    again = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["start_step"] == 3


@pytest.mark.parametrize("mesh", ["data=2,tensor=2,pipeline=2", "1x1"])
def test_a_checkpoint_saved_on_4x2_resumes_on_another_mesh(tmp_path, tiny_overrides, text_dir, mesh):
    """Two independent runs (same seed and config) saved on data 4 x tensor 2 at step 4; one resumes on the saving mesh,
    the other on 2x2x2 or one device: the same params at the restore point, the same next-step loss."""

    def cfg(run_dir, spec):
        axes = [f"mesh.{k}={v}" for k, v in parse_mesh_spec(spec).items()]
        return _cfg(tiny_overrides, run_dir, text_dir, "train.steps=5", "train.checkpoint_every=4", "train.log_every=1", *axes)

    ref, other = tmp_path / "ref", tmp_path / "other"
    for run_dir in (ref, other):  # nothing shared between the two but the seed and the config
        train(cfg(run_dir, "4x2"), mesh_spec="4x2", progress=False, stop_after=4)
    train(cfg(ref, "4x2"), mesh_spec="4x2", progress=False)  # step 5 on the saving mesh
    summary = train(cfg(other, mesh), mesh_spec=mesh, progress=False)
    assert summary["start_step"] == 4
    # One compiled program run twice on the same inputs (tests/numerics.py): bit for bit.
    _, _, saved, _ = load_params(ref, step=4)
    _, _, restored, _ = load_params(other, step=4)
    jax.tree.map(np.testing.assert_array_equal, saved, restored)
    a, b = _losses(ref)[5], _losses(other)[5]
    # The inputs are identical; another mesh is another program, which sums in another order (tests/numerics.py).
    c = cfg(ref, "4x2")
    assert_close(b, a, forward_chain(c.model, c.train.batch_size, c.data.seq_len) + 8, err_msg="step 5 loss")


def test_checkpoints_of_the_earlier_layout_still_restore(tmp_path):
    """Runs saved before the data iterator joined the checkpoint hold the state as orbax's `default` item."""
    import orbax.checkpoint as ocp

    from jaxbig.checkpoint import checkpoint_manager

    old = checkpoint_manager(tmp_path, keep=2)
    old.save(7, args=ocp.args.StandardSave(_state(7.0)))
    old.wait_until_finished()
    old.close()
    ck = Checkpoints(tmp_path, keep=2)
    step, state = ck.restore_latest(_abstract(_state(0.0)))
    ck.close()
    assert step == 7
    np.testing.assert_array_equal(state["w"], _state(7.0)["w"])
