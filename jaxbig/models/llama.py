"""A Llama-style decoder LM in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shape letters (used in names and einsum strings everywhere in jaxbig):
  B batch, T query length, S key length, D d_model, H query heads, N kv heads,
  G query heads per kv head (H = N·G), K head dim, F d_ff, V vocab, L layers.

Params are float32 (or `param_dtype`) and are cast to the compute `dtype` at use. Every
param names its *logical* axes in `out_sharding` metadata; `jaxbig.parallel.rules` maps
them to mesh axes. Layers are stacked on a leading `layers` axis and run by a layer runner
(`jaxbig.models.layers`): `lax.scan`, or a pipeline schedule over that axis (`jaxbig.parallel.pipeline`).
Two hooks are read at trace time and installed from outside: `dense` (how weight matmuls run) and
`constrain` (what an activation's logical axes mean on a mesh); this package imports nothing
from `jaxbig.parallel`, `jaxbig.train` or `jaxbig.optim`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbig.config import ModelConfig
from jaxbig.models.layers import LayerRunner, scan_layers, unrolled_layers

KVCache = dict[str, jax.Array]  # {"k": [L, B, S, N, K], "v": [L, B, S, N, K]}

_ACT_BTD = ("activation_batch", "activation_norm_length", "activation_embed")  # the residual stream

# Every *weight* matmul goes through `dense`, which calls the implementation this context holds
# (read at trace time, like `constrain` reads its rules). None, the default, is the plain
# `jnp.einsum(spec, x, w.astype(dt))` the model always ran: training and float export are
# bit-identical to writing the einsum inline. The export sets e.g.
# `jaxbig.compress.quantize.dynamic_int8_einsum` (W8A8 dynamic-range int8) while it traces.
# An implementation receives the weight *before* the cast to `dt` (float32 when exported), so a
# quantizing one sees exactly the dequantized int8 values, and returns `preferred_element_type`
# (or x's dtype when that is None). Activation x activation einsums (q.k, probs.v) never use it.
DenseFn = Callable[..., jax.Array]  # (spec, x, w, *, preferred_element_type) -> y
_DENSE: contextvars.ContextVar[DenseFn | None] = contextvars.ContextVar("jaxbig_dense", default=None)


@contextlib.contextmanager
def use_dense(fn: DenseFn | None) -> Iterator[None]:
    """Weight matmuls traced inside this block run `fn(spec, x, w, preferred_element_type=...)`."""
    token = _DENSE.set(fn)
    try:
        yield
    finally:
        _DENSE.reset(token)


def dense(spec: str, x: jax.Array, w: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """`einsum(spec, x, w)` for a weight `w`, computed in x's dtype (see `use_dense`)."""
    fn = _DENSE.get()
    if fn is None:
        return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=preferred_element_type)
    return fn(spec, x, w, preferred_element_type=preferred_element_type)


# Activations name their logical axes through `constrain`, which calls the implementation this
# context holds (read at trace time, like `dense`). The model knows no mesh: the mesh layer
# supplies what a constraint does. `jaxbig.parallel.rules.use_rules(rules)` installs its
# implementation for a block; `set_default_constrain` sets the one used outside such blocks,
# which `jaxbig.parallel.rules` does when imported (its default rules), so code that only enters
# `jax.set_mesh` keeps the rules' activation layout. With neither, `constrain` returns x as is.
ConstrainFn = Callable[[jax.Array, Sequence[str | None]], jax.Array]  # (x, logical axis names) -> x
_CONSTRAIN: contextvars.ContextVar[ConstrainFn | None] = contextvars.ContextVar("jaxbig_constrain", default=None)
_DEFAULT_CONSTRAIN: list[ConstrainFn | None] = [None]


def set_default_constrain(fn: ConstrainFn | None) -> None:
    """The `constrain` implementation used outside any `use_constrain` block."""
    _DEFAULT_CONSTRAIN[0] = fn


@contextlib.contextmanager
def use_constrain(fn: ConstrainFn | None) -> Iterator[None]:
    """Activation constraints traced inside this block run `fn(x, logical)`."""
    token = _CONSTRAIN.set(fn)
    try:
        yield
    finally:
        _CONSTRAIN.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's layout by its logical axis names (see `use_constrain`)."""
    fn = _CONSTRAIN.get() or _DEFAULT_CONSTRAIN[0]
    return x if fn is None else fn(x, logical)


