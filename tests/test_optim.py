"""Optimizers, schedules, gradient compression over the data axis, and DiLoCo.

Compiled steps are shared through module fixtures: each method is compiled once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxbig import checkpoint
from jaxbig.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from jaxbig.data.pipeline import batch_sharding
from jaxbig.optim import build_optimizer, decay_mask, learning_rate_schedule, optimizer_for, uses_data_parallel_step
from jaxbig.optim import compression
from jaxbig.optim.compression import CompressionError
from jaxbig.parallel.hlo import collective_bytes
from jaxbig.parallel.mesh import make_mesh, parse_mesh_spec
from jaxbig.train.dp_step import make_dp_train_step
from jaxbig.train.state import init_train_state
from jaxbig.train.step import jit_train_step, make_train_step
from tests.numerics import LINEAR_SGD, assert_close, assert_steps_close, assert_trees_close, backward_chain, forward_chain

TINY = ModelConfig()  # the tiny preset
SMALL = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)
B, T = 16, 64  # `_compile`'s batch


@dataclasses.dataclass
class Compiled:
    mesh: jax.sharding.Mesh
    state: object  # the initial state (copied before each use: the step donates it)
    abstract: object
    batches: list
    step: object  # the compiled step
    hlo: str

    def fresh(self):
        return jax.tree.map(lambda x: x.copy(), self.state)

    def run(self, n: int):
        state, losses = self.fresh(), []
        for i in range(n):
            state, metrics = self.step(state, self.batches[i % len(self.batches)])
            losses.append(float(np.mean(metrics["loss"])))
        return state, losses

    def data_bytes(self, **kw) -> float:
        return sum(collective_bytes(self.hlo, self.mesh, over="data", **kw).values())


def _compile(model: ModelConfig, spec: str, optim: OptimConfig, *, exact: bool = False) -> Compiled:
    """The loop's train step for `optim` on the mesh `spec`, compiled; `exact`: the dp step with the none compressor."""
    mesh = make_mesh(MeshConfig(**parse_mesh_spec(spec)), spec=spec)
    cfg = Config(model=model, data=DataConfig(seq_len=T), optim=optim, train=TrainConfig(steps=16, batch_size=B))
    tx, schedule = optimizer_for(cfg, dict(mesh.shape))
    if exact:
        tx = optax.chain(compression.exact(), tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=(3, B, T + 1), dtype=np.int32)
    with jax.set_mesh(mesh):
        graphdef, state, shardings, abstract = init_train_state(model, tx, mesh, seed=0)
        bs = batch_sharding(mesh, B, T)
        batches = [{"inputs": jax.device_put(t[:, :-1], bs), "targets": jax.device_put(t[:, 1:], bs)} for t in tokens]
        if exact or uses_data_parallel_step(optim):
            fn = make_dp_train_step(graphdef, tx, schedule, mesh, shardings, optim.accumulate_steps)
        else:
            fn = make_train_step(graphdef, tx, schedule, accumulate_steps=optim.accumulate_steps)
        compiled = jit_train_step(fn, shardings, bs).lower(state, batches[0]).compile()
    return Compiled(mesh, state, abstract, batches, compiled, compiled.as_text())


def _plain_bytes(c: Compiled) -> float:
    """What plain data parallelism sends over data per step: an f32 all-reduce of each device's own gradient shards.

    `test_compressed_bytes_over_data_per_step` checks this against the compiled plain step.
    """
    n = c.mesh.shape["data"]
    return sum(x.addressable_shards[0].data.size * 4 * 2 * (n - 1) / n for x in jax.tree.leaves(c.state.params))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def _chains(model: ModelConfig, extra: int = 0) -> tuple[int, int]:
    """(forward, backward) reduction chains of `_compile`'s step; `extra` adds the step's own sums (over replicas, microbatches)."""
    return forward_chain(model, B, T) + extra, backward_chain(model, B, T) + extra


