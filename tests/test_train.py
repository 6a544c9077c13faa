"""The loop end to end: loss falls, metrics land in JSONL and TensorBoard, resume is exact, sampling works."""

import dataclasses
import json

import numpy as np
import pytest

from jaxbig.config import ConfigError, load_config
from jaxbig.train.loop import train
from jaxbig.checkpoint.run import load_params
from conftest import TINY_MODEL  # the shared tiny model and batch (tests/conftest.py)
from tests.numerics import assert_close, forward_chain

SMALL = [
    *TINY_MODEL,
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "optim.warmup_steps=5",
]


def _cfg(run_dir, text_dir, *extra):
    return load_config(None, SMALL + [f"train.run_dir={run_dir}", f"data.paths={text_dir}", "data.val_fraction=0.2", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dir):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    cfg = _cfg(run_dir, text_dir, "train.steps=20", "train.checkpoint_every=10", "mesh.data=4", "mesh.tensor=2")
    return run_dir, cfg, train(cfg, mesh_spec="4x2", progress=False)


def test_loss_falls_and_metrics_are_written(trained):
    run_dir, cfg, summary = trained
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert {"step", "loss", "tokens_per_sec", "mfu", "lr", "grad_norm"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert "eval_loss" in records[1] and "eval_loss" in records[3] and "eval_loss" not in records[0]
    # where each interval's time went, and the process's memory (XLA:CPU reports no device memory: RSS only)
    times = ("time/compute_s", "time/data_wait_s", "time/eval_s", "time/checkpoint_s")
    for r in records[1:]:  # the first record's interval starts after the first (compiling) step: 5 steps less one
        assert all(r[k] >= 0 for k in times) and r["time/compute_s"] > 0 and r["memory/host_rss_bytes"] > 1 << 20
    assert records[0]["time/eval_s"] == 0 and records[1]["time/eval_s"] > 0  # the eval at step 10
    assert records[1]["time/checkpoint_s"] == 0 and records[2]["time/checkpoint_s"] > 0  # the save after step 10's record
    # the step time is its parts: compute + data wait = the interval's steps at the measured rate
    r = records[2]
    np.testing.assert_allclose(r["time/compute_s"] + r["time/data_wait_s"], 5 * cfg.train.batch_size * cfg.data.seq_len / r["tokens_per_sec"], rtol=1e-6)
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and {*times, "memory/host_rss_bytes", "loss", "eval_loss"} <= _tensorboard_tags(events[0])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()


def _tensorboard_tags(path) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, its CRC, an Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, tags, i = path.read_bytes(), set(), 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "little")
        tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12 : i + 12 + n]).summary.value}
        i += n + 16
    return tags


def test_resume_is_exact(trained, tmp_path, text_dir):
    """Train 10 steps, stop, re-run the same command to 20: same params as the uninterrupted run."""
    ref_dir, _, _ = trained
    run_dir = tmp_path / "r"
    cfg = _cfg(run_dir, text_dir, "train.steps=20", "train.checkpoint_every=10", "mesh.data=4", "mesh.tensor=2")
    train(cfg, progress=False, stop_after=10)
    summary = train(cfg, progress=False)
    assert summary["start_step"] == 10
    _, _, ref, _ = load_params(ref_dir)
    _, _, got, step = load_params(run_dir)
    assert step == 20
    for a, b in zip(__import__("jax").tree.leaves(ref), __import__("jax").tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_rerun_of_a_finished_run_does_nothing(trained):
    run_dir, cfg, _ = trained
    summary = train(cfg, progress=False)
    assert summary["start_step"] == 20 and "initial_eval_loss" not in summary
    # How the model is computed may change between runs; its params may not (next test).
    faster = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="full", scan_layers=False, attention="dot_product", dtype="float32"))
    # The same params, evaluated by another program (tests/numerics.py).
    n = forward_chain(cfg.model, cfg.train.batch_size, cfg.data.seq_len) + cfg.train.eval_batches
    assert_close(train(faster, progress=False)["final_eval_loss"], summary["final_eval_loss"], n, err_msg="eval loss")


def test_a_different_model_in_the_same_run_dir_is_refused(trained, text_dir):
    run_dir, _, _ = trained
    cfg = load_config(None, [o.replace("num_layers=2", "num_layers=3") for o in SMALL] + [f"train.run_dir={run_dir}", f"data.paths={text_dir}"])
    with pytest.raises(ConfigError, match=r"different model \(changed: model.num_layers 2 -> 3\).*--fresh"):
        train(cfg, progress=False)


def test_sample_text(trained):
    from jaxbig.sample import sample_text

    run_dir, _, _ = trained
    text = sample_text(run_dir, "def ", max_new_tokens=16, temperature=0.8, top_k=10, seed=1)
    assert isinstance(text, str) and len(text) > 0
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=64"):
        sample_text(run_dir, "def ", max_new_tokens=100)
    with pytest.raises(ConfigError, match="no checkpoint at step 7"):
        sample_text(run_dir, "def ", step=7)


@pytest.mark.parametrize("mesh", ["fsdp=8", "2x2x2"])
def test_init_from_starts_from_the_run_on_another_mesh(trained, tmp_path, text_dir, mesh):
    """`train.init_from` (fine-tuning): a new run on an FSDP or pipeline mesh starts from the trained run's params
    (its first evaluation equals the source's last, up to float32 rounding between the two meshes' programs) with a
    fresh optimizer state, and resumes from its own checkpoints afterwards, not from the source again."""
    from jaxbig.cli import init_model_fields
    from jaxbig.parallel.mesh import parse_mesh_spec

    src, src_cfg, src_summary = trained
    mesh_set = [f"mesh.{k}={v}" for k, v in parse_mesh_spec(mesh).items()]
    run_dir = tmp_path / "ft"
    overrides = ["train.batch_size=8", "data.seq_len=32", "train.eval_batches=2", "optim.warmup_steps=1", f"train.run_dir={run_dir}",
                 f"data.paths={text_dir}", "data.val_fraction=0.2", f"train.init_from={src}", "train.steps=2", "train.eval_every=2", *mesh_set]
    cfg = load_config(None, overrides, model=init_model_fields(str(src)))
    assert cfg.model == src_cfg.model
    summary = train(cfg, mesh_spec=mesh, progress=False)
    assert summary["start_step"] == 0
    B, T = cfg.train.batch_size, cfg.data.seq_len
    assert_close(summary["initial_eval_loss"], src_summary["final_eval_loss"], forward_chain(cfg.model, B, T), err_msg="first eval vs the source's last")
    resumed = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3)), mesh_spec=mesh, progress=False)
    assert resumed["start_step"] == 2


def test_init_from_refuses_another_model_and_the_run_dir_itself(trained, tmp_path, text_dir):
    src, _, _ = trained
    with pytest.raises(ConfigError, match=r"is a different model \(changed: model.rope_theta 10000.0 -> 500000.0\)"):
        train(_cfg(tmp_path / "x", text_dir, f"train.init_from={src}", "model.rope_theta=500000.0"), progress=False)
    with pytest.raises(ConfigError, match="is the run_dir itself"):
        _cfg(src, text_dir, f"train.init_from={src}")
    with pytest.raises(ConfigError, match="import the Hugging Face model first"):
        _cfg(tmp_path / "y", text_dir, "train.init_from=hf:/models/llama")
    assert not (tmp_path / "x").exists()
