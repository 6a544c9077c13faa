"""The FLOP count MFU divides by, against XLA's own and the traced program's; the peak it divides into, per dtype and device."""

import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore

from jaxbig.config import ModelConfig
from jaxbig.models import create_model
from jaxbig.train.metrics import PUBLISHED_PEAK_FLOPS, machine_peak_flops, measure_matmul_peak, mfu

CFG = ModelConfig(d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64, dtype="float32")


def _dot_flops(jaxpr, repeat: int = 1) -> int:
    """2 x (output entries) x (contracted size) summed over every dot_general of a jaxpr, sub-jaxprs (scan bodies x length) included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr, times)
                elif isinstance(sub, jcore.Jaxpr):
                    total += _dot_flops(sub, times)
    return total * repeat


@pytest.mark.parametrize("T", [32, 64])
def test_flops_per_token_against_xla_cost_analysis(T):
    """One layer's forward + backward (mean cross-entropy, grads of every param), B x T tokens.

    `flops_per_token` counts 6 FLOPs per matmul weight per token (forward 2, backward 4) and the causal half of the
    attention square, 6 L T H K. The traced program computes the whole square (the mask zeroes the upper half after
    the q.k and probs.v matmuls, and the backward's four [T, S] matmuls run in full too), so its matmuls are exactly
    `flops_per_token` x B x T + 6 L B T^2 H K: checked to the FLOP over every dot_general in the jaxpr. XLA's
    `cost_analysis()` counts those matmuls and every elementwise op besides (softmax, norms, SiLU, RoPE, the loss):
    expected ratio to the matmul count just above 1; measured 1.03 here (T=64), and elementwise work, O(D + F + H T + V)
    per token against the matmuls' O(D^2 + D F + D V + H K T), keeps it under 1.10 at these sizes.
    """
    B = 2
    cfg = dataclasses.replace(CFG, max_seq_len=T)
    graphdef, params = nnx.split(create_model(cfg, 0))
    tokens_BT = jnp.asarray(jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size), jnp.int32)

    def loss(p):
        logits_BTV = nnx.merge(graphdef, p)(tokens_BT)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT).mean()

    model_flops = cfg.flops_per_token(T) * B * T
    masked_half = 6 * cfg.num_layers * B * T * T * cfg.num_heads * cfg.head_dim
    assert _dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr) == model_flops + masked_half
    analysis = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    ratio = xla_flops / (model_flops + masked_half)
    assert 1.0 <= ratio < 1.10, (xla_flops, model_flops, masked_half, ratio)


def test_peak_is_per_dtype_and_unknown_devices_get_no_mfu():
    """CPU peaks are measured per compute dtype (bf16 and f32 matmuls run different kernels); GPUs/TPUs read the
    published table, and a device kind it does not list gives no peak, so no MFU, rather than a guess."""
    cpu = jax.devices()[:1]
    f32 = machine_peak_flops("float32", cpu, n=256, repeats=2, use_cache=False)
    bf16 = machine_peak_flops("bfloat16", cpu, n=256, repeats=2, use_cache=False)
    assert f32 > 0 and bf16 > 0
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert machine_peak_flops("bfloat16", [gpu] * 8) == 8 * PUBLISHED_PEAK_FLOPS["NVIDIA H100 80GB HBM3"]["bfloat16"]
    assert machine_peak_flops("float32", [gpu]) == PUBLISHED_PEAK_FLOPS["NVIDIA H100 80GB HBM3"]["float32"]
    unknown = types.SimpleNamespace(platform="gpu", device_kind="Some Future GPU")
    assert machine_peak_flops("bfloat16", [unknown]) is None
    assert mfu(1e6, 1e6, None) is None and mfu(1e6, 1e6, 2e12) == 0.5


def test_peak_cache_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured while other work shared the cores reads low and, cached, would make every later MFU too high
    (values above 1 were seen). The cache keeps the best figure: a refresh replaces a low entry with the new
    measurement, and never lowers an entry."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kw = dict(n=256, repeats=2)
    first = measure_matmul_peak(**kw)
    cache = tmp_path / "jaxbig" / "matmul_peak.json"
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 1.0}))  # a "loaded" measurement: 1 FLOP/s
    assert measure_matmul_peak(**kw) == 1.0  # cached, as it was written
    refreshed = measure_matmul_peak(**kw, refresh=True)
    assert refreshed > 1.0 and json.loads(cache.read_text())[key] == refreshed
    cache.write_text(json.dumps({key: 1e18}))  # a better figure than any this machine measures
    assert measure_matmul_peak(**kw, refresh=True) == 1e18 and json.loads(cache.read_text())[key] == 1e18
    assert first > 1.0