# `model.attention=dot_product` calls `jax.nn.dot_product_attention`. Left to choose
# (`implementation=None`), JAX runs XLA's unfused softmax(QK^T)V on every backend, GPUs included
# (jax/_src/nn/functions.py: "defaults to XLA for now"), so cuDNN's fused flash attention must be
# named. It is named where cuDNN takes the call: a GPU backend, bfloat16 or float16, head_dim a
# multiple of 8 up to 128 (cuDNN's flash kernel; JAX's own check allows 256 on Hopper, 128 below).
# Anything else, or a block under `portable_attention()` (the export, which lowers for CPU and CUDA
# at once and so must not embed a cuDNN call), gets XLA's. Read at trace time, like `dense`.
_PORTABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxbig_portable_attention", default=False)
CUDNN_DTYPES = ("bfloat16", "float16")


@contextlib.contextmanager
def portable_attention() -> Iterator[None]:
    """`dot_product` attention traced inside this block is XLA's on every backend (no cuDNN custom call)."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def dot_product_kernel(backend: str, dtype: Any, head_dim: int) -> str:
    """The `implementation` jaxbig passes to `jax.nn.dot_product_attention`: "cudnn" or "xla" (see above)."""
    cudnn = backend == "gpu" and jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if cudnn and not _PORTABLE.get() else "xla"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any, logical: tuple[str, ...]) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=logical)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale_11D = self.scale[...].astype(x_BTD.dtype)[None, None, :]
        return x32.astype(x_BTD.dtype) * scale_11D


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE's K/2 inverse frequencies, float32: 1 / theta^(2i/K), then `cfg.rope_scaling`.

    Computed as transformers computes them (`modeling_rope_utils`: `compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), in float64 then rounded once,
    so an imported checkpoint sees the frequencies it was trained with. llama3 (Llama 3.1): wavelengths
    longer than original_max_len / low_freq_factor are stretched by `rope_factor`, shorter than
    original_max_len / high_freq_factor are kept, and the band between is blended linearly in 1/wavelength.
    """
    K = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, K, 2, dtype=np.float64) / K)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        old, low, high, factor = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq.astype(np.float32)


RopeTable = tuple[jax.Array, jax.Array]  # sin, cos [B, T, K/2] float32; B is 1 when every row has the same positions


def rope_table(positions_BT: jax.Array | np.ndarray, inv_freq_k: np.ndarray) -> RopeTable:
    """RoPE's sin and cos at `positions_BT` ([1, T] for positions shared by all rows), float32; `inv_freq_k` from `rope_frequencies`.

    The model builds it once per forward and hands it to every layer. Positions known at trace time (a
    numpy array: the default 0..T-1) give a constant, computed here on the host, so no sin or cos runs in
    the step: XLA fuses a traced table into each op that reads it and evaluates sin/cos once per element
    read, B·H times per table entry in every layer, forward and backward. The constant takes sin/cos of
    the same float32 angles, correctly rounded (in float64, then float32), so it differs from the traced
    table by XLA's own sin/cos error (a few float32 ulps).
    """
    if isinstance(positions_BT, np.ndarray):
        angles_BTk = positions_BT[..., None].astype(np.float32) * np.asarray(inv_freq_k, np.float32)[None, None, :]
        angles_BTk = angles_BTk.astype(np.float64)
        return jnp.asarray(np.sin(angles_BTk), jnp.float32), jnp.asarray(np.cos(angles_BTk), jnp.float32)
    angles_BTk = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_k, jnp.float32)[None, None, :]
    return jnp.sin(angles_BTk), jnp.cos(angles_BTk)