# --------------------------------------------------------------------------- optimizers and schedules


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "learning_rate": 0.1},
        {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
        {"optimizer": "adamw", "learning_rate": 0.05},
        {"optimizer": "lion", "learning_rate": 0.01, "b2": 0.99},
        {"optimizer": "adafactor", "learning_rate": 0.05},
    ],
    ids=lambda o: "-".join(f"{v}" for k, v in o.items() if k in ("optimizer", "momentum", "nesterov")),
)
def test_each_optimizer_minimises_a_quadratic(overrides):
    cfg = OptimConfig(warmup_steps=0, schedule="constant", weight_decay=0.0, **overrides)
    tx, _ = build_optimizer(cfg, 100)
    target = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(16, 16), "norm": {"scale": jnp.ones((16,))}}
    params = jax.tree.map(jnp.zeros_like, target)
    loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))  # noqa: E731
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    first = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.2 * first


def test_schedules():
    base = dict(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    constant = learning_rate_schedule(OptimConfig(schedule="constant", **base), 100)
    cosine = learning_rate_schedule(OptimConfig(schedule="cosine", **base), 100)
    linear = learning_rate_schedule(OptimConfig(schedule="linear", **base), 100)
    wsd = learning_rate_schedule(OptimConfig(schedule="wsd", decay_fraction=0.2, **base), 100)
    for s in (constant, cosine, linear, wsd):
        assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(constant(100)) == pytest.approx(1.0)
    assert float(cosine(100)) == pytest.approx(0.1) and float(cosine(55)) == pytest.approx(0.55, abs=1e-6)
    assert float(linear(100)) == pytest.approx(0.1) and float(linear(55)) == pytest.approx(0.55)
    assert float(wsd(80)) == pytest.approx(1.0) and float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)


def test_weight_decay_mask_spares_norms_and_vectors():
    params = {"w_DF": jnp.ones((4, 8)), "bias": jnp.ones((8,)), "attn_norm": {"scale": jnp.ones((2, 4))}}
    assert decay_mask(params) == {"w_DF": True, "bias": False, "attn_norm": {"scale": False}}


def test_bad_optimizer_settings_fail_with_the_fix():
    with pytest.raises(ConfigError, match="optim.nesterov=true needs optim.momentum > 0"):
        OptimConfig(optimizer="sgd", nesterov=True)
    with pytest.raises(ConfigError, match="optim.momentum=0.9 applies to optim.optimizer=sgd only"):
        OptimConfig(momentum=0.9)
    with pytest.raises(ConfigError, match="optim.compression='zip'"):
        OptimConfig(compression="zip")
    with pytest.raises(ConfigError, match="set optim.compression=none"):
        OptimConfig(outer="diloco", compression="int8")
    with pytest.raises(ConfigError, match=r"train.steps=30 is not a multiple of optim.sync_every=8.*use train.steps=24"):
        Config(optim=OptimConfig(outer="diloco"), train=TrainConfig(steps=30))
    with pytest.raises(ConfigError, match="not divisible by optim.accumulate_steps=3"):
        Config(optim=OptimConfig(accumulate_steps=3), train=TrainConfig(batch_size=16))


# --------------------------------------------------------------------------- compression: bytes and exactness


@pytest.fixture(scope="module")
def tiny_steps():
    """The tiny model's step on 8 data replicas, compiled once per method."""
    # Scanned layers: each layer's gradient is all-reduced inside the backward loop, one psum per trip.
    out = {"plain": _compile(dataclasses.replace(TINY, scan_layers=True), "8", OptimConfig(warmup_steps=0))}
    for method in ("int8", "topk"):
        out[method] = _compile(TINY, "8", OptimConfig(warmup_steps=0, compression=method, topk_fraction=0.01))
    # Fused: the tiny model's per-layer matrices are at most 128 on a side, so rank 4 saves at most 128/(2*4) = 16x on
    # square ones and 32x on 128x512 ones (21.7x in all); 50x needs the block weights fused into one matrix and the
    # embedding + head into another (79.9x), so the vocab weights are compressed too here.
    psgd = OptimConfig(warmup_steps=0, compression="powersgd", powersgd_rank=4, powersgd_view="fused", powersgd_vocab=True)
    out["powersgd"] = _compile(TINY, "8", psgd)
    return out


