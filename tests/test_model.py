"""Model properties: causality by gradients, KV-cache decoding equals the full forward, dtypes, remat, tying."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbig.config import ModelConfig
from jaxbig.models import abstract_model, create_model
from jaxbig.models.decode import generate, sample_logits
from jaxbig.models.llama import init_cache, rope_frequencies, rope_table
from tests.numerics import U_BF16, assert_close, assert_near_argmax, backward_chain, forward_chain, gamma, tolerance

CFG = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)


def _tokens(B=2, T=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, size=(B, T)), jnp.int32)


def test_no_gradient_flows_from_future_tokens():
    """d logits[t] / d embedding(token at s) is zero for every s > t and non-zero for s <= t."""
    cfg = dataclasses.replace(CFG, vocab_size=256)
    graphdef, params = nnx.split(create_model(cfg, 0))
    T = 12
    tokens_1T = jnp.arange(1, T + 1, dtype=jnp.int32)[None]  # token id i+1 appears only at position i

    def logits_at(params, t):
        return nnx.merge(graphdef, params)(tokens_1T)[0, t].sum()

    for t in (0, 5, T - 1):
        g_VD = jax.grad(logits_at)(params, t)["embed_VD"][...]
        row_norms_T = jnp.abs(g_VD[1 : T + 1]).sum(-1)
        assert jnp.all(row_norms_T[t + 1 :] == 0), f"position {t} sees the future"
        assert jnp.all(row_norms_T[: t + 1] > 0), f"position {t} ignores its past"


def test_kv_cache_decoding_matches_full_forward():
    model = create_model(CFG, 0)
    graphdef, params = nnx.split(model)
    prompt = _tokens(B=2, T=8)
    out_BN = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=12)
    full = jnp.concatenate([prompt, out_BN], axis=1)
    logits = model(full)
    # The decode loop and the full forward are two programs: each token is the greedy choice up to their rounding.
    n = forward_chain(CFG, 2, 20)
    assert_near_argmax(out_BN, logits[:, 7:-1], tolerance(n, float(jnp.abs(logits).max())), "greedy decoding")

    cache = init_cache(CFG, 2, 20)
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
    cached_logits, _ = model(full, positions, cache)
    assert_close(cached_logits, logits, n)


def test_generate_refuses_too_long_requests():
    graphdef, params = nnx.split(create_model(CFG, 0))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(graphdef, params, _tokens(1, 60), jax.random.key(0), max_new_tokens=10)


def test_sampling_respects_top_k_and_temperature():
    logits_BV = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 256))
    keys = jax.random.split(jax.random.key(0), 256)
    samples = jax.vmap(lambda k, l: sample_logits(l[None], k, jnp.float32(1.0), 2)[0])(keys, logits_BV)
    assert set(np.asarray(samples).tolist()) <= {2, 3}
    assert int(sample_logits(logits_BV[:1], keys[0], jnp.float32(0.0), 0)[0]) == 3  # greedy


def _bf16_roundings(cfg: ModelConfig) -> int:
    """Roundings to bfloat16 along the longest chain of jaxbig's bfloat16 forward (matmuls accumulate in float32).

    The embedding rows (1). Per layer: each RMSNorm's output, its scale and their product (3, twice); a weight cast and
    the output of the q, o, gate and down projections (2 each); RoPE's output, the probs and probs.v (1 each); SiLU
    (2: its exp and its quotient may each round) and its product with up (1); the two residual adds (1 each): 22. Then
    the final norm (3) and the head's weight (1; its output is float32).
    """
    return 1 + 22 * cfg.num_layers + 3 + 1


def test_bfloat16_compute_tracks_float32():
    """Logits in bfloat16 compute are within bfloat16 rounding of float32's (tests/numerics.py).

    Each rounding to bfloat16 moves a value by at most U_BF16 of it; along a chain of r of them through well-conditioned
    layers (a fresh init) the relative errors add to first order, gamma(r, U_BF16) of the logits' scale, and the
    float32 side's own rounding adds gamma(n) over the float32 chain. Measured here: 0.0041 on logits up to 0.61, well
    within the bound (0.14); a real fault in the bfloat16 path (a mask, a scale, a sign, a cast dropped before a sum)
    moves logits by their own size.
    """
    tokens = _tokens()
    f32 = create_model(CFG, 0)(tokens)
    bf16 = create_model(dataclasses.replace(CFG, dtype="bfloat16"), 0)(tokens)
    assert bf16.dtype == jnp.float32  # logits come back in float32 for the loss
    assert float(jnp.abs(bf16 - f32).max()) > 0  # the bfloat16 path did run
    scale = float(jnp.abs(f32).max())
    n = forward_chain(CFG, *tokens.shape)
    assert_close(bf16, f32, n, atol=gamma(_bf16_roundings(CFG), U_BF16) * scale, err_msg="bfloat16 vs float32 logits")


@pytest.mark.parametrize("remat", ["full", "minimal"])
def test_remat_gives_the_same_gradients(remat):
    tokens = _tokens()

    def loss(cfg):
        graphdef, params = nnx.split(create_model(cfg, 0))
        return jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).mean())(params)

    n = backward_chain(CFG, *tokens.shape)  # remat recomputes the forward in another program: rounding may differ
    for a, b in zip(jax.tree.leaves(loss(CFG)), jax.tree.leaves(loss(dataclasses.replace(CFG, remat=remat)))):
        assert_close(a, b, n)


@pytest.mark.parametrize("option", [{"attention": "dot_product"}, {"scan_layers": False}, {"fused_mlp": False}])
def test_speed_options_compute_the_same_model(option):
    """jax.nn.dot_product_attention, unrolled layers, separate gate/up matmuls: same logits and gradients, plain and packed rows."""
    tokens = _tokens(T=24)
    segments_BT = jnp.asarray([[0] * 9 + [1] * 15, [0] * 24], jnp.int32)
    positions_BT = jnp.asarray([list(range(9)) + list(range(15)), list(range(24))], jnp.int32)

    def grads_and_logits(cfg, **kw):
        graphdef, params = nnx.split(create_model(cfg, 0))
        return jax.value_and_grad(lambda p: (lambda l: (l.mean(), l))(nnx.merge(graphdef, p)(tokens, **kw)), has_aux=True)(params)

    n_fwd, n_bwd = forward_chain(CFG, *tokens.shape), backward_chain(CFG, *tokens.shape)
    for kw in ({}, {"positions_BT": positions_BT, "segment_ids_BT": segments_BT}):
        (_, want), want_g = grads_and_logits(CFG, **kw)
        (_, got), got_g = grads_and_logits(dataclasses.replace(CFG, **option), **kw)
        assert_close(got, want, n_fwd)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            assert_close(a, b, n_bwd)


def test_fused_mlp_runs_one_matmul_for_gate_and_up():
    """`model.fused_mlp` (the default) traces gate and up as one dot_general per layer, over the stacked [D, 2, F] weights."""
    tokens = _tokens()

    def dots(cfg):
        graphdef, params = nnx.split(create_model(dataclasses.replace(cfg, scan_layers=True), 0))
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params)
        return [str(e.outvars[0].aval.shape) for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]

    fused, separate = dots(CFG), dots(dataclasses.replace(CFG, fused_mlp=False))
    B, T = tokens.shape
    assert len(separate) - len(fused) == 1  # per layer (the scan body): gate and up became one
    assert str((B, T, 2, CFG.d_ff)) in fused and str((B, T, 2, CFG.d_ff)) not in separate


def test_rope_table_is_a_host_constant_with_default_positions():
    """Default positions: RoPE's sin/cos are a constant of the program (no sin/cos traced), equal to the traced table.

    Given positions (packed rows, decoding) still trace sin/cos. Tolerance: the constant is correctly rounded from the
    same float32 angles; XLA's float32 sin/cos are accurate to about 1 ulp. Both lie in [-1, 1], where an ulp is at
    most 2^-24, so 4 ulps (2^-22) bounds the difference whatever CPU XLA compiles for (measured here: 2^-24).
    """
    tokens = _tokens()
    B, T = tokens.shape
    graphdef, params = nnx.split(create_model(CFG, 0))

    def transcendentals(*args):
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens, *args))(params)
        return [e.primitive.name for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name in ("sin", "cos")]

    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    assert transcendentals() == []
    assert sorted(set(transcendentals(positions_BT))) == ["cos", "sin"]
    model = nnx.merge(graphdef, params)
    assert_close(model(tokens), model(tokens, positions_BT), forward_chain(CFG, B, T))  # one more rounding (sin/cos) is within the chain's

    inv_freq_k = rope_frequencies(CFG)
    positions_1T = np.arange(CFG.max_seq_len, dtype=np.int32)[None]
    for constant, traced in zip(rope_table(positions_1T, inv_freq_k), jax.jit(rope_table)(jnp.asarray(positions_1T), inv_freq_k)):
        assert isinstance(constant, jax.Array) and constant.shape == (1, CFG.max_seq_len, CFG.head_dim // 2)
        np.testing.assert_allclose(np.asarray(constant), np.asarray(traced), rtol=0, atol=2.0**-22)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in _sub_jaxprs(e.params):  # scan, remat and custom_vjp bodies
            yield from _all_eqns(sub)


def _sub_jaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def test_tied_embeddings_have_no_head_and_count():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    _, state = abstract_model(cfg)
    pure = nnx.to_pure_dict(state)
    assert "lm_head_DV" not in pure or pure["lm_head_DV"] is None
    n = sum(x.size for x in jax.tree.leaves(pure))
    assert n == cfg.num_params()
    assert create_model(cfg, 0)(_tokens()).shape == (2, 16, 256)


def test_param_count_matches_the_tree():
    _, state = abstract_model(CFG)
    assert sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state))) == CFG.num_params()


def test_params_carry_logical_axes_only():
    _, state = abstract_model(CFG)
    names = {n for spec in jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(state))) for n in spec if n}
    assert names <= {"layers", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "norm"}
    assert not names & {"data", "fsdp", "tensor"}


def _attention_inputs(heads: int, kv_heads: int, dtype, B: int, T: int, K: int, first_segment: int):
    """Random q [B, T, heads, K], k and v [B, T, kv_heads, K] in `dtype`, output weights w (float32) for a scalar loss,
    segment ids (row 0 packs two documents split at `first_segment`, row 1 is one) and the causal same-segment mask."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, heads, K)).astype(dtype)
    k, v = (jax.random.normal(kk, (B, T, kv_heads, K)).astype(dtype) for kk in keys[1:3])
    w = jax.random.normal(keys[3], (B, T, heads, K))
    segments_BT = jnp.asarray([[0] * first_segment + [1] * (T - first_segment), [0] * T])
    pos_T = jnp.arange(T)
    mask_BTS = (pos_T[None, :] <= pos_T[:, None])[None] & (segments_BT[:, :, None] == segments_BT[:, None, :])
    return q, k, v, w, segments_BT, mask_BTS


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a CUDA GPU (run with JAX_PLATFORMS=cuda; passed on an H200, docs/benchmarks.md)")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_attention_matches_attend_on_gpu(kv_heads):
    """`model.attention=dot_product` on a GPU in bfloat16 is cuDNN's fused attention (named: JAX's own default is XLA's),
    and gives `attend`'s outputs and gradients, causal and packed masks and grouped-query heads included."""
    from jaxbig.models.llama import Attention, attend, dot_product_kernel

    heads, B, T, K, dtype = 4, 2, 64, 64, jnp.bfloat16
    assert dot_product_kernel(jax.default_backend(), dtype, K) == "cudnn"
    q, k, v, w, segments_BT, mask_BTS = _attention_inputs(heads, kv_heads, dtype, B, T, K, first_segment=24)

    def fused(q, k, v):
        return Attention._dot_product(q, k, v, segments_BT, "cudnn")

    def mine(q, k, v):
        return attend(q, k, v, mask_BTS)

    assert "__cudnn$fmha" in jax.jit(fused).lower(q, k, v).compile().as_text()

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * w)

    # The bounds of test_attention_backward_matches_autodiff below, bfloat16 case: both sides sum in float32 and round
    # the probs and the output to bfloat16 (cuDNN's online softmax rescales in float32, within the float32 term).
    n_fwd = K + 2 * T
    out, out_ref = fused(q, k, v).astype(jnp.float32), mine(q, k, v).astype(jnp.float32)
    assert_close(out, out_ref, n_fwd, atol=2 * 2 * U_BF16 * float(jnp.abs(out_ref).max()))
    got = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(mine, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        assert_close(g.astype(jnp.float32), r.astype(jnp.float32), 2 * n_fwd + T, atol=2 * 4 * U_BF16 * scale, err_msg=name)


@pytest.mark.parametrize("heads,kv_heads,dtype", [(4, 4, jnp.float32), (4, 2, jnp.float32), (4, 2, jnp.bfloat16)])
def test_attention_backward_matches_autodiff(heads, kv_heads, dtype):
    """`attend`'s hand-written backward (no transposed [T, S] matrices) gives autodiff's gradients, masks included."""
    from jaxbig.models.llama import attend

    B, T, K = 2, 16, 8
    q, k, v, w, segments_BT, mask_BTS = _attention_inputs(heads, kv_heads, dtype, B, T, K, first_segment=6)

    def plain(q, k, v):  # the same attention, left to autodiff
        G = heads // kv_heads
        logits = jnp.einsum("BTNGK,BSNK->BNGTS", q.reshape(B, T, kv_heads, G, K), k, preferred_element_type=jnp.float32) * K**-0.5
        logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.einsum("BNGTS,BSNK->BTNGK", probs, v).reshape(B, T, heads, K)

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * w)

    # Tolerances (tests/numerics.py): float32 sums along q.k (K), the softmax and probs.v (T each); the backward runs
    # that chain back and sums over T once more. In bfloat16 each side also rounds the probs and its output to bfloat16
    # (the dots accumulate in float32), 2 units of bfloat16 roundoff of the scale per side in the forward and, with the
    # gradient of the probs and the gradients themselves, 4 in the backward.
    n_fwd = K + 2 * T
    bf16 = dtype == jnp.bfloat16
    out, out_ref = (x.astype(jnp.float32) for x in (attend(q, k, v, mask_BTS), plain(q, k, v)))
    scale = float(jnp.abs(out_ref).max())
    assert_close(out, out_ref, n_fwd, atol=2 * 2 * U_BF16 * scale if bf16 else 0.0)
    got = jax.grad(lambda *a: loss(lambda q, k, v: attend(q, k, v, mask_BTS), *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        assert g.dtype == r.dtype == dtype
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        assert_close(g.astype(jnp.float32), r.astype(jnp.float32), 2 * n_fwd + T, atol=2 * 4 * U_BF16 * scale if bf16 else 0.0, err_msg=name)
