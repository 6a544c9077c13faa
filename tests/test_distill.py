"""Distillation: the mixed loss, weight 0 == plain training (within rounding), no gradient into the teacher,
clear errors for a bad teacher, and a distilled run end to end (sharded teacher of another size, int8 export)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbig.compress.distill import load_teacher, make_distill_loss, mixed_loss
from jaxbig.config import ConfigError, DistillConfig, load_config
from jaxbig.parallel.mesh import make_mesh
from jaxbig.parallel.rules import rules_for, use_rules
from jaxbig.train.state import init_train_state
from jaxbig.train.step import jit_train_step, loss_fn, make_train_step
from jaxbig.optim import optimizer_for
from tests.numerics import assert_close, assert_trees_close, backward_chain, forward_chain

MODEL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "model.d_ff=128", "model.max_seq_len=64"]
TEACHER = ["model.d_model=96", "model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=16", "model.d_ff=192", "model.max_seq_len=64"]
RUN = ["data.seq_len=32", "data.val_fraction=0.2", "train.batch_size=8", "train.log_every=4", "train.eval_every=4", "train.eval_batches=1", "optim.warmup_steps=1"]


def _logits(seed, shape=(2, 5, 11)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 3, jnp.float32)


def test_mixed_loss_matches_its_formula():
    s, t = _logits(0), _logits(1)
    y = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 5)), jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
    T = 2.5
    p_t = jax.nn.softmax(t / T)
    kl = np.sum(np.asarray(p_t) * (np.log(np.asarray(p_t)) - np.asarray(jax.nn.log_softmax(s / T))), axis=-1).mean()
    np.testing.assert_allclose(mixed_loss(s, t, y, T, 0.3), 0.7 * ce + 0.3 * T * T * kl, rtol=1e-5)
    assert float(mixed_loss(s, s, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)  # KL of a distribution to itself
    assert float(mixed_loss(s, t, y, T, 0.0)) == float(ce)
    # The soft term's gradient is (p_s - p_t)·T per logit: matching the teacher is its minimum.
    g = jax.grad(lambda x: mixed_loss(x, t, y, T, 1.0))(s)
    np.testing.assert_allclose(g, T * (jax.nn.softmax(s / T) - p_t) / 10, atol=1e-6)  # / 10 tokens (mean)


@pytest.fixture(scope="module")
def setup():
    """Student state on a data=4, tensor=2 mesh; a wider, deeper teacher's params sharded on the same mesh."""
    cfg = load_config(None, MODEL + RUN + ["mesh.data=4", "mesh.tensor=2"])
    teacher_cfg = load_config(None, TEACHER + RUN)
    mesh = make_mesh(cfg.mesh)
    tx, schedule = optimizer_for(cfg, dict(mesh.shape))
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, 256, (8, 32)), jnp.int32) for k in ("inputs", "targets")}
    with jax.set_mesh(mesh), use_rules(rules_for(False)):
        graphdef, state, shardings, _ = init_train_state(cfg.model, tx, mesh, 0)
        teacher_graphdef, teacher_state, teacher_shardings, _ = init_train_state(teacher_cfg.model, optax.identity(), mesh, 1)
    return cfg, mesh, tx, schedule, graphdef, state, shardings, teacher_graphdef, teacher_state.params, teacher_shardings.params, batch


def _run(setup, distill_cfg, steps=3):
    cfg, mesh, tx, schedule, graphdef, state, shardings, t_graphdef, t_params, t_shardings, batch = setup
    from jaxbig.data.pipeline import batch_sharding

    bs = batch_sharding(mesh, 8, 32)
    state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    with jax.set_mesh(mesh), use_rules(rules_for(False)):
        if distill_cfg is None:
            step = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, bs)
        else:
            teacher = type("T", (), {"params": t_params, "shardings": t_shardings})
            loss = make_distill_loss(graphdef, t_graphdef, distill_cfg)
            step = jit_train_step(make_train_step(graphdef, tx, schedule, distill_loss=loss), shardings, bs, teacher)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(np.asarray(metrics["loss"]))
    return state, losses