def test_compressed_bytes_over_data_per_step(tiny_steps):
    """Compiled HLO, 8 replicas: int8 >= 3.9x, PowerSGD rank 4 >= 50x (fused view), top-1% >= 10x fewer bytes than f32."""
    b = {m: c.data_bytes() for m, c in tiny_steps.items()}
    assert b["plain"] == pytest.approx(TINY.num_params() * 4 * 2 * 7 / 8, rel=1e-3) == pytest.approx(_plain_bytes(tiny_steps["plain"]), rel=1e-3)
    assert b["plain"] / b["int8"] >= 3.9
    assert b["plain"] / b["topk"] >= 10
    assert b["plain"] / b["powersgd"] >= 50
    kinds = {m: {k for k, v in collective_bytes(c.hlo, c.mesh, over="data").items() if v} for m, c in tiny_steps.items()}
    assert kinds["int8"] == {"all-to-all", "all-gather"}
    assert kinds["powersgd"] == {"all-reduce"}
    assert kinds["topk"] == {"all-gather"}


@pytest.fixture(scope="module")
def small_sgd():
    """The small model's plain step and its `none` data-parallel step, SGD linear in the gradient, compiled once."""
    return {"plain": _compile(SMALL, "8", OptimConfig(**LINEAR_SGD)), "none": _compile(SMALL, "8", OptimConfig(**LINEAR_SGD), exact=True)}


def test_none_step_is_the_plain_data_parallel_step(small_sgd):
    """The hand-written data-parallel step with the exact compressor: the plain step's bytes, and its step up to rounding.

    Two programs (a psum of local gradients under shard_map, and the all-reduce the partitioner puts into plain
    `jit`): each takes two steps from the same state, and they agree within float32 rounding (tests/numerics.py).
    """
    plain, none = small_sgd["plain"], small_sgd["none"]
    # The plain step all-reduces each layer's gradient inside the backward loop; counted per trip, it equals one psum.
    assert none.data_bytes() == pytest.approx(plain.data_bytes(), rel=1e-4)
    n_fwd, n_bwd = _chains(SMALL, extra=8)  # + the psum over 8 replicas
    state = plain.fresh()
    for i in range(2):
        # The same state into both: SGD keeps no optimizer state, only the exact compressor's (empty) differs.
        as_none = dataclasses.replace(_copy(state), opt_state=(_copy(none.state.opt_state[0]), _copy(state.opt_state)))
        ours, ours_metrics = none.step(as_none, none.batches[i])
        before = jax.device_get(state.params)
        state, metrics = plain.step(state, plain.batches[i])
        assert_close(np.mean(ours_metrics["loss"]), metrics["loss"], n_fwd, err_msg=f"step {i} loss")
        assert_steps_close(ours.params, state.params, before, n_bwd)
        assert int(ours.step) == int(state.step) == i + 1


def test_compressed_steps_train_and_keep_residuals_per_replica(tiny_steps):
    _, plain_losses = tiny_steps["plain"].run(3)
    for method in ("int8", "powersgd", "topk"):
        state, losses = tiny_steps[method].run(3)
        assert_close(losses[0], plain_losses[0], _chains(TINY, extra=8)[0], err_msg=method)  # same params, same batch
        assert losses[2] < losses[0] and abs(losses[2] - plain_losses[2]) < 0.15, (method, losses, plain_losses)
        residual = state.opt_state[0].residual.value  # chain(compress, clip, adamw): compress's residuals
        w = residual["blocks"]["mlp"]["w_gate_DF"]
        assert w.shape == (8, *state.params["blocks"]["mlp"]["w_gate_DF"].shape) and w.sharding.spec == P("data")
        assert float(jnp.abs(w).max()) > 0, method
        assert not np.array_equal(np.asarray(w[0]), np.asarray(w[1])), method  # each replica its own residual


