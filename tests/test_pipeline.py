"""Pipeline parallelism: the schedules' bubble, equality with one device (one step and 20, for every layout), layout errors, HLO, decoding."""

import dataclasses
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbig.parallel.pipeline as pipeline
from jaxbig.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, load_config
from jaxbig.data.pipeline import batch_sharding
from jaxbig.optim import build_optimizer
from jaxbig.parallel.hlo import parse_collectives
from jaxbig.parallel.mesh import check_fits, make_mesh
from jaxbig.train.state import TrainState, abstract_train_state, init_train_state, logical_axes
from jaxbig.train.step import jit_train_step, make_train_step
from tests.numerics import LINEAR_SGD, assert_close, assert_near_argmax, assert_steps_close, assert_trees_close, backward_chain, forward_chain, tolerance

CFG = ModelConfig(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
B, T, STEPS = 8, 16, 20
# SGD with momentum, no decay or clipping: linear in the gradients, so one step from the same state lands within lr
# times the gradients' rounding on every layout (tests/numerics.py); lr 0.1 takes the loss from 5.5 to 3.5 in 20 steps.
OPTIM = OptimConfig(**(LINEAR_SGD | dict(momentum=0.9)))
# Every layout the parallelism issue names, pipeline or not, checked against one device the same way.
LAYOUTS = {
    "data8": (MeshConfig(data=8), ParallelConfig()),
    "fsdp8": (MeshConfig(data=1, fsdp=8), ParallelConfig()),
    "data4-tensor2": (MeshConfig(data=4, tensor=2), ParallelConfig()),
    "data2-fsdp2-tensor2": (MeshConfig(data=2, fsdp=2, tensor=2), ParallelConfig()),
    "2x2x2-gpipe": (MeshConfig(data=2, tensor=2, pipeline=2), ParallelConfig()),
    "2x2x2-circular": (MeshConfig(data=2, tensor=2, pipeline=2), ParallelConfig(schedule="circular", repeats=2)),
    "tensor2-pipeline4": (MeshConfig(data=1, tensor=2, pipeline=4), ParallelConfig()),
}


def _batches():
    """STEPS batches of real text (this module's source), so the loss actually falls."""
    tokens = np.frombuffer(Path(pipeline.__file__).read_bytes(), np.uint8).astype(np.int32)
    windows = tokens[: (len(tokens) - 1) // T * T + 1]
    starts = np.random.default_rng(0).integers(0, len(windows) - T - 1, size=(STEPS, B))
    rows = windows[starts[..., None] + np.arange(T + 1)]  # [STEPS, B, T+1]
    return [{"inputs": r[:, :-1], "targets": r[:, 1:]} for r in rows]


def _keep_grads() -> optax.GradientTransformation:
    """Passes the gradients through unchanged and keeps the latest in its state, so one compiled
    train step yields both the first step's gradients and the training trajectory."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params), lambda g, state, params=None: (g, g))


def _run(mesh, parallel: ParallelConfig, init_params=None, ref_states=None):
    """(first loss, first grads, losses of STEPS train steps, compiled HLO, final state, states) on `mesh`.

    The initial params are `init_params` placed on the mesh (compiling the sharded init for
    every mesh would cost more than all the steps), else a fresh init. With `ref_states` (the
    one-device run's state before each step) every step starts from the reference's state, so
    each step is compared from identical inputs and rounding differences never compound.
    `states` are the host copies of the state before each step and after the last.
    """
    sgd, schedule = build_optimizer(OPTIM, total_steps=STEPS)
    tx = optax.chain(_keep_grads(), sgd)
    run_layers = pipeline.layer_runner(mesh, parallel)
    with jax.set_mesh(mesh):
        if init_params is None:
            graphdef, state, shardings, _ = init_train_state(CFG, tx, mesh, seed=0)
        else:
            graphdef = logical_axes(CFG)[0]
            _, shardings, _ = abstract_train_state(CFG, tx, mesh, seed=0)
            state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), params=init_params, opt_state=tx.init(init_params)), shardings)
        bs = batch_sharding(mesh, B, T)
        batches = [jax.tree.map(lambda a: jax.device_put(a, bs), b) for b in _batches()]
        step = jit_train_step(make_train_step(graphdef, tx, schedule, run_layers), shardings, bs).lower(state, batches[0]).compile()
        losses, grads, states = [], None, []
        for i, batch in enumerate(batches):
            if ref_states is not None:
                state = jax.device_put(ref_states[i], shardings)
            states.append(jax.device_get(state))
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
            grads = jax.device_get(state.opt_state[0]) if grads is None else grads
        states.append(jax.device_get(state))
    losses = np.asarray(jax.device_get(losses))
    return float(losses[0]), grads, losses, step.as_text(), state, states


@pytest.fixture(scope="module")
def reference():
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    tx, _ = build_optimizer(OPTIM, total_steps=STEPS)
    with jax.set_mesh(one):
        _, state, _, _ = init_train_state(CFG, tx, one, seed=0)
    init_params = jax.device_get(state.params)
    return init_params, _run(one, ParallelConfig(), init_params)


@pytest.fixture(scope="module")
def runs(reference):
    """Each layout is compiled and trained once, on first use, from the reference's initial params."""
    cache = {}

    def get(name):
        if name not in cache:
            mesh_cfg, parallel = LAYOUTS[name]
            mesh = make_mesh(mesh_cfg)
            cache[name] = (mesh, *_run(mesh, parallel, reference[0], ref_states=reference[1][5]))
        return cache[name]

    return get


# --------------------------------------------------------------------------- the timetable


@pytest.mark.parametrize("p, m, v", [(2, 4, 1), (4, 8, 1), (4, 1, 1), (3, 5, 1), (2, 4, 2), (2, 2, 3), (4, 4, 2), (3, 6, 3), (4, 8, 4)])
def test_bubble_formula_matches_the_schedules_idle_steps(p, m, v):
    table = pipeline.timetable(p, m, v)
    assert len(table) == pipeline.num_steps(p, m, v) == v * m + p - 1
    counted = Fraction(pipeline.idle_steps(table), len(table) * p)
    formula = Fraction(p - 1, m + p - 1) if v == 1 else Fraction(p - 1, v * m + p - 1)
    assert counted == formula
    assert pipeline.bubble_fraction(p, m, v) == pytest.approx(float(formula), abs=1e-15)


def test_circular_with_fewer_microbatches_than_stages_would_compute_on_the_wrong_input():
    """Why the validation asks for microbatches >= stages: microbatch 0 is not back at stage 0 in time."""
    with pytest.raises(AssertionError, match="stage 0 should work on microbatch 0, repeat 1"):
        pipeline.timetable(4, 3, 2)


# --------------------------------------------------------------------------- sharded == one device


# Another layout is another program: loss and gradients agree within float32 rounding (tests/numerics.py), the
# chains lengthened by the collectives' sums over up to 8 devices and the microbatches' sum.
N_FWD, N_BWD = forward_chain(CFG, B, T) + 8 + B, backward_chain(CFG, B, T) + 8 + B


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_loss_and_grads_match_single_device(layout, reference, runs):
    ref_loss, ref_grads, *_ = reference[1]
    _, loss, grads, *_ = runs(layout)
    assert_close(loss, ref_loss, N_FWD, err_msg="loss")
    assert_trees_close(grads, ref_grads, N_BWD)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_twenty_steps_match_single_device(layout, reference, runs):
    """Each of 20 steps, from the one-device run's state before it, lands where the one-device step does."""
    _, _, ref_losses, _, _, ref_states = reference[1]
    losses, states = runs(layout)[3], runs(layout)[6]
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learns, so matching it means something
    for i in range(STEPS):
        assert_close(losses[i], ref_losses[i], N_FWD, err_msg=f"step {i} loss")
        assert_steps_close(states[i + 1].params, ref_states[i + 1].params, ref_states[i].params, N_BWD)


def test_compiled_step_moves_activations_over_pipeline_only_by_collective_permute(runs):
    """GPipe: ppermutes carry activations; the params never leave their stage (no all-gather over pipeline).

    The all-reduces over pipeline are the embedding's and head's gradients: those run
    data-parallel over the stages, outside the pipeline.
    """
    for layout in ("2x2x2-gpipe", "2x2x2-circular"):
        mesh, _, _, _, hlo, _, _ = runs(layout)
        collectives = parse_collectives(hlo, mesh)
        permutes = [c for c in collectives if c.kind == "collective-permute"]
        assert permutes and all(c.axes == ("pipeline",) for c in permutes), layout
        over_pipeline = {c.kind for c in collectives if "pipeline" in c.axes}
        assert over_pipeline <= {"collective-permute", "all-reduce"}, (layout, over_pipeline)


def test_params_are_split_over_stages_in_natural_layer_order(runs):
    """Stage s holds layers [s·L/p, (s+1)·L/p): the checkpointed stack is the one-device stack."""
    mesh, *_, state, _ = runs("tensor2-pipeline4")
    wq = state.params["blocks"]["attn"]["wq_DHK"]
    assert wq.sharding.spec[0] == "pipeline"
    for shard in wq.addressable_shards:
        stage = int(np.argwhere(mesh.devices == shard.device)[0][1])
        assert shard.index[0] == slice(stage, stage + 1)


# --------------------------------------------------------------------------- errors


def _cfg(**sections) -> Config:
    return Config(
        model=sections.get("model", CFG),
        parallel=sections.get("parallel", ParallelConfig()),
        data=DataConfig(seq_len=T),
        train=TrainConfig(batch_size=sections.get("batch", 8)),
    )


@pytest.mark.parametrize(
    "cfg, mesh, message",
    [
        (_cfg(model=dataclasses.replace(CFG, num_layers=6)), {"pipeline": 4}, "model.num_layers=6 is not divisible by pipeline stages x repeats = 4 x 1 = 4"),
        (
            _cfg(model=dataclasses.replace(CFG, num_layers=6), parallel=ParallelConfig(schedule="circular", repeats=2)),
            {"pipeline": 2},
            "model.num_layers=6 is not divisible by pipeline stages x repeats = 2 x 2 = 4",
        ),
        (_cfg(batch=8), {"data": 2, "pipeline": 4}, "train.batch_size=8 is not divisible by data x fsdp x microbatches = 2 x 1 x 8 = 16"),
        (_cfg(parallel=ParallelConfig(microbatches=3)), {"pipeline": 2}, "parallel.microbatches=3 is not a multiple of the 2 pipeline stages"),
        (
            _cfg(parallel=ParallelConfig(microbatches=2, schedule="circular", repeats=2), model=dataclasses.replace(CFG, num_layers=8)),
            {"pipeline": 4},
            "parallel.microbatches=2 is fewer than the 4 pipeline stages; the circular schedule needs microbatches >= stages",
        ),
        (_cfg(model=dataclasses.replace(CFG, num_heads=6, num_kv_heads=2)), {"tensor": 4}, "model.num_heads=6 is not divisible by mesh tensor=4"),
    ],
)
def test_layouts_that_do_not_divide_name_the_numbers(cfg, mesh, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_fits(cfg, mesh)


def test_layouts_that_divide_pass():
    check_fits(_cfg(), {"data": 2, "tensor": 2, "pipeline": 2})
    check_fits(_cfg(parallel=ParallelConfig(schedule="circular", repeats=2)), {"data": 2, "tensor": 2, "pipeline": 2})
    check_fits(_cfg(), {"tensor": 2, "pipeline": 4})


# --------------------------------------------------------------------------- the loop and decoding


def test_pipeline_run_reports_its_bubble_and_decodes_on_one_device(tmp_path, text_dir, capsys):
    """Train on 2x2x2 through the loop, then sample from its checkpoint on one device without the pipeline."""
    from jaxbig.data import eval_batches, load_corpus
    from jaxbig.models.decode import generate
    from jaxbig.train.loop import train
    from jaxbig.checkpoint.run import load_params
    from jaxbig.train.step import make_eval_step, mean_loss

    m = CFG
    overrides = [f"model.{k}={getattr(m, k)}" for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "max_seq_len")]
    overrides += [f"data.seq_len={T}", f"train.batch_size={B}", "train.steps=3", "optim.warmup_steps=1", "train.eval_batches=1"]
    overrides += [f"train.run_dir={tmp_path / 'run'}", f"data.paths={text_dir}", "data.val_fraction=0.2"]
    overrides += ["mesh.data=2", "mesh.tensor=2", "mesh.pipeline=2", "parallel.schedule=circular", "parallel.repeats=2"]
    cfg = load_config(None, overrides)
    summary = train(cfg, progress=False)
    assert summary["bubble_fraction"] == pytest.approx(1 / 9)  # (p-1)/(v·m+p-1) = 1/(2·4+1)
    assert "pipeline circular 2 stages x 4 microbatches x 2 repeats, bubble 11.1%" in capsys.readouterr().out

    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, graphdef, params, step = load_params(tmp_path / "run", mesh=one)
    assert step == 3
    # The one-device scan over the loaded stack gives the pipeline's own final eval loss.
    corpus = load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes)
    with jax.set_mesh(one):
        val = eval_batches(corpus.val_BYTES, T, B, one, cfg.train.eval_batches)
        eval_loss = mean_loss(jax.jit(make_eval_step(graphdef)), params, val)
    assert_close(eval_loss, summary["final_eval_loss"], N_FWD, err_msg="eval loss")  # the pipeline's program and one device's

    prompt = jnp.asarray(np.frombuffer(b"def f", np.uint8).astype(np.int32))[None]
    out = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=8)
    full = jnp.concatenate([prompt, out], axis=1)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, full)[:, prompt.shape[1] - 1 : -1]
    # The decode loop and the forward are two programs: each token is a greedy choice up to their rounding.
    assert_near_argmax(out, logits, tolerance(forward_chain(CFG, *full.shape), float(jnp.abs(logits).max())), "greedy decoding")