def test_weight_zero_is_plain_training(setup):
    """With weight 0 the distillation loss and its gradients are plain training's.

    Two programs (the distillation step also runs the teacher), so they agree within float32 rounding
    (tests/numerics.py), not bit for bit; and the same optimizer applies the same gradients.
    """
    cfg, mesh, _, _, graphdef, state, _, t_graphdef, t_params, _, batch = setup
    distill = make_distill_loss(graphdef, t_graphdef, DistillConfig(teacher="x", weight=0.0, temperature=2.0))
    with jax.set_mesh(mesh), use_rules(rules_for(False)):
        want, want_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(state.params, graphdef, batch)
        got, got_grads = jax.jit(jax.value_and_grad(distill))(state.params, batch, t_params)
    B, T = batch["inputs"].shape
    assert_close(got, want, forward_chain(cfg.model, B, T), err_msg="loss")
    assert_trees_close(got_grads, want_grads, backward_chain(cfg.model, B, T))
    plain, _ = _run(setup, None)
    moved, _ = _run(setup, DistillConfig(teacher="x", weight=0.5, temperature=2.0))  # and a real weight changes the result
    assert not np.array_equal(np.asarray(moved.params["lm_head_DV"]), np.asarray(plain.params["lm_head_DV"]))


def test_no_gradient_reaches_the_teacher(setup):
    _, _, _, _, graphdef, state, _, t_graphdef, t_params, _, batch = setup
    loss = make_distill_loss(graphdef, t_graphdef, DistillConfig(teacher="x", weight=1.0))
    grads = jax.jit(jax.grad(loss, argnums=2))(state.params, batch, t_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    student_grads = jax.jit(jax.grad(loss))(state.params, batch, t_params)
    assert float(optax.tree.norm(student_grads)) > 0


def test_bad_teachers_are_refused_with_the_fix(tmp_path, text_dir):
    mesh = make_mesh(load_config(None, ["mesh.data=8"]).mesh)

    def train(cfg, progress):  # what the loop calls first, before the student's step is built
        with jax.set_mesh(mesh), use_rules(rules_for(False)):
            return load_teacher(cfg, mesh)

    def cfg(teacher, *extra):
        return load_config(None, MODEL + RUN + [f"train.run_dir={tmp_path / 'student'}", f"data.paths={text_dir}", f"distill.teacher={teacher}", *extra])

    with pytest.raises(ConfigError, match=r"distill.teacher='.*nowhere' does not exist; train the teacher first"):
        train(cfg(tmp_path / "nowhere"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"distill.teacher: '.*empty' is not a jaxbig run directory \(no config.yaml\)"):
        train(cfg(tmp_path / "empty"), progress=False)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text(load_config(None, TEACHER + RUN).to_yaml())
    with pytest.raises(ConfigError, match=r"distill.teacher: run_dir '.*untrained' has no checkpoints yet"):
        train(cfg(untrained), progress=False)
    other_vocab = tmp_path / "vocab"
    other_vocab.mkdir()
    (other_vocab / "config.yaml").write_text(load_config(None, TEACHER + RUN + ["model.vocab_size=512"]).to_yaml())
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 but the student has model.vocab_size=256"):
        train(cfg(other_vocab), progress=False)
    with pytest.raises(ConfigError, match=r"is this run's own train.run_dir"):
        train(cfg(tmp_path / "student"), progress=False)
    with pytest.raises(ConfigError, match=r"distill.weight=1.5 must be in \[0, 1\]"):
        load_config(None, ["distill.weight=1.5"])
    with pytest.raises(ConfigError, match=r"distill.temperature=0.0 must be positive"):
        load_config(None, ["distill.temperature=0"])
    with pytest.raises(ConfigError, match=r"distill.teacher runs on the standard train step only.*optim.outer='diloco'"):
        load_config(None, ["distill.teacher=runs/x", "optim.outer=diloco", "train.steps=32"])


def test_distilled_run_trains_and_exports_int8(tmp_path, text_dir):
    """Teacher (wider, deeper) trained 8 steps; student distilled from it on a data=4, tensor=2 mesh; the
    student's run exports with --quantize int8 and its manifest describes the student."""
    from jaxbig.export.bundle import export_run
    from jaxbig.train.loop import train

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    train(load_config(None, TEACHER + RUN + [f"train.run_dir={teacher_dir}", f"data.paths={text_dir}", "train.steps=8"]), progress=False)
    cfg = load_config(
        None,
        MODEL + RUN + [f"train.run_dir={student_dir}", f"data.paths={text_dir}", "train.steps=8", f"distill.teacher={teacher_dir}",
                       "distill.weight=0.7", "distill.temperature=2", "mesh.data=4", "mesh.tensor=2"],
    )
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), use_rules(rules_for(False)):
        teacher = load_teacher(cfg, mesh)
    assert teacher.step == 8 and teacher.cfg.model.d_model == 96
    wq = teacher.params["blocks"]["attn"]["wq_DHK"]
    assert wq.sharding.spec[2] == "tensor"  # heads split over tensor on the student's mesh
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < summary["initial_eval_loss"]
    out = export_run(student_dir, tmp_path / "exports" / "student", 1, quantize="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["d_model"] == 64 and manifest["quantization"]["method"] == "int8"