@pytest.mark.parametrize("method, bound", [("bf16", 1.95), ("sign", 7.9)])
def test_bf16_and_sign_bytes(method, bound):
    c = _compile(SMALL, "8", OptimConfig(warmup_steps=0, compression=method))
    assert _plain_bytes(c) / c.data_bytes() >= bound
    _, losses = c.run(3)
    assert losses[2] < losses[0]


def test_gradient_accumulation_matches_the_full_batch(small_sgd):
    """Two microbatches' mean gradient is the full batch's: one step from the same params agrees within rounding."""
    full = small_sgd["plain"]
    accumulated = _compile(SMALL, "8", OptimConfig(**LINEAR_SGD, accumulate_steps=2))
    n_fwd, n_bwd = _chains(SMALL, extra=2)  # + the sum over 2 microbatches
    (got, got_metrics), (want, want_metrics) = (c.step(c.fresh(), c.batches[0]) for c in (accumulated, full))
    assert_close(got_metrics["loss"], want_metrics["loss"], n_fwd)
    assert_steps_close(got.params, want.params, jax.device_get(full.state.params), n_bwd)


def test_powersgd_sends_the_vocab_weights_exact_and_repeats_the_factors_per_iteration():
    """Default views: embedding and head in the exact psum; each power iteration all-reduces P and Q once more."""
    from jaxbig.optim import matrix_views
    from jaxbig.train.state import logical_axes

    psgd = dict(warmup_steps=0, compression="powersgd", powersgd_rank=2)
    one, two = (_compile(SMALL, "8", OptimConfig(**psgd, powersgd_iterations=k)) for k in (1, 2))
    with_vocab = _compile(SMALL, "8", OptimConfig(**psgd, powersgd_vocab=True))
    _, abstract, logical = logical_axes(SMALL)
    views = jax.tree.leaves(matrix_views(logical), is_leaf=lambda v: v is None or isinstance(v, compression.MatrixView))
    exact_params = sum(x.size for x, v in zip(jax.tree.leaves(abstract), views) if v is None)
    assert exact_params > 2 * SMALL.vocab_size * SMALL.d_model  # the embedding, the head and the norm scales
    exact = exact_params * 4 * 2 * 7 / 8  # their f32 ring all-reduce over 8 replicas
    assert one.data_bytes() - exact == pytest.approx(two.data_bytes() - one.data_bytes(), rel=1e-6)
    # Rank 2 over the embedding and head sends (256 + 64) x 2 numbers for each in place of 256 x 64.
    assert one.data_bytes() - with_vocab.data_bytes() == pytest.approx(2 * (256 * 64 - 320 * 2) * 4 * 2 * 7 / 8, rel=1e-6)
    state, losses = two.run(3)
    assert losses[2] < losses[0]
    assert float(jnp.abs(state.opt_state[0].residual.value["embed_VD"]).max()) == 0


def test_more_power_iterations_approach_the_best_rank_r_approximation():
    """8 replicas' matrices summed: one warm-started step from a random Q is a rough rank-2 fit, four steps the SVD's."""
    mesh = make_mesh(MeshConfig(data=8))
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    V, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    sigma = np.array([8.0, 6.0, *(0.6 * 0.8 ** np.arange(22))])
    total = (U[:, :24] * sigma) @ V.T
    shares = rng.normal(size=(8, 32, 24)) * 0.1
    shares += (total - shares.sum(0)) / 8  # the replicas' gradients sum to `total`
    best = (U[:, :2] * sigma[:2]) @ V[:, :2].T
    errors = {}
    for k in (1, 4):
        tx = compression.powersgd(2, 8, iterations=k, error_feedback=False)

        def run(g):
            out, _ = tx.update({"w": g[0]}, tx.init({"w": g[0]}))
            return out["w"]

        with jax.set_mesh(mesh):
            agg = jax.jit(jax.shard_map(run, in_specs=P("data"), out_specs=P()))(jnp.asarray(shares, jnp.float32))
        errors[k] = float(np.linalg.norm(np.asarray(agg) - best) / np.linalg.norm(best))
    assert errors[4] < 1e-3 < 0.05 < errors[1], errors


