"""Pruning: exact N:M groups and magnitude counts, the cubic schedule, masks that keep pruned weights
at exactly zero through optimizer updates, a checkpoint round trip and resume, and int8 export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbig import checkpoint
from jaxbig.compress.prune import PrunePlan, magnitude_masks, masks_of, nm_mask, path_str, prune_updates, sparsity_by_layer, sparsity_table
from jaxbig.config import ConfigError, load_config
from jaxbig.optim import optimizer_for
from jaxbig.parallel.mesh import make_mesh
from jaxbig.train.state import abstract_train_state
from conftest import TINY_MODEL  # the shared tiny model and batch (tests/conftest.py)
from tests.numerics import U32, assert_within, tolerance

SMALL = [
    *TINY_MODEL,
    "data.val_fraction=0.2",
    "train.log_every=4",
    "train.eval_every=4",
    "train.eval_batches=1",
    "optim.warmup_steps=2",
]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "blocks": {
            "attn": {"wq_DHK": rng.normal(size=(2, 8, 4, 4)), "wo_HKD": rng.normal(size=(2, 4, 4, 8))},
            "mlp": {"w_down_FD": rng.normal(size=(2, 12, 8))},
            "attn_norm": {"scale": np.ones((2, 8))},
        },
        "embed_VD": rng.normal(size=(16, 8)),
    }


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _groups(mask, axis, m):
    moved = np.moveaxis(np.asarray(mask), axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
def test_nm_masks_keep_exactly_n_of_every_m_along_the_contracted_axis(n, m):
    w = np.random.default_rng(0).normal(size=(2, 16, 3, 8)).astype(np.float32)
    w[0, :4, 0, 0] = 0.5  # a group of ties: still exactly n kept
    w[1, 4:8, 1, 1] = 0.0  # a group of zeros: likewise
    for axis in (1, 3):
        mask = np.asarray(nm_mask(jnp.asarray(w), n, m, axis))
        groups = _groups(mask, axis, m)
        assert mask.dtype == np.bool_ and (groups.sum(-1) == n).all()
        # the kept ones are the largest |w| of their group
        vals = _groups(np.abs(w), axis, m)
        kept_min = np.where(groups, vals, np.inf).min(-1)
        dropped_max = np.where(groups, -np.inf, vals).max(-1)
        assert (kept_min >= dropped_max).all()


def test_nm_plan_uses_each_weights_contracted_axis_and_refuses_indivisible_sizes():
    plan = PrunePlan(method="nm", include=(r"blocks/attn/w.*", r"blocks/mlp/w.*"))
    state = prune_updates(plan).init(_f32(_params()))
    masks = state.masks
    assert set(masks["blocks"]) == {"attn", "mlp"} and "embed_VD" not in masks  # only the included weights
    for path, axis in [("attn/wq_DHK", 1), ("attn/wo_HKD", 2), ("mlp/w_down_FD", 1)]:  # D, K (of H·K), F
        assert plan.group_axis("blocks/" + path, 4 if "attn" in path else 3) == axis
    new = prune_updates(plan).update(jax.tree.map(jnp.zeros_like, _f32(_params())), state, _f32(_params()))[1].masks
    assert (_groups(new["blocks"]["attn"]["wo_HKD"], 2, 4).sum(-1) == 2).all()
    bad = PrunePlan(method="nm", m=8, include=(r"blocks/mlp/w.*",))  # F = 12 is not a multiple of 8
    with pytest.raises(ConfigError, match=r"blocks/mlp/w_down_FD has 12 entries along its contracted axis 1.*not a multiple of prune.m=8"):
        prune_updates(bad).init(_f32(_params()))
    with pytest.raises(ConfigError, match=r"prune.include=\['nothing'\] matches no param; params are: blocks/attn/wo_HKD, blocks/attn/wq_DHK"):
        prune_updates(PrunePlan(method="magnitude", include=("nothing",))).init(_f32(_params()))


def test_magnitude_masks_prune_exact_counts_per_layer_or_globally():
    blocks = _f32(_params())["blocks"]
    weights = {"blocks": {"attn": blocks["attn"], "mlp": blocks["mlp"]}}  # as `select` gives them: full paths, [L, ...] blocks
    layer = magnitude_masks(weights, jnp.float32(0.3), "layer")
    for path, mask in [(path_str(p), m) for p, m in jax.tree_util.tree_flatten_with_path(layer)[0]]:
        per_layer = np.asarray(mask).reshape(2, -1)
        n = per_layer.shape[1]
        assert (per_layer.sum(1) == n - int(np.floor(0.3 * n))).all(), path
    glob = magnitude_masks(weights, jnp.float32(0.3), "global")
    w_all = np.concatenate([np.abs(np.asarray(w)).ravel() for w in jax.tree.leaves(weights)])
    m_all = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(glob)])
    assert (~m_all).sum() == int(np.floor(0.3 * w_all.size))
    assert w_all[~m_all].max() <= w_all[m_all].min()  # one threshold over all weights
    assert len({float(np.mean(np.asarray(m))) for m in jax.tree.leaves(glob)}) > 1  # so per-weight sparsity differs


def test_cubic_schedule_and_update_steps():
    plan = PrunePlan(method="magnitude", sparsity=0.8, initial_sparsity=0.2, start_step=10, end_step=20, update_every=5)
    s = [float(plan.sparsity_at(jnp.int32(t))) for t in (0, 10, 15, 20, 30)]
    np.testing.assert_allclose(s, [0.2, 0.2, 0.8 - 0.6 * 0.5**3, 0.8, 0.8], rtol=1e-6)
    assert [t for t in range(40) if plan.is_update_step(jnp.int32(t))] == [10, 15, 20]


def test_masks_keep_pruned_weights_exactly_zero_through_optimizer_updates():
    """adamw -> prune vs plain adamw on the same gradients: pruned entries are exactly 0.0 after
    every update (Adam's moments would move them), kept entries are updated as without pruning.

    The two chains are two compiled programs: the clipping's global norm (a sum over all n gradient entries) may
    round differently in each, within gamma_n (tests/numerics.py). Adam's update m / (sqrt(v) + eps) does not
    change when the gradients are scaled (here |g| >> eps), so the kept entries' updates agree to that relative
    rounding of lr, and the params to a few units of their own roundoff."""
    cfg = load_config(
        None, SMALL + ["prune.method=magnitude", "prune.sparsity=0.6", "prune.start_step=2", "prune.end_step=6", "prune.update_every=2"]
    )
    tx, _ = optimizer_for(cfg, {"data": 1})  # the run's chain: clip -> adamw (schedule, decay mask) -> prune
    plain, _ = optimizer_for(load_config(None, SMALL), {"data": 1})  # the same without pruning
    params = _f32(_params())
    state, plain_state = tx.init(params), plain.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    sparsities = []
    lr = cfg.optim.learning_rate
    n = sum(x.size for x in jax.tree.leaves(params))  # the clipping's norm sums every gradient entry

    def close(w, want, err_msg):
        assert_within(w, want, tolerance(n, lr) + 4 * U32 * float(np.abs(want).max()), err_msg)

    for t in range(10):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = step(grads, state, params)
        plain_updates, plain_state = jax.jit(plain.update)(grads, plain_state, params)
        masks = masks_of(state)
        new, new_plain = optax.apply_updates(params, updates), optax.apply_updates(params, plain_updates)
        flat_masks = {path_str(p): np.asarray(m) for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
        flat_new = {path_str(p): np.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(new)[0]}
        flat_plain = {path_str(p): np.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(new_plain)[0]}
        for path, w in flat_new.items():
            if path in flat_masks:
                keep = flat_masks[path]
                assert (w[~keep] == 0.0).all() and not np.signbit(w[~keep]).any(), (t, path)
                close(w[keep], flat_plain[path][keep], f"{t} {path}")
            else:  # not pruned (norms, embedding): the plain update
                close(w, flat_plain[path], f"{t} {path}")
        sparsities.append(1 - np.mean(np.concatenate([m.ravel() for m in flat_masks.values()])))
        params = new  # both continue from the pruned weights
    # updates 2, 4, 6 follow the cubic ramp from initial_sparsity 0 at step 2 to 0.6 at step 6; fixed after
    # (per layer: floor(s·n) of each weight's n = 128, 128, 96 entries)
    def pruned(s):
        return (2 * np.floor(s * 128) + np.floor(s * 96)) / (2 * 128 + 96)

    expected = [0, 0, 0, 0] + [pruned(0.6 - 0.6 * 0.5**3)] * 2 + [pruned(0.6)] * 4
    np.testing.assert_allclose(sparsities, expected, rtol=1e-12)


def _flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, text_dir):
    return tmp_path_factory.mktemp("pruned") / "r"


def test_training_keeps_zeros_through_a_checkpoint_round_trip_and_resume(pruned_run, text_dir):
    """Train to step 6 (masks fixed at step 4), stop; the checkpoint restores the masks (bool, exact);
    resuming to step 10 keeps every pruned weight at exactly zero; the summary reports the sparsity."""
    from jaxbig.train.loop import train

    run_dir = pruned_run
    cfg = load_config(
        None,
        SMALL
        + [f"train.run_dir={run_dir}", f"data.paths={text_dir}", "train.steps=10", "train.checkpoint_every=6",
           "prune.method=nm", "prune.start_step=2", "prune.end_step=4", "prune.update_every=2", "mesh.data=4", "mesh.fsdp=2"],
    )
    train(cfg, progress=False, stop_after=6)
    mesh = make_mesh(cfg.mesh)
    tx, _ = optimizer_for(cfg, dict(mesh.shape))
    _, _, abstract = abstract_train_state(cfg.model, tx, mesh, cfg.train.seed)
    manager = checkpoint.checkpoint_manager(run_dir, 2, read_only=True)
    assert manager.all_steps() == [6]
    at6 = checkpoint.restore(manager, 6, abstract)
    masks6 = _flat(masks_of(at6.opt_state))
    assert masks6 and all(m.dtype == np.bool_ for m in masks6.values())
    assert set(masks6) == {p for p in _flat(at6.params) if p.startswith(("blocks/attn/w", "blocks/mlp/w"))}
    for path, keep in masks6.items():
        assert (_flat(at6.params)[path][~keep] == 0).all() and (_flat(at6.params)[path][keep] != 0).all()
        axis = 1 if "attn/wo" not in path else 2
        assert (_groups(keep, axis, 4).sum(-1) == 2).all(), path
    summary = train(cfg, progress=False)
    assert summary["start_step"] == 6
    manager = checkpoint.checkpoint_manager(run_dir, 2, read_only=True)
    at10 = checkpoint.restore(manager, 10, abstract)
    params10 = _flat(at10.params)
    assert not np.array_equal(params10["blocks/mlp/w_up_DF"], _flat(at6.params)["blocks/mlp/w_up_DF"])  # it trained on
    for path, keep in masks6.items():
        np.testing.assert_array_equal(_flat(masks_of(at10.opt_state))[path], keep)  # fixed after end_step
        assert (params10[path][~keep] == 0).all()
    report = json.loads((run_dir / "summary.json").read_text())["sparsity"]
    assert report["blocks/mlp/w_up_DF"]["layers"] == [0.5, 0.5] and report["embed_VD"]["sparsity"] == 0.0
    assert "blocks/attn_norm/scale" not in report  # vectors are not reported
    table = sparsity_table(report)
    assert "| blocks/mlp/w_up_DF | 2×64×128 | 50.0% | 50.0% | 50.0% |" in table


def test_sparsity_report_counts_zeros():
    flat = {"blocks/mlp/w_up_DF": np.array([[[0, 1], [2, 0]], [[0, 0], [0, 3]]], np.float32), "lm_head_DV": np.eye(2, dtype=np.float32)}
    report = sparsity_by_layer(flat)
    assert report["blocks/mlp/w_up_DF"]["layers"] == [0.5, 0.75] and report["blocks/mlp/w_up_DF"]["zeros"] == 5
    assert report["lm_head_DV"] == {"shape": [2, 2], "zeros": 2, "size": 4, "sparsity": 0.5}
    assert sparsity_table(report).splitlines()[-1] == "| all matrices | 12 weights | | | 58.3% |"


def test_prune_config_is_validated():
    with pytest.raises(ConfigError, match="prune.method='random': use one of none, magnitude, nm"):
        load_config(None, ["prune.method=random"])
    with pytest.raises(ConfigError, match=r"prune.n=4, prune.m=4: N:M sparsity keeps n of every m weights"):
        load_config(None, ["prune.n=4"])
    with pytest.raises(ConfigError, match=r"prune.end_step=400 exceeds train.steps=300"):
        load_config(None, ["prune.method=magnitude", "prune.end_step=400"])
    with pytest.raises(ConfigError, match=r"prune.method=nm runs on the standard train step only.*optim.compression='int8'"):
        load_config(None, ["prune.method=nm", "optim.compression=int8"])
    with pytest.raises(ConfigError, match=r"prune.end_step=3 is before prune.start_step=5"):
        load_config(None, ["prune.start_step=5", "prune.end_step=3"])


def test_pruned_run_exports_int8_with_its_zeros_and_reports_them(pruned_run, tmp_path):
    """Export composes with pruning: int8 codes are 0 exactly where the pruned weights are, and the
    manifest reports the per-layer sparsity of the float weights and of the stored codes."""
    from jaxbig.export.bundle import export_run
    from jaxbig.checkpoint.run import load_params

    out = export_run(pruned_run, tmp_path / "exports" / "pruned", 1, quantize="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    sparsity = manifest["sparsity"]
    assert sparsity["blocks/mlp/w_gate_DF"]["layers"] == [0.5, 0.5] and sparsity["lm_head_DV"]["sparsity"] == 0.0
    assert all(sparsity[p]["stored_sparsity"] >= 0.5 for p in sparsity if p.startswith("blocks/"))
    stored = np.load(out / "jax" / "params.npz")
    _, _, params, _ = load_params(pruned_run)
    for path, w in _flat(params).items():
        if path.startswith(("blocks/attn/w", "blocks/mlp/w")):
            q = stored[f"{path}.q"] if f"{path}.q" in stored.files else None
            assert q is not None and q.dtype == np.int8, (path, stored.files[:4])
            assert (q[w == 0] == 0).all()
