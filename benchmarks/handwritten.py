"""The same Llama, written by hand in plain JAX: the baseline `scripts/bench.py` holds jaxbig to.

No Flax, no mesh, no sharding constraints: a function of a params pytree (attention either written out and
left to autodiff, as a plain script would, or, for the like-for-like baseline, jaxbig's own attention op), a loop over the
stacked layers (`lax.scan`, unrolled unless `model.scan_layers`), `value_and_grad`, optax, one `jax.jit` with donated buffers. The params
are the nested dict jaxbig's `nnx.to_pure_dict` gives (same names, same shapes, layers
stacked on axis 0), so one initialisation feeds both, and both use the optimizer of
`jaxbig.optim.build_optimizer`.

Letters as in `jaxbig.models.llama`: B batch, T query length, S key length, D d_model,
H query heads, N kv heads, G = H/N, K head dim, F d_ff, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbig.config import ModelConfig
from jaxbig.models.llama import attend, rope_frequencies, rope_table  # jaxbig's ops (pure JAX functions), for the like-for-like baseline

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x_BTD.dtype) * scale_D.astype(x_BTD.dtype)[None, None, :]


def rope_tables(T: int, K: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin, cos [T, K/2] for positions 0..T-1, once per forward (not once per layer)."""
    inv_freq_k = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angles_Tk = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq_k[None, :]
    return jnp.sin(angles_Tk), jnp.cos(angles_Tk)


def apply_rope(x_BTHK: jax.Array, sin_Tk: jax.Array, cos_Tk: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Llama/HF convention), in float32."""
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_Tk[None, :, None, :], cos_Tk[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHK.dtype)


def attention(x_BTD: jax.Array, p: Params, sin_Tk: jax.Array, cos_Tk: jax.Array, causal_TS: jax.Array, op: str = "autodiff") -> jax.Array:
    """`op`: autodiff (softmax attention written out, its backward left to autodiff: what a plain script does), or
    jaxbig's own attention op for the like-for-like baseline: `einsum` (`jaxbig.models.llama.attend`, with its
    hand-written backward) or `dot_product` (`jax.nn.dot_product_attention`)."""
    dt = x_BTD.dtype
    q_BTHK = jnp.einsum("BTD,DHK->BTHK", x_BTD, p["wq_DHK"].astype(dt))
    k_BSNK = jnp.einsum("BSD,DNK->BSNK", x_BTD, p["wk_DNK"].astype(dt))
    v_BSNK = jnp.einsum("BSD,DNK->BSNK", x_BTD, p["wv_DNK"].astype(dt))
    q_BTHK, k_BSNK = apply_rope(q_BTHK, sin_Tk, cos_Tk), apply_rope(k_BSNK, sin_Tk, cos_Tk)

    B, T, H, K = q_BTHK.shape
    N = k_BSNK.shape[2]
    if op == "einsum":
        out_BTHK = attend(q_BTHK, k_BSNK, v_BSNK, jnp.broadcast_to(causal_TS[None], (B, T, T)))
        return jnp.einsum("BTHK,HKD->BTD", out_BTHK, p["wo_HKD"].astype(dt))
    if op == "dot_product":
        out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSNK, v_BSNK, is_causal=True)
        return jnp.einsum("BTHK,HKD->BTD", out_BTHK, p["wo_HKD"].astype(dt))
    q_BTNGK = q_BTHK.reshape(B, T, N, H // N, K)  # query head h uses kv head h // G
    logits_BNGTS = jnp.einsum("BTNGK,BSNK->BNGTS", q_BTNGK, k_BSNK, preferred_element_type=jnp.float32) * (K**-0.5)
    logits_BNGTS = jnp.where(causal_TS[None, None, None], logits_BNGTS, jnp.finfo(jnp.float32).min)
    probs_BNGTS = jax.nn.softmax(logits_BNGTS, axis=-1).astype(dt)
    out_BTHK = jnp.einsum("BNGTS,BSNK->BTNGK", probs_BNGTS, v_BSNK).reshape(B, T, H, K)
    return jnp.einsum("BTHK,HKD->BTD", out_BTHK, p["wo_HKD"].astype(dt))


def mlp(x_BTD: jax.Array, p: Params, fused: bool = False) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x)); `fused`: gate and up as one matmul over [D, 2, F], as jaxbig's `model.fused_mlp`."""
    dt = x_BTD.dtype
    if fused:
        gate_up_BT2F = jnp.einsum("BTD,DCF->BTCF", x_BTD, jnp.stack([p["w_gate_DF"], p["w_up_DF"]], axis=1).astype(dt))
        gate_BTF, up_BTF = gate_up_BT2F[:, :, 0], gate_up_BT2F[:, :, 1]
    else:
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, p["w_gate_DF"].astype(dt))
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, p["w_up_DF"].astype(dt))
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, p["w_down_FD"].astype(dt))