# --------------------------------------------------------------------------- tensor parallelism and checkpoints


def test_compression_with_tensor_parallelism_and_error_feedback_checkpoint(tmp_path):
    """4x2 (data x tensor): each device compresses its own tensor shard; residuals split over data and
    tensor survive a checkpoint round trip exactly."""
    int8 = _compile(SMALL, "4x2", OptimConfig(warmup_steps=0, compression="int8"))
    assert _plain_bytes(int8) / int8.data_bytes() >= 3.8  # 3.89: two flat groups (split, replicated), each padded to 4 x 256
    assert int8.data_bytes() * 2 < sum(collective_bytes(int8.hlo, int8.mesh).values())  # the tensor groups carry the rest
    state, losses = int8.run(2)
    assert losses[1] < losses[0]
    residual = state.opt_state[0].residual.value
    assert residual["blocks"]["mlp"]["w_gate_DF"].sharding.spec == P("data", None, None, "tensor")
    assert float(jnp.abs(residual["blocks"]["mlp"]["w_gate_DF"]).max()) > 0
    manager = checkpoint.checkpoint_manager(tmp_path, keep=1)
    checkpoint.save(manager, 2, state)
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, 2, int8.abstract)
    manager.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    # Training on from the restored state is training on from the saved one.
    after, _ = int8.step(jax.tree.map(lambda x: x.copy(), state), int8.batches[2])
    after_restored, _ = int8.step(restored, int8.batches[2])
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(after_restored)):
        np.testing.assert_array_equal(a, b)
    # PowerSGD's factors are all-reduced over data; the compiler partitions its matmuls over tensor.
    powersgd = _compile(SMALL, "4x2", OptimConfig(warmup_steps=0, compression="powersgd", powersgd_rank=2, powersgd_vocab=True))
    assert _plain_bytes(powersgd) / powersgd.data_bytes() >= 10
    _, losses = powersgd.run(2)
    assert losses[1] < losses[0]


# --------------------------------------------------------------------------- DiLoCo


def test_diloco_h1_with_outer_sgd_lr1_is_synchronous_training(small_sgd):
    """H=1, inner SGD, outer SGD at learning rate 1: each step is the synchronous step from the same params, up to rounding.

    Step by step: the synchronous program steps from DiLoCo's outer params (after a sync every replica holds
    them, and SGD keeps no other state), so each comparison is one step from identical inputs.
    """
    sync = small_sgd["plain"]
    local = _compile(SMALL, "8", OptimConfig(**LINEAR_SGD, outer="diloco", sync_every=1, outer_learning_rate=1.0, outer_momentum=0.0))
    n_fwd, n_bwd = _chains(SMALL, extra=8)  # + the mean over 8 replicas
    state = local.fresh()
    for i in range(3):
        as_sync = dataclasses.replace(sync.fresh(), step=state.step.copy(), params=_copy(state.params))
        want, want_metrics = sync.step(as_sync, sync.batches[i])
        before = jax.device_get(state.params)
        state, metrics = local.step(state, local.batches[i])
        assert_close(np.mean(metrics["loss"]), want_metrics["loss"], n_fwd, err_msg=f"step {i} loss")
        # DiLoCo rounds each replica's step at the params' scale, then takes the delta and the outer step: 4 more roundings.
        assert_steps_close(state.params, want.params, before, n_bwd, roundings=8)