def rope(x_BTHK: jax.Array, table: RopeTable) -> jax.Array:
    """Rotary embedding, rotate-half convention (Llama/HF), computed in float32 from `rope_table`'s sin and cos."""
    sin, cos = table[0][:, :, None, :], table[1][:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


def _axes(q) -> tuple[str, str]:
    """Einsum axes of the queries and of the [T, S] matrices: without grouping (G = 1) the G axis is dropped.

    A size-1 G axis between T and S makes XLA:CPU copy every [T, S] matrix to move it.
    """
    return ("BTNGK", "BNTGS") if q.ndim == 5 else ("BTNK", "BNTS")


def _attend_fwd(q, k_BSNK, v_BSNK, mask_BTS):
    Q, P = _axes(q)
    K = q.shape[-1]
    # [B, N, T, (G,) S]: the order the matmul produces (batch, then the queries' free axes), so no relayout follows it
    logits = jnp.einsum(f"{Q},BSNK->{P}", q, k_BSNK, preferred_element_type=jnp.float32) * (K**-0.5)
    mask = mask_BTS[:, None, :, None, :] if q.ndim == 5 else mask_BTS[:, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"{P},BSNK->{Q}", probs.astype(v_BSNK.dtype), v_BSNK)
    return out, (q, k_BSNK, v_BSNK, probs)


def _attend_bwd(res, dout):
    """The gradients of softmax attention, each matmul written so the [T, S] matrices are never transposed.

    Autodiff of the forward einsums contracts the probabilities (for dv) and the logits'
    gradient (for dk) over their query axis T. XLA:CPU's YNNPACK matmuls want the contracted
    axis minor in the left operand, so it copies each [T, S] matrix to a transposed layout
    first (two per layer). Here dv and dk are computed transposed, [.., K, S]: the big matrix
    is the right operand, contracted over its rows, and only the [T, K]-sized operand and
    result are transposed.
    """
    q, k_BSNK, v_BSNK, probs = res
    Q, P = _axes(q)
    K = q.shape[-1]
    f32 = jnp.float32
    dprobs = jnp.einsum(f"{Q},BSNK->{P}", dout, v_BSNK, preferred_element_type=f32)
    dv_BNKS = jnp.einsum(f"{Q},{P}->BNKS", dout, probs.astype(v_BSNK.dtype), preferred_element_type=f32)
    dlogits = (probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True)) * (K**-0.5)).astype(q.dtype)
    dq = jnp.einsum(f"{P},BSNK->{Q}", dlogits, k_BSNK, preferred_element_type=f32)
    dk_BNKS = jnp.einsum(f"{Q},{P}->BNKS", q, dlogits, preferred_element_type=f32)
    to_BSNK = functools.partial(jnp.transpose, axes=(0, 3, 1, 2))
    return dq.astype(q.dtype), to_BSNK(dk_BNKS).astype(k_BSNK.dtype), to_BSNK(dv_BNKS).astype(v_BSNK.dtype), None