def forward(params: Params, cfg: ModelConfig, tokens_BT: jax.Array, like_jaxbig: bool = False) -> jax.Array:
    """Logits [B, T, V] in float32 for every position of `tokens_BT`; `like_jaxbig`: attention by jaxbig's op for `cfg`,
    its MLP layout (`model.fused_mlp`) and its RoPE table (`jaxbig.models.llama.rope_table`)."""
    op = cfg.attention_impl() if like_jaxbig else "autodiff"
    dt = jnp.dtype(cfg.compute_dtype())
    T = tokens_BT.shape[1]
    if like_jaxbig:  # jaxbig's RoPE table: sin/cos computed on the host, a constant of the program
        sin_1Tk, cos_1Tk = rope_table(np.arange(T)[None], rope_frequencies(cfg))
        sin_Tk, cos_Tk = sin_1Tk[0], cos_1Tk[0]
    else:
        sin_Tk, cos_Tk = rope_tables(T, cfg.head_dim, cfg.rope_theta)
    causal_TS = jnp.tril(jnp.ones((T, T), jnp.bool_))
    x_BTD = jnp.take(params["embed_VD"], tokens_BT, axis=0).astype(dt)

    def block(x_BTD, layer: Params):
        x_BTD = x_BTD + attention(rms_norm(x_BTD, layer["attn_norm"]["scale"], cfg.norm_eps), layer["attn"], sin_Tk, cos_Tk, causal_TS, op)
        x_BTD = x_BTD + mlp(rms_norm(x_BTD, layer["mlp_norm"]["scale"], cfg.norm_eps), layer["mlp"], like_jaxbig and cfg.fused_mlp)
        return x_BTD, None

    if cfg.remat != "none":
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x_BTD, _ = jax.lax.scan(block, x_BTD, params["blocks"], unroll=not cfg.scan_layers)  # unrolled = a Python loop over the layers

    x_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return jnp.einsum("BTD,VD->BTV", x_BTD, params["embed_VD"].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head_DV"].astype(dt), preferred_element_type=jnp.float32)


def loss_fn(params: Params, cfg: ModelConfig, inputs_BT: jax.Array, targets_BT: jax.Array, like_jaxbig: bool = False) -> jax.Array:
    """Mean next-token cross-entropy in nats per token: optax's, as a script that takes its optimizer from optax
    would write it (and as jaxbig does; written out as logsumexp minus the target's logit, the same math traced in
    another order gave XLA:CPU's scheduler another op order, see tests/test_handwritten.py)."""
    logits_BTV = forward(params, cfg, inputs_BT, like_jaxbig)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def make_step(cfg: ModelConfig, tx: optax.GradientTransformation, compiler_options: dict | None = None, *, like_jaxbig: bool = False):
    """`step(params, opt_state, inputs_BT, targets_BT) -> (params, opt_state, metrics)`, jitted, params and opt_state donated.

    `compiler_options`: XLA options for the jit (None: XLA's defaults, what a plain script gets). `like_jaxbig`: the
    attention op jaxbig uses for `cfg` (its own backward, or dot_product), its MLP layout and RoPE table, so only the
    framework differs."""

    def step(params: Params, opt_state: optax.OptState, inputs_BT: jax.Array, targets_BT: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, inputs_BT, targets_BT, like_jaxbig)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
