"""Attention kernels on this backend: one bfloat16 loss-and-gradient step of a config's model, per kernel.

    python -m benchmarks.attention_kernels [--config llama_125m] [--batch 8] [--steps 20]

Rows: `model.attention=einsum` (written out, jaxbig's own backward), `dot_product` traced under
`portable_attention()` (what `jax.nn.dot_product_attention` runs when left to choose: XLA's), and
`dot_product` as training traces it (`dot_product_kernel`: cuDNN's fused attention on a GPU in
bfloat16). Each is compiled once and timed over `--steps` calls on the same batch (median); the
table gives the cuDNN custom calls in the compiled program, the loss and gradient norm (the three
must agree within bfloat16 rounding) and MFU against `PUBLISHED_PEAK_FLOPS` for the device kind.
A GPU measurement (docs/benchmarks.md, "Attention kernels on a GPU"); on CPU it runs, smaller, as a check.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxbig.config import load_config
from jaxbig.models import create_model
from jaxbig.models.llama import dot_product_kernel, portable_attention
from jaxbig.train.metrics import PUBLISHED_PEAK_FLOPS

ROOT = Path(__file__).resolve().parent.parent
KERNELS = (("einsum", "einsum", False), ("dot_product, XLA (JAX's default)", "dot_product", True), ("dot_product as trained", "dot_product", False))


def time_kernel(model_cfg, tokens_BT1, attention: str, portable: bool, steps: int) -> dict:
    cfg = dataclasses.replace(model_cfg, attention=attention, dtype="bfloat16")
    graphdef, params = nnx.split(create_model(cfg, 0))

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()

    fn = jax.jit(jax.value_and_grad(loss_fn))
    t0 = time.perf_counter()
    if portable:
        with portable_attention():
            compiled = fn.lower(params, tokens_BT1).compile()
    else:
        compiled = fn.lower(params, tokens_BT1).compile()
    compile_s = time.perf_counter() - t0
    loss, grads = compiled(params, tokens_BT1)
    jax.block_until_ready(grads)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss, grads = compiled(params, tokens_BT1)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t)
    kernel = dot_product_kernel(jax.default_backend(), jnp.bfloat16, cfg.head_dim) if attention == "dot_product" else "-"
    return {
        "kernel": "xla" if portable else kernel,
        "cudnn_calls": compiled.as_text().count('custom_call_target="__cudnn$fmha'),
        "loss": float(loss),
        "grad_norm": float(optax.global_norm(grads)),
        "step_s": statistics.median(times),
        "compile_s": compile_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_125m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml")
    B, T = args.batch, args.seq_len or cfg.data.seq_len
    tokens_BT1 = jax.random.randint(jax.random.key(0), (B, T + 1), 0, cfg.model.vocab_size)
    device = jax.devices()[0]
    peak = PUBLISHED_PEAK_FLOPS.get(device.device_kind, {}).get("bfloat16")
    flops = B * T * cfg.model.flops_per_token(T)
    print(f"{device.platform}:{device.device_kind}, jax {jax.__version__}; {args.config}, B={B}, T={T}, bfloat16, loss and gradients")
    print("| attention | kernel | cuDNN calls | step ms (median) | tokens/s | model TFLOP/s | MFU | loss | grad norm | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, attention, portable in KERNELS:
        r = time_kernel(cfg.model, tokens_BT1, attention, portable, args.steps)
        mfu = f"{flops / r['step_s'] / peak:.3f}" if peak else "n/a"
        print(f"| {name} | {r['kernel']} | {r['cudnn_calls']} | {r['step_s'] * 1e3:.1f} | {B * T / r['step_s']:,.0f} | {flops / r['step_s'] / 1e12:.1f} "
              f"| {mfu} | {r['loss']:.5f} | {r['grad_norm']:.5f} | {r['compile_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