@jax.custom_vjp
def _attend(q, k_BSNK, v_BSNK, mask_BTS):
    return _attend_fwd(q, k_BSNK, v_BSNK, mask_BTS)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q_BTHK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention where `mask_BTS` holds, H query heads over N key/value heads; logits and softmax in float32."""
    B, T, H, K = q_BTHK.shape
    N = k_BSNK.shape[2]
    q = q_BTHK if H == N else q_BTHK.reshape(B, T, N, H // N, K)
    return _attend(q, k_BSNK, v_BSNK, mask_BTS).reshape(B, T, H, K)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, N, K, std, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std, cfg.param_dtype
        self.wq_DHK = _param(rngs, (D, H, K), std, pd, ("embed", "heads", "head_dim"))
        self.wk_DNK = _param(rngs, (D, N, K), std, pd, ("embed", "kv_heads", "head_dim"))
        self.wv_DNK = _param(rngs, (D, N, K), std, pd, ("embed", "kv_heads", "head_dim"))
        self.wo_HKD = _param(rngs, (H, K, D), std, pd, ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:  # Qwen2: zeros at init, as transformers initialises them
            self.q_bias_HK = nnx.Param(jnp.zeros((H, K), pd), out_sharding=("heads", "head_dim"))
            self.k_bias_NK = nnx.Param(jnp.zeros((N, K), pd), out_sharding=("kv_heads", "head_dim"))
            self.v_bias_NK = nnx.Param(jnp.zeros((N, K), pd), out_sharding=("kv_heads", "head_dim"))
        self.qkv_bias = cfg.qkv_bias
        self.cfg = cfg  # static: RoPE's frequencies are computed from it at trace time
        self.attention = cfg.attention_impl()  # auto resolved for the backend
        self.backend = jax.default_backend()  # where dot_product may name cuDNN (`dot_product_kernel`)

    def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None, segment_ids_BT: jax.Array | None = None, rope_BTk: RopeTable | None = None):
        """`rope_BTk`: `rope_table(positions_BT, ...)`, built once by the caller for all layers; None builds it here."""
        dt = x_BTD.dtype
        q_BTHK = dense("BTD,DHK->BTHK", x_BTD, self.wq_DHK[...])
        k_BTNK = dense("BTD,DNK->BTNK", x_BTD, self.wk_DNK[...])
        v_BTNK = dense("BTD,DNK->BTNK", x_BTD, self.wv_DNK[...])
        if self.qkv_bias:
            q_BTHK = q_BTHK + self.q_bias_HK[...].astype(dt)[None, None]
            k_BTNK = k_BTNK + self.k_bias_NK[...].astype(dt)[None, None]
            v_BTNK = v_BTNK + self.v_bias_NK[...].astype(dt)[None, None]
        if rope_BTk is None:
            rope_BTk = rope_table(positions_BT, rope_frequencies(self.cfg))
        q_BTHK = constrain(rope(q_BTHK, rope_BTk), ("activation_batch", "activation_length", "activation_heads", None))
        k_BTNK = constrain(rope(k_BTNK, rope_BTk), ("activation_batch", "activation_length", "activation_kv_heads", None))

        if cache is None:
            k_BSNK, v_BSNK, key_pos_BS = k_BTNK, v_BTNK, positions_BT
        else:  # write this chunk at its position, then attend over the whole cache
            start = positions_BT[0, 0]
            k_BSNK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTNK.astype(cache["k"].dtype), start, axis=1)
            v_BSNK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTNK.astype(cache["v"].dtype), start, axis=1)
            cache = {"k": k_BSNK, "v": v_BSNK}
            S = k_BSNK.shape[1]
            key_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype), (x_BTD.shape[0], S))
            k_BSNK, v_BSNK = k_BSNK.astype(dt), v_BSNK.astype(dt)

        if self.attention == "dot_product" and cache is None:  # training/eval: keys are the queries' own sequence
            kernel = dot_product_kernel(self.backend, q_BTHK.dtype, q_BTHK.shape[-1])
            y_BTD = dense("BTHK,HKD->BTD", self._dot_product(q_BTHK, k_BSNK, v_BSNK, segment_ids_BT, kernel), self.wo_HKD[...])
            return y_BTD, cache
        causal_BTS = key_pos_BS[:, None, :] <= positions_BT[:, :, None]
        if segment_ids_BT is not None:  # packed rows: a token sees only its own document
            causal_BTS = causal_BTS & (segment_ids_BT[:, None, :] == segment_ids_BT[:, :, None])
        out_BTHK = attend(q_BTHK, k_BSNK, v_BSNK, causal_BTS)
        y_BTD = dense("BTHK,HKD->BTD", out_BTHK, self.wo_HKD[...])
        return y_BTD, cache

    @staticmethod
    def _dot_product(q_BTHK, k_BSNK, v_BSNK, segment_ids_BT, kernel: str = "xla"):
        """`jax.nn.dot_product_attention`, causal by sequence index (positions only rotate q and k).

        `kernel` from `dot_product_kernel`: "cudnn" (fused flash attention) on GPUs where it applies,
        "xla" elsewhere. Packed rows add a same-segment mask; within a segment index order is position
        order, so this equals the einsum path's position-based mask.
        """
        mask_B1TS = None
        if segment_ids_BT is not None:
            mask_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q_BTHK, k_BSNK, v_BSNK, mask=mask_B1TS, is_causal=True, implementation=kernel)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Column-parallel gate/up, row-parallel down."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, std, pd = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.param_dtype
        self.w_gate_DF = _param(rngs, (D, F), std, pd, ("embed", "mlp"))
        self.w_up_DF = _param(rngs, (D, F), std, pd, ("embed", "mlp"))
        self.w_down_FD = _param(rngs, (F, D), std, pd, ("mlp", "embed"))
        self.fused = cfg.fused_mlp

    def __call__(self, x_BTD):
        if self.fused and _DENSE.get() is None:
            # gate and up as one matmul over the weights stacked on a new axis, [D, 2, F] (MaxText's `fused_mlp`, done at
            # trace time): one GEMM twice as wide forward, and in the backward one for dx instead of two plus an add.
            # The params stay two matrices, so checkpoints, HF import/export and the tensor-parallel rules are
            # unchanged; the new axis is unsharded, so stacking moves no data on a mesh. A `use_dense` hook (quantized
            # export, ONNX) sees the two weights as before.
            w_D2F = jnp.stack([self.w_gate_DF[...], self.w_up_DF[...]], axis=1).astype(x_BTD.dtype)
            gate_up_BT2F = jnp.einsum("BTD,DCF->BTCF", x_BTD, w_D2F)
            gate_BTF, up_BTF = gate_up_BT2F[:, :, 0], gate_up_BT2F[:, :, 1]
        else:
            gate_BTF = dense("BTD,DF->BTF", x_BTD, self.w_gate_DF[...])
            up_BTF = dense("BTD,DF->BTF", x_BTD, self.w_up_DF[...])
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("activation_batch", "activation_length", "activation_mlp"))
        return dense("BTF,FD->BTD", h_BTF, self.w_down_FD[...])


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None, segment_ids_BT: jax.Array | None = None, rope_BTk: RopeTable | None = None):
        h_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache, segment_ids_BT, rope_BTk)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, _ACT_BTD), cache


_REMAT_POLICIES = {  # MaxText's names: minimal saves the weight matmuls' outputs, full saves nothing
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
    """Decoder-only LM. `__call__(tokens_BT) -> logits_BTV` (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D, std, pd = cfg.vocab_size, cfg.d_model, cfg.init_std, cfg.param_dtype
        self.embed_VD = _param(rngs, (V, D), std, pd, ("vocab", "embed"))

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs.fork().split(cfg.num_layers))
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd)
        self.lm_head_DV = None if cfg.tie_embeddings else _param(rngs, (D, V), std, pd, ("embed", "vocab"))

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids_BT: jax.Array | None = None,
        run_layers: LayerRunner = scan_layers,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits for every position; with `cache`, also the cache updated at `positions_BT`.

        `segment_ids_BT` (packed rows) restricts attention to tokens of the same segment; give
        `positions_BT` restarting at each segment with it.

        `run_layers` applies the stacked blocks (a plain scan, or a pipeline schedule that
        `jaxbig.parallel.pipeline` builds for the mesh); decoding with a cache always scans.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.compute_dtype())
        T = tokens_BT.shape[1]
        if positions_BT is None:  # [1, T], known at trace time (so the RoPE table is a host constant) unless T is symbolic (jax.export)
            positions_BT = np.arange(T, dtype=np.int32)[None] if isinstance(T, int) else jnp.arange(T, dtype=jnp.int32)[None]
        rope_BTk = rope_table(positions_BT, rope_frequencies(cfg))  # once per forward, shared by every layer
        positions_BT = jnp.asarray(positions_BT)
        x_BTD = constrain(jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dt), _ACT_BTD)

        graphdef, layers = nnx.split(self.blocks)
        remat = (lambda f: f) if cfg.remat == "none" else functools.partial(jax.checkpoint, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)

        if cache is None:

            @remat
            def body(layer, x_BTD, side):
                positions_BT, segment_ids_BT, rope_BTk = side
                return nnx.merge(graphdef, layer)(x_BTD, positions_BT, None, segment_ids_BT, rope_BTk)[0]

            if run_layers is scan_layers and not cfg.scan_layers:  # the plain runner, unrolled (a pipeline keeps its schedule)
                run_layers = unrolled_layers
            x_BTD = run_layers(body, layers, x_BTD, (positions_BT, segment_ids_BT, rope_BTk))
        else:

            @remat
            def body_cached(x_BTD, layer):
                params, layer_cache = layer
                return nnx.merge(graphdef, params)(x_BTD, positions_BT, layer_cache, None, rope_BTk)

            x_BTD, cache = jax.lax.scan(body_cached, x_BTD, (layers, cache))

        x_BTD = self.final_norm(x_BTD)
        head_DV = self.embed_VD[...].T if self.lm_head_DV is None else self.lm_head_DV[...]
        logits_BTV = dense("BTD,DV->BTV", x_BTD, head_DV, preferred_element_type=jnp.float32)
        logits_BTV = constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty KV cache for `max_len` positions."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"KV cache length {max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.compute_dtype())
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
