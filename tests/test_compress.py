"""Weight-only quantization rules: storage dtypes, per-channel scales, bounded rounding error."""

import numpy as np
import pytest

from jaxbig.compress import dequantize, llama_rules, quantize_params


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


def test_int4_and_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="int4 is refused: it does not round-trip through TensorFlow's XlaCallModule"):
        quantize_params(_flat(), "int4", llama_rules())
    with pytest.raises(ValueError, match="'w4a8' is not supported; use one of none, int8, fp8"):
        quantize_params(_flat(), "w4a8", llama_rules())