def test_diloco_communicates_every_h_steps_only():
    c = _compile(SMALL, "8", OptimConfig(warmup_steps=0, outer="diloco", sync_every=4))
    assert c.data_bytes(conditional=False) == 0  # the inner steps: no collective over data at all
    n_params = SMALL.num_params()
    assert c.data_bytes(conditional=True) == pytest.approx(n_params * 4 * 2 * 7 / 8, rel=1e-3)  # one f32 all-reduce of the delta
    state, outer0 = c.fresh(), None
    outer0 = jax.device_get(state.params)
    for i in range(4):
        state, _ = c.step(state, c.batches[i % 3])
        replicas = state.opt_state.replica.value[0]["lm_head_DV"]
        if i < 3:
            assert _max_diff(state.params, outer0) == 0  # the outer params wait for the sync
            assert not np.array_equal(np.asarray(replicas[0]), np.asarray(replicas[1]))  # replicas drift apart
        else:
            assert _max_diff(state.params, outer0) > 0
            np.testing.assert_array_equal(replicas[0], replicas[7])  # every replica restarts from the new outer params
            np.testing.assert_array_equal(replicas[0], state.params["lm_head_DV"])


def test_post_local_diloco_through_the_loop_with_accumulation_on_4x2(tmp_path, text_dir):
    from jaxbig.train.loop import train
    from jaxbig.checkpoint.run import load_params

    overrides = [
        "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
        "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=32", "data.val_fraction=0.2", f"data.paths={text_dir}",
        "train.batch_size=16", "train.steps=8", "train.log_every=4", "train.eval_every=4", "train.eval_batches=1",
        f"train.run_dir={tmp_path / 'run'}", "optim.warmup_steps=2", "optim.outer=diloco", "optim.sync_every=4",
        "optim.accumulate_steps=2", "optim.local_start_step=4", "mesh.data=4", "mesh.tensor=2",
    ]  # fmt: skip
    summary = train(load_config(None, overrides), progress=False)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    _, _, params, step = load_params(tmp_path / "run")
    assert step == 8 and params["lm_head_DV"].shape == (64, 256)


# --------------------------------------------------------------------------- wrong combinations


