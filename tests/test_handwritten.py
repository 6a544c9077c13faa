"""The hand-written baseline in benchmarks/ computes what jaxbig computes, so the benchmark compares like with like.

jaxbig's attention has its own backward and the hand-written step leaves it to autodiff: two differently
compiled programs, so they are compared within float32 rounding (tests/numerics.py), never bit for bit.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import handwritten
from jaxbig.config import MeshConfig, load_config
from jaxbig.data import batch_sharding
from jaxbig.models import abstract_model
from jaxbig.optim import build_optimizer
from jaxbig.parallel.mesh import make_mesh
from jaxbig.train.state import init_train_state
from jaxbig.train.step import jit_train_step, loss_fn, make_train_step
from tests.numerics import assert_close, assert_within, backward_chain, forward_chain, sgd_step_bound, tolerance

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
B, T = 2, 32


def _batch(vocab_size: int) -> dict[str, jax.Array]:
    tokens_BT = jax.random.randint(jax.random.key(1), (B, T + 1), 0, vocab_size, jnp.int32)
    return {"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:]}


def test_same_loss_grads_and_train_step():
    # Grouped-query attention (2 query heads per KV head) and an untied head. The step is SGD with weight decay
    # and no clipping: its update is linear in the gradient, so gradients that agree to rounding give params that
    # agree to lr times that (Adam's first step, lr * g / (|g| + eps), would multiply a rounding difference in a
    # near-zero gradient by up to 1 / eps = 1e8). Both sides apply the same optax transformation, so the choice of
    # optimizer is not what this compares; how each step gets its gradients and applies them is.
    cfg = load_config(
        TINY,
        ["model.num_layers=2", "model.num_kv_heads=2", "optim.optimizer=sgd", "optim.learning_rate=0.1",
         "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=0"],
    )  # fmt: skip
    lr, wd = cfg.optim.learning_rate, cfg.optim.weight_decay
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
    batch = _batch(cfg.model.vocab_size)
    with jax.set_mesh(mesh):
        graphdef, state, shardings, _ = init_train_state(cfg.model, tx, mesh, seed=0)
        initial = jax.device_get(state.params)
        params = jax.tree.map(jnp.copy, state.params)  # jaxbig's step donates `state`
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(state.params, graphdef, batch)
        ref_state, ref_metrics = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, batch_sharding(mesh, B, T))(state, batch)

    n_fwd, n_bwd = forward_chain(cfg.model, B, T), backward_chain(cfg.model, B, T)
    loss, grads = jax.jit(jax.value_and_grad(handwritten.loss_fn), static_argnums=1)(params, cfg.model, batch["inputs"], batch["targets"])
    assert_close(loss, ref_loss, n_fwd, err_msg="loss")
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    grad_tols = {}
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        name = jax.tree_util.keystr(path)
        assert_close(g, r, n_bwd, err_msg=name)
        grad_tols[name] = tolerance(n_bwd, float(jnp.abs(r).max()))

    # The like-for-like baseline (benchmarks/harness.py): the same model with jaxbig's attention op and backward.
    like = jax.jit(jax.value_and_grad(handwritten.loss_fn), static_argnums=(1, 4))(params, cfg.model, batch["inputs"], batch["targets"], True)
    assert_close(like[0], ref_loss, n_fwd, err_msg="like-for-like loss")
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(like[1]), jax.tree.leaves(ref_grads)):
        assert_close(g, r, n_bwd, err_msg=f"like-for-like {jax.tree_util.keystr(path)}")

    params, _, metrics = handwritten.make_step(cfg.model, tx)(params, tx.init(params), batch["inputs"], batch["targets"])
    assert_close(metrics["loss"], ref_metrics["loss"], n_fwd, err_msg="step loss")
    assert jax.tree.structure(params) == jax.tree.structure(ref_state.params)
    for (path, new), ref, old, g in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_state.params), jax.tree.leaves(initial), jax.tree.leaves(ref_grads)):
        name = jax.tree_util.keystr(path)
        p_max, u_max = float(np.abs(old).max()), float(np.abs(np.asarray(g) + wd * old).max())
        bound = sgd_step_bound(lr, grad_tols[name], p_max, u_max)
        moved = float(np.abs(np.asarray(ref) - old).max())
        assert moved > 100 * bound, f"{name} moved {moved:.3g} in one step: too little to tell the programs apart (bound {bound:.3g})"
        assert_within(new, ref, bound, name)


def test_same_loss_and_grads_with_tied_embeddings():
    cfg = load_config(TINY, ["model.num_layers=2", "model.tie_embeddings=true"]).model
    graphdef, abstract = abstract_model(cfg)
    # Any params of the right structure will do; numpy draws them without compiling an init.
    rng = np.random.default_rng(0)

    def draw(path, a):
        is_norm = "norm" in jax.tree_util.keystr(path)
        return jnp.asarray((1.0 if is_norm else 0.0) + (0.1 if is_norm else 0.02) * rng.standard_normal(a.shape), a.dtype)

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract))
    assert "lm_head_DV" not in params
    batch = _batch(cfg.vocab_size)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, graphdef, batch)
    loss, grads = jax.jit(jax.value_and_grad(handwritten.loss_fn), static_argnums=1)(params, cfg, batch["inputs"], batch["targets"])
    assert_close(loss, ref_loss, forward_chain(cfg, B, T), err_msg="loss")
    n_bwd = backward_chain(cfg, B, T)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, r, n_bwd, err_msg=jax.tree_util.keystr(path))
