"""Quantization rules: storage dtypes, per-channel scales, bounded rounding error; W8A8 dynamic einsum."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig.compress import dequantize, dynamic_int8_einsum, llama_rules, quantize_params
from jaxbig.compress.quantize import _absmax_scale, _to_int8
from jaxbig.models.llama import dense, use_dense


def _flat():
    rng = np.random.default_rng(0)
    return {
        "embed_VD": rng.normal(size=(16, 8)).astype(np.float32),
        "blocks/attn/wq_DHK": rng.normal(size=(2, 8, 4, 3)).astype(np.float32),
        "blocks/attn/wo_HKD": rng.normal(size=(2, 4, 3, 8)).astype(np.float32),
        "blocks/mlp/w_down_FD": rng.normal(size=(2, 12, 8)).astype(np.float32),
        "blocks/attn_norm/scale": np.ones((2, 8), np.float32),
    }


@pytest.mark.parametrize("method, dtype, step", [("int8", "int8", 1 / 254), ("fp8", "float8_e4m3fn", 1 / 16)])
def test_weight_only_quantization(method, dtype, step):
    flat = _flat()
    q = quantize_params(flat, method, llama_rules())
    assert list(q) == list(flat)
    assert set(q["blocks/attn_norm/scale"]) == {"w"}  # no rule: stays float32
    assert q["blocks/attn/wq_DHK"]["scale"].shape == (2, 1, 4, 3)  # one scale per layer, head, k (reduced over D)
    assert q["blocks/attn/wo_HKD"]["scale"].shape == (2, 1, 1, 8)  # reduced over H and K
    assert q["embed_VD"]["scale"].shape == (16, 1)  # one per vocab row
    for path, entry in q.items():
        if "q" not in entry:
            continue
        assert entry["q"].dtype.name == dtype and entry["scale"].dtype == np.float32
        w, back = flat[path], np.asarray(dequantize(entry))
        channel_max = entry["scale"] * (127.0 if method == "int8" else 448.0)
        assert (np.abs(back - w) <= step * channel_max + 1e-6).all(), path  # half a step (int8) / 3 mantissa bits (fp8)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_pack_two_codes_per_byte_and_round_to_nearest(group):
    """int4: one scale per `group` weights along the contracted axes (all of them when fewer), codes + 8 packed low
    nibble first; every weight comes back within half its group's step (the peak maps to -8 exactly; a weight of the
    other sign beyond 7.5 steps is clipped to 7, within one step)."""
    from jaxbig.compress import int4

    rng = np.random.default_rng(1)
    flat = {"blocks/attn/wo_HKD": rng.normal(size=(2, 4, 16, 8)).astype(np.float32), "blocks/mlp/w_down_FD": rng.normal(size=(2, 128, 8)).astype(np.float32)}
    q = quantize_params(flat, "int4", llama_rules(), group)
    wo, down = q["blocks/attn/wo_HKD"], q["blocks/mlp/w_down_FD"]
    assert wo["packed"].dtype == np.uint8 and wo["packed"].shape == (2, 8, 4, 8)  # [L, D, H, K/2]: contracted H, K last
    assert wo["scale"].shape == (2, 8, 64 // min(group, 64)) and down["scale"].shape == (2, 8, 128 // group)
    for path, entry in q.items():
        rule = next(r for r in llama_rules() if __import__("re").fullmatch(r.pattern, path))
        w, back = flat[path], np.asarray(dequantize(entry, rule.reduce_axes))
        assert back.shape == w.shape
        g = int4.group_for(w.shape, rule.reduce_axes, group)
        step = np.abs(np.repeat(entry["scale"], g, axis=-1))  # per weight, in the packed (moved) order
        moved = np.transpose(w - back, [a for a in range(w.ndim) if a not in rule.reduce_axes] + list(rule.reduce_axes)).reshape(step.shape)
        w_moved = np.transpose(w, [a for a in range(w.ndim) if a not in rule.reduce_axes] + list(rule.reduce_axes)).reshape(step.shape)
        clipped = np.abs(w_moved) > 7.5 * step  # only the side opposite the group's peak can pass code 7: up to a step off
        assert (np.abs(moved) <= np.where(clipped, step, step / 2) * (1 + 1e-6)).all(), path
    codes = np.array([[-8, -3, 0, 7]], np.float32) * 0.5  # one group of 4: scale -8 -> 0.5 * -8 / -8
    packed = int4.quantize(codes, (1,), 4)["packed"]
    assert packed.tolist() == [[0x50, 0xF8]]  # codes + 8 = [0, 5, 8, 15], pairs (low, high)


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="'w4a8' is not supported; use one of none, int8, fp8, int8-dynamic, int4"):
        quantize_params(_flat(), "w4a8", llama_rules())


# The model's weight matmuls (jaxbig.models.llama), at small sizes: (spec, x shape, w shape, contracted sizes).
SPECS = [
    ("BTD,DHK->BTHK", (2, 5, 64), (64, 4, 16)),
    ("BTHK,HKD->BTD", (2, 5, 4, 16), (4, 16, 64)),
    ("BTD,DF->BTF", (2, 5, 64), (64, 128)),
    ("BTF,FD->BTD", (2, 5, 128), (128, 64)),
    ("BTD,DV->BTV", (2, 5, 64), (64, 256)),
]


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS)
def test_dynamic_int8_einsum_is_close_to_float(spec, x_shape, w_shape):
    """Bound: every int8 element is off by at most half its scale (s_x per row, s_w per output
    channel), so elementwise |y - y_float| <= (|x| . s_w + s_x . |w|) / 2 + n s_x s_w / 4 over the
    n contracted terms (a hard bound, +1e-5 for float32 summation). Typically that is ~1% of
    max|y| (measured 0.8-1.1% on these shapes); we also require <= 2% of max|y|.
    """
    rng = np.random.default_rng(len(spec))
    x = rng.normal(size=x_shape).astype(np.float32)
    x[0, 0] *= 30  # one outlier row: per-row scales keep it from wrecking the others
    w = (0.05 * rng.normal(size=w_shape)).astype(np.float32)
    got = np.asarray(dynamic_int8_einsum(spec, x, w))
    want = np.einsum(spec, x, w)
    assert got.dtype == np.float32 and got.shape == want.shape
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in xs if c in ws and c not in out]
    xa, wa = tuple(xs.index(c) for c in contracted), tuple(ws.index(c) for c in contracted)
    sx, sw = np.asarray(_absmax_scale(x, xa)), np.asarray(_absmax_scale(w, wa))
    sx_b, sw_b = np.expand_dims(sx, xa) * np.ones_like(x), np.expand_dims(sw, wa) * np.ones_like(w)
    n = int(np.prod([x.shape[a] for a in xa]))
    xk, wk = "".join(c for c in xs if c not in contracted), "".join(c for c in ws if c not in contracted)
    bound = (np.einsum(spec, np.abs(x), sw_b) + np.einsum(spec, sx_b, np.abs(w))) / 2 + n * np.einsum(f"{xk},{wk}->{out}", sx, sw) / 4
    assert (np.abs(got - want) <= bound + 1e-5).all()
    rel = np.abs(got - want).max(axis=tuple(range(1, got.ndim)), keepdims=True) / np.abs(want).max()
    assert rel.max() <= 0.02 * 30, rel  # the outlier batch row, vs the global max
    assert (np.abs(got - want)[1] <= 0.02 * np.abs(want[1]).max()).all()  # batch 1 holds no outlier
    # bfloat16 activations: same math, the result comes back in x's dtype (llama.dense's contract)
    assert dynamic_int8_einsum(spec, jnp.asarray(x, jnp.bfloat16), w).dtype == jnp.bfloat16


def test_dense_default_is_the_plain_einsum_and_context_swaps_it():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(dense("BTD,DF->BTF", x, w)), np.asarray(jnp.einsum("BTD,DF->BTF", x, w)))
    with use_dense(dynamic_int8_einsum):
        drq = np.asarray(dense("BTD,DF->BTF", x, w))
    np.testing.assert_array_equal(drq, np.asarray(dynamic_int8_einsum("BTD,DF->BTF", x, w)))
    np.testing.assert_array_equal(np.asarray(dense("BTD,DF->BTF", x, w)), np.asarray(jnp.einsum("BTD,DF->BTF", x, w)))  # reset


def test_int8_dynamic_stores_int8_and_requantizes_exactly():
    """int8-dynamic stores what int8 stores; re-quantizing the dequantized weight inside
    dynamic_int8_einsum (absmax over the same contracted axes) gives back the stored int8."""
    flat = _flat() | {"blocks/mlp/w_gate_DF": np.random.default_rng(2).normal(size=(2, 8, 12)).astype(np.float32)}
    static, dynamic = quantize_params(flat, "int8", llama_rules()), quantize_params(flat, "int8-dynamic", llama_rules())
    for path, rule in [(p, r) for p in flat for r in llama_rules() if __import__("re").fullmatch(r.pattern, p)]:
        assert set(dynamic[path]) == {"q", "scale"}
        np.testing.assert_array_equal(dynamic[path]["q"], static[path]["q"])
        np.testing.assert_array_equal(dynamic[path]["scale"], static[path]["scale"])
        w = dequantize(dynamic[path])
        scale = _absmax_scale(w, rule.reduce_axes)
        np.testing.assert_array_equal(np.asarray(_to_int8(w, scale, rule.reduce_axes)), dynamic[path]["q"], err_msg=path)
        np.testing.assert_allclose(np.expand_dims(np.asarray(scale), rule.reduce_axes), dynamic[path]["scale"], rtol=1e-6)


def test_int8_dynamic_matmuls_take_the_stored_int8_and_scale():
    """The W8A8 einsum with an `Int8Weight` is the integer product of the row-quantized activations and the *stored*
    int8 weight, times the two scales (checked against int64 numpy, exact up to the final float32 rescale); the
    exported forward feeds every matmul weight's int8 leaf straight into an int8 dot: the only int8 -> float32
    conversion left in it is the embedding's (a gather), none per weight per call."""
    import jax
    from flax import nnx

    from jaxbig.compress.quantize import Int8Weight, weight_operand
    from jaxbig.config import ModelConfig
    from jaxbig.export.artifact import flatten_params, make_forward, to_leaves
    from jaxbig.models import create_model

    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(2, 5, 8)).astype(np.float32), rng.normal(size=(2, 8, 12)).astype(np.float32)
    entry = quantize_params({"blocks/mlp/w_gate_DF": w}, "int8-dynamic", llama_rules())["blocks/mlp/w_gate_DF"]
    op = weight_operand("blocks/mlp/w_gate_DF", entry, "int8-dynamic", llama_rules())
    assert isinstance(op, Int8Weight) and op[...] is op
    got = np.asarray(dynamic_int8_einsum("LTD,LDF->LTF", x, op))
    sx = np.asarray(_absmax_scale(x, (2,)))
    qx = np.asarray(_to_int8(x, jnp.asarray(sx), (2,))).astype(np.int64)
    acc = np.einsum("ltd,ldf->ltf", qx, entry["q"].astype(np.int64))
    want = acc * sx[..., None] * entry["scale"]  # float64 rescale of the exact integer sums
    np.testing.assert_allclose(got, want, rtol=4 * 2.0**-24, atol=0)  # two float32 roundings: the scale product, the rescale
    assert not isinstance(weight_operand("embed_VD", entry, "int8-dynamic", llama_rules()), Int8Weight)  # a gather: dequantized

    cfg = ModelConfig(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32, max_seq_len=16, dtype="float32")
    graphdef, state = nnx.split(create_model(cfg, 0))
    leaves = to_leaves(quantize_params(flatten_params(nnx.to_pure_dict(state)), "int8-dynamic", llama_rules()))
    names, arrays = [n for n, _ in leaves], [jnp.asarray(a) for _, a in leaves]
    jaxpr = jax.make_jaxpr(make_forward(graphdef, names, "int8-dynamic"))(arrays, jnp.zeros((1, 4), jnp.int32))

    def eqns(j):
        for e in j.eqns:
            yield e
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        yield from eqns(getattr(sub, "jaxpr", sub))

    all_eqns = list(eqns(jaxpr.jaxpr))
    widen = [e for e in all_eqns if e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.int8 and e.outvars[0].aval.dtype == jnp.float32]
    int8_dots = [e for e in all_eqns if e.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in e.invars)]
    assert len(widen) == 1, [str(e) for e in widen]  # the embedding table's dequantize
    assert len(int8_dots) == 7 + 1  # q, k, v, o, gate, up, down in the layers' scan body (traced once), and the head