def test_wrong_combinations_fail_with_a_clear_message():
    cfg = load_config(None, ["optim.compression=powersgd", "optim.powersgd_rank=200", "train.steps=8", "optim.warmup_steps=0"])
    mesh = make_mesh(MeshConfig(data=8))
    tx, _ = optimizer_for(cfg, dict(mesh.shape))
    with pytest.raises(CompressionError, match=r"PowerSGD rank 200 exceeds the smaller side of the 128x128 gradient matrix \(\['blocks'\]\['attn'\]\['wk_DNK'\] as 4 x 128x128\).*powersgd_rank <= 128"):
        init_train_state(cfg.model, tx, mesh, seed=0)
    diloco = load_config(None, ["optim.outer=diloco", "train.steps=8", "optim.warmup_steps=0"])
    with pytest.raises(ConfigError, match=r"optim.outer=diloco works over the data axis, but the mesh has data=1.*>= 2 data replicas"):
        optimizer_for(diloco, {"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 8})
    int8 = load_config(None, ["optim.compression=int8"])
    with pytest.raises(ConfigError, match="optim.compression=int8 with mesh fsdp=2"):
        optimizer_for(int8, {"data": 4, "pipeline": 1, "fsdp": 2, "tensor": 1})
    accumulate = load_config(None, ["optim.accumulate_steps=4", "train.batch_size=16"])
    with pytest.raises(ConfigError, match=r"16 / optim.accumulate_steps=4 = 4 sequences per microbatch, not divisible by data x fsdp = 8"):
        optimizer_for(accumulate, {"data": 8, "pipeline": 1, "fsdp": 1, "tensor": 1})
    tx = compression.int8(num_replicas=2)
    grads = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="inside jax.shard_map over 'data'"):
        tx.update(grads, tx.init(grads))


# --------------------------------------------------------------------------- warm-up phases: exact first, then compressed / local


def test_compression_start_step_is_exact_then_plain_powersgd(small_sgd):
    """Before optim.compression_start_step the step is the `none` step, the compressor's state untouched; from it on,
    the step is plain PowerSGD's from that state. The compiled step holds both paths' bytes.

    Three programs: each comparison is one step from the same state (SGD keeps no other), within rounding."""
    psgd = dict(LINEAR_SGD, compression="powersgd", powersgd_rank=2)
    warm = _compile(SMALL, "8", OptimConfig(**psgd, compression_start_step=2))
    none = small_sgd["none"]
    plain = _compile(SMALL, "8", OptimConfig(**psgd))
    # The bytes: both branches are in one conditional; the exact one equals `none`, the other plain PowerSGD.
    assert warm.data_bytes(conditional=False) == 0
    assert warm.data_bytes(conditional=True) == pytest.approx(none.data_bytes() + plain.data_bytes(), rel=1e-6)
    assert none.data_bytes() / plain.data_bytes() >= 2.8  # the embedding and head, 44% of this model's params, go exact
    n_fwd, n_bwd = _chains(SMALL, extra=8)
    # PowerSGD adds P = M Q, P's Gram-Schmidt, Q = M^T P and P Q^T: sums over each side of the largest matrix (128 x 64).
    n_psgd = n_bwd + 3 * (SMALL.d_ff + SMALL.d_model)
    # Before the start step: the none step, and the compressor's state as init left it.
    w = warm.fresh()
    for i in range(2):
        n, n_metrics = none.step(dataclasses.replace(none.fresh(), step=w.step.copy(), params=_copy(w.params)), none.batches[i])
        before = jax.device_get(w.params)
        w, w_metrics = warm.step(w, warm.batches[i])
        assert_close(np.mean(w_metrics["loss"]), np.mean(n_metrics["loss"]), n_fwd, err_msg=f"step {i} loss")
        assert_steps_close(w.params, n.params, before, n_bwd)
    switch = w.opt_state[0]
    assert int(switch.count) == 2
    for a, b in zip(jax.tree.leaves(switch.inner), jax.tree.leaves(warm.state.opt_state[0].inner)):
        np.testing.assert_array_equal(a, b)  # passed through untouched: zero residuals, the initial Q
    # From the start step on: plain PowerSGD from that state (its compressor state is the warm-up's inner state).
    for i in range(2, 4):
        as_plain = _copy(dataclasses.replace(w, opt_state=(w.opt_state[0].inner, *w.opt_state[1:])))
        p, p_metrics = plain.step(as_plain, plain.batches[i % 3])
        before = jax.device_get(w.params)
        w, w_metrics = warm.step(w, warm.batches[i % 3])
        assert_close(np.mean(w_metrics["loss"]), np.mean(p_metrics["loss"]), n_fwd, err_msg=f"step {i} loss")
        assert_steps_close(w.params, p.params, before, n_psgd)
        assert_trees_close(w.opt_state[0].inner, p.opt_state[0], n_psgd)
    assert int(w.opt_state[0].count) == 4
    residual = w.opt_state[0].inner.residual.value
    assert float(jnp.abs(residual["blocks"]["mlp"]["w_up_DF"]).max()) > 0  # error feedback has begun
    assert float(jnp.abs(residual["lm_head_DV"]).max()) == 0  # the vocab weights go exact (optim.powersgd_vocab=false)


def test_diloco_local_start_step_is_synchronous_then_plain_diloco():
    """Post-local SGD: synchronous steps before optim.local_start_step (the replicas' mean gradient, replicas kept at the
    outer params), then DiLoCo as if started from that model and optimizer state.

    Three programs, each comparison one step from the same state, within rounding. The inner optimizer is SGD with
    momentum: linear in the gradients, and with a state of its own for the synchronous phase to hand over."""
    base = dict(LINEAR_SGD, momentum=0.9)
    post = _compile(SMALL, "8", OptimConfig(**base, outer="diloco", sync_every=2, local_start_step=2))
    sync = _compile(SMALL, "8", OptimConfig(**base))
    local = _compile(SMALL, "8", OptimConfig(**base, outer="diloco", sync_every=2))
    n_params = SMALL.num_params()
    assert post.data_bytes(conditional=False) == 0
    assert post.data_bytes(conditional=True) == pytest.approx(2 * n_params * 4 * 2 * 7 / 8, rel=1e-3)  # the mean gradient + the delta
    assert local.data_bytes(conditional=True) == pytest.approx(n_params * 4 * 2 * 7 / 8, rel=1e-3)
    n_fwd, n_bwd = _chains(SMALL, extra=8)  # + the mean over 8 replicas
    a = post.fresh()
    for i in range(2):
        as_sync = _copy(dataclasses.replace(sync.fresh(), step=a.step, params=a.params, opt_state=a.opt_state.sync))
        s, s_metrics = sync.step(as_sync, sync.batches[i])
        before = jax.device_get(a.params)
        a, a_metrics = post.step(a, post.batches[i])
        assert_close(np.mean(a_metrics["loss"]), np.mean(s_metrics["loss"]), n_fwd, err_msg=f"step {i} loss")
        assert_steps_close(a.params, s.params, before, n_bwd)  # synchronous training
        assert_trees_close(a.opt_state.sync, s.opt_state, n_bwd)  # the inner optimizer state is the synchronous one
        replicas = a.opt_state.replica.value[0]
        for name in ("lm_head_DV", "embed_VD"):  # copies of one value, in one program: exact
            np.testing.assert_array_equal(replicas[name][0], replicas[name][7])
            np.testing.assert_array_equal(replicas[name][0], a.params[name])
    # From the start step on: DiLoCo started from that state.
    outer = jax.device_get(a.params)
    for i in range(2, 4):
        as_local = _copy(dataclasses.replace(a, opt_state=a.opt_state._replace(sync=optax.EmptyState())))
        b, b_metrics = local.step(as_local, local.batches[i % 3])
        before = jax.device_get((a.params, a.opt_state.replica.value))
        a, a_metrics = post.step(a, post.batches[i % 3])
        assert_close(np.mean(a_metrics["loss"]), np.mean(b_metrics["loss"]), n_fwd, err_msg=f"step {i} loss")
        (replica_params, replica_state), (b_params, b_state) = a.opt_state.replica.value, b.opt_state.replica.value
        if i == 2:
            assert _max_diff(a.params, outer) == 0  # the outer params wait for the sync
            assert_steps_close(replica_params, b_params, before[1][0], n_bwd)  # each replica's own inner step
            assert_trees_close(replica_state, b_state, n_bwd)
        else:  # the sync: each replica's delta, their mean, the outer step; 4 roundings at the params' scale more
            assert_steps_close(a.params, b.params, before[0], n_bwd, roundings=8)
            assert_trees_close(a.opt_state.replica.value, b.opt_state.replica.value, n_bwd)
    assert _max_diff(a.params, outer) > 0


def test_warmup_phases_fail_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"optim.compression_start_step=300 is not before train.steps=300, so it would never take effect"):
        Config(optim=OptimConfig(compression="powersgd", compression_start_step=300), train=TrainConfig(steps=300))
    with pytest.raises(ConfigError, match=r"optim.compression_start_step=10 delays compression, but optim.compression=none"):
        OptimConfig(compression_start_step=10)
    with pytest.raises(ConfigError, match=r"optim.local_start_step=12 is not a multiple of optim.sync_every=8.*use 8 or 16"):
        OptimConfig(outer="diloco", local_start_step=12)
    with pytest.raises(ConfigError, match=r"optim.local_start_step=8 delays DiLoCo's local steps, but optim.outer='none'"):
        OptimConfig(local_start_step=8)
    with pytest.raises(ConfigError, match=r"optim.local_start_step=64 is not before train.steps=64"):
        Config(optim=OptimConfig(outer="diloco", local_start_step=64), train=TrainConfig(steps=64))
