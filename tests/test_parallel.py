"""Sharded == unsharded: loss, gradients and one update agree across meshes; params land where the rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbig.config import MeshConfig, ModelConfig, OptimConfig
from jaxbig.data.pipeline import batch_sharding
from jaxbig.optim import build_optimizer
from jaxbig.parallel.mesh import make_mesh, parse_mesh_spec
from jaxbig.parallel.rules import logical_to_spec
from jaxbig.train.state import init_train_state
from jaxbig.train.step import jit_train_step, loss_fn, make_train_step
from tests.numerics import LINEAR_SGD, assert_close, assert_steps_close, assert_trees_close, backward_chain, forward_chain

CFG = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)
B, T = 8, 32


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=(B, T + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _run(spec: str | None):
    """Loss, grads and updated params after one step on the mesh `spec` (None = one device)."""
    if spec is None:
        mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    else:
        mesh = make_mesh(MeshConfig(**parse_mesh_spec(spec)), spec=spec)
    tx, schedule = build_optimizer(OptimConfig(**LINEAR_SGD), total_steps=10)  # linear in the gradient (tests/numerics.py)
    inputs, targets = _batch()
    with jax.set_mesh(mesh):
        graphdef, state, shardings, _ = init_train_state(CFG, tx, mesh, seed=0)
        bs = batch_sharding(mesh, B, T)
        batch = {"inputs": jax.device_put(inputs, bs), "targets": jax.device_put(targets, bs)}
        grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
        loss, grads = grad_fn(state.params, graphdef, batch)
        loss, grads, initial = jax.device_get((loss, grads, state.params))
        step = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, bs)
        state, _ = step(state, batch)
        params = jax.device_get(state.params)
    return float(loss), grads, (initial, params)


def _check_matches(run, reference):
    """Another mesh is another program: loss, gradients and the step agree within float32 rounding (tests/numerics.py)."""
    (loss, grads, (initial, params)), (ref_loss, ref_grads, (_, ref_params)) = run, reference
    n_fwd, n_bwd = forward_chain(CFG, B, T) + 8, backward_chain(CFG, B, T) + 8  # + the all-reduces over up to 8 devices
    assert_close(loss, ref_loss, n_fwd, err_msg="loss")
    assert_trees_close(grads, ref_grads, n_bwd)
    # From each mesh's own initial params (the same draw, its elementwise transform compiled for that mesh).
    assert_steps_close(params, ref_params, initial, n_bwd)


@pytest.fixture(scope="module")
def reference():
    return _run(None)


@pytest.mark.parametrize("spec", ["1x1", "4x2", "data=2,fsdp=2,tensor=2", "fsdp=8"])
def test_sharded_step_matches_single_device(spec, reference):
    _check_matches(_run(spec), reference)


def test_params_land_where_the_rules_say():
    spec = "data=2,fsdp=2,tensor=2"
    mesh = make_mesh(MeshConfig(**parse_mesh_spec(spec)))
    tx, _ = build_optimizer(OptimConfig(warmup_steps=0), total_steps=10)
    with jax.set_mesh(mesh):
        _, state, _, _ = init_train_state(CFG, tx, mesh, seed=0)
    p = state.params
    expected = {
        ("embed_VD",): P("tensor", "fsdp"),
        ("lm_head_DV",): P("fsdp", "tensor"),
        ("blocks", "attn", "wq_DHK"): P(None, "fsdp", "tensor"),
        ("blocks", "attn", "wk_DNK"): P(None, "fsdp", "tensor"),
        ("blocks", "attn", "wo_HKD"): P(None, "tensor", None, "fsdp"),
        ("blocks", "mlp", "w_gate_DF"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "w_down_FD"): P(None, "tensor", "fsdp"),
        ("blocks", "attn_norm", "scale"): P(),
        ("final_norm", "scale"): P(),
    }
    for path, spec_ in expected.items():
        leaf = p
        for k in path:
            leaf = leaf[k]
        assert leaf.sharding.spec == spec_, path
    # Adam moments follow their params (ZeRO-3: optimizer state sharded like the params).
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert adam.mu["blocks"]["attn"]["wq_DHK"].sharding.spec == P(None, "fsdp", "tensor")
    assert adam.nu["embed_VD"].sharding.spec == P("tensor", "fsdp")


def test_logical_to_spec_rules():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("activation_batch", "activation_length"), (8, 32), mesh) == P(("data", "fsdp"))
    assert logical_to_spec(("activation_batch", "activation_length"), (2, 32), mesh) == P("data")  # 2 rows: fsdp no longer divides
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp")  # 1 KV head: replicated over tensor
    assert logical_to_spec(("embed", "mlp"), (64, 128), {"data": 8, "fsdp": 1, "tensor": 1}) == P()  # size-1 axes dropped
    assert logical_to_spec(("heads", "mlp"), (4, 128), mesh) == P("tensor")  # a mesh axis is used once per array
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (4, 4), mesh)


def test_tensor_parallel_step_all_reduces_over_tensor_groups():
    """Megatron: the forward/backward all-reduces run inside the tensor groups of the 4x2 mesh."""
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    tx, schedule = build_optimizer(OptimConfig(warmup_steps=0), total_steps=10)
    inputs, targets = _batch()
    with jax.set_mesh(mesh):
        graphdef, state, shardings, _ = init_train_state(CFG, tx, mesh, seed=0)
        bs = batch_sharding(mesh, B, T)
        batch = {"inputs": jax.device_put(inputs, bs), "targets": jax.device_put(targets, bs)}
        hlo = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, bs).lower(state, batch).compile().as_text()
    assert "all-reduce" in hlo
    # Tensor groups pair neighbouring devices: {0,1},{2,3},... (printed explicitly or in iota form).
    assert "{0,1},{2,3},{4,5},{6,7}" in hlo or "[4,2]<=[8]" in hlo


def test_constrain_is_noop_without_mesh():
    from jaxbig.parallel.rules import constrain

    x = jnp.ones((4, 8))
    assert constrain(x, ("activation_batch", "activation_embed")) is x


def test_constrain_traces_nothing_on_one_device_and_constrains_on_a_mesh():
    """On one device a constraint has nothing to say, and tracing one changed XLA:CPU's schedule of the step
    (tests/test_handwritten.py); on a mesh with an axis to split over, the constraint is in the program."""
    from jaxbig.parallel.rules import constrain

    def lowered(mesh):
        with jax.set_mesh(mesh):
            return jax.jit(lambda x: constrain(x * 2, ("activation_batch", "activation_embed"))).lower(jnp.ones((8, 8))).as_text()

    assert "sharding_constraint" not in lowered(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    assert "sharding_constraint" in lowered(make_mesh(MeshConfig(data=8)))


def test_collective_bytes_reads_kind_size_and_axes_from_compiled_hlo():
    from jax.sharding import NamedSharding

    from jaxbig.parallel.hlo import collective_bytes, parse_collectives

    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    x = jax.device_put(jnp.ones((1024, 256)), NamedSharding(mesh, P("data")))
    gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
    (c,) = parse_collectives(gather, mesh)
    assert (c.kind, c.result_bytes, c.group_size, c.axes) == ("all-gather", 1024 * 256 * 4, 4, ("data",))
    assert collective_bytes(gather, mesh, over="data")["all-gather"] == 1024 * 256 * 4 * 3 / 4
    assert collective_bytes(gather, mesh, over="tensor")["all-gather"] == 0
    y = jax.device_put(jnp.ones((1024, 256)), NamedSharding(mesh, P("tensor")))
    reduce = jax.jit(lambda y: y.sum(0), out_shardings=NamedSharding(mesh, P())).lower(y).compile().as_text()
    assert collective_bytes(reduce, mesh, over="tensor")["all-reduce"] == 256 * 4 * 2 * (2 - 1) / 2


def test_sequence_parallel_matches_single_device_and_splits_the_residual_stream(reference):
    """Megatron SP: same numbers; the residual stream is gathered over tensor before the column-parallel matmuls."""
    from jaxbig.parallel.hlo import parse_collectives
    from jaxbig.parallel.rules import rules_for, use_rules

    with use_rules(rules_for(sequence_parallel=True)):
        _check_matches(_run("4x2"), reference)

    def tensor_gathers(sequence_parallel: bool) -> int:
        mesh = make_mesh(MeshConfig(data=4, tensor=2))
        tx, schedule = build_optimizer(OptimConfig(warmup_steps=0), total_steps=10)
        inputs, targets = _batch()
        with jax.set_mesh(mesh), use_rules(rules_for(sequence_parallel)):
            graphdef, state, shardings, _ = init_train_state(CFG, tx, mesh, seed=0)
            bs = batch_sharding(mesh, B, T)
            batch = {"inputs": jax.device_put(inputs, bs), "targets": jax.device_put(targets, bs)}
            hlo = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, bs).lower(state, batch).compile().as_text()
        return sum(c.count for c in parse_collectives(hlo, mesh) if c.kind == "all-gather" and c.axes == ("tensor",))

    assert tensor_gathers(True) > tensor_gathers(False)
