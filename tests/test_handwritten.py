"""The hand-written baseline in benchmarks/ computes what jaxbig computes, so the benchmark compares like with like."""

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

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
B, T = 2, 32


def _batch(vocab_size: int) -> dict[str, jax.Array]:
    tokens_BT = jax.random.randint(jax.random.key(1), (B, T + 1), 0, vocab_size, jnp.int32)
    return {"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:]}


def test_same_loss_and_same_train_step():
    # Grouped-query attention (2 query heads per KV head) and an untied head; warmup 0 so the
    # first step runs at the peak learning rate and really moves every param.
    cfg = load_config(TINY, ["model.num_layers=2", "model.num_kv_heads=2", "optim.warmup_steps=0"])
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
    batch = _batch(cfg.model.vocab_size)
    with jax.set_mesh(mesh):
        graphdef, state, shardings, _ = init_train_state(cfg.model, tx, mesh, seed=0)
        initial = jax.tree.map(jnp.copy, state.params)
        params = jax.tree.map(jnp.copy, state.params)  # jaxbig's step donates `state`
        ref_loss = jax.jit(loss_fn, static_argnums=1)(state.params, graphdef, batch)
        ref_state, ref_metrics = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, batch_sharding(mesh, B, T))(state, batch)

    loss = jax.jit(handwritten.loss_fn, static_argnums=1)(params, cfg.model, batch["inputs"], batch["targets"])
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)

    params, _, metrics = handwritten.make_step(cfg.model, tx)(params, tx.init(params), batch["inputs"], batch["targets"])
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert jax.tree.structure(params) == jax.tree.structure(ref_state.params)
    for (path, new), ref, old in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_state.params), jax.tree.leaves(initial)):
        name = jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(new - old))) > 1e-4, f"{name} did not move in one step"
        # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, gradients that agree to float
        # rounding (jaxbig's attention has its own backward, the hand-written step uses autodiff; the
        # grads agree to 1e-6, test below) move a param by slightly different fractions of lr.
        np.testing.assert_allclose(new, ref, atol=1e-2 * cfg.optim.learning_rate, rtol=0, err_msg=name)


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
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5), grads, ref_grads)
