"""Typed, frozen run configuration: the single source of truth.

A run is described by `Config`, a tree of keyword-only frozen dataclasses. Presets in
`configs/*.yaml` and command-line overrides (`--set model.num_layers=8`) are applied on
top of the dataclass defaults (which are the `tiny` preset). Every value is type-checked,
and the invariants that tie fields together are checked in `__post_init__` with the
numbers in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxbig.xla_options import AUTO_ATTENTION, AUTO_DTYPE, profile_names


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-style decoder. Letters: D d_model, L layers, H heads, K head_dim, F d_ff, V vocab."""

    vocab_size: int = 256  # V; 256 for the byte-level tokenizer
    d_model: int = 128  # D, width of the residual stream
    num_layers: int = 4  # L, stacked and scanned
    num_heads: int = 4  # H, query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int = 32  # K, per-head width
    d_ff: int = 512  # F, SwiGLU hidden width
    max_seq_len: int = 256  # longest sequence the RoPE tables and KV cache cover
    rope_theta: float = 10_000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5)
    rope_scaling: str = "none"  # RoPE frequency scaling: none, linear (all frequencies / rope_factor) or llama3 (Llama 3.1's banded scaling)
    rope_factor: float = 1.0  # linear and llama3: how far the context is stretched (Llama 3.1: 8)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept; between, a smooth blend
    rope_original_max_len: int = 8192  # llama3: the context the model was pre-trained with before scaling
    qkv_bias: bool = False  # learned biases on the q, k and v projections (Qwen2); o and the MLP have none
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output projection
    dtype: str = "auto"  # compute dtype: float32, bfloat16 (params stay float32), or auto: the measured choice per backend (bfloat16 on GPU/TPU)
    param_dtype: str = "float32"  # storage dtype of the params
    remat: str = "none"  # activation checkpointing per layer: none, minimal (save matmul outputs; alias dots) or full
    attention: str = "auto"  # einsum (written out; fastest on CPU), dot_product (jax.nn.dot_product_attention: cuDNN flash attention on GPUs in bf16/fp16, else XLA's; jaxbig.models.llama.dot_product_kernel), or auto: dot_product on GPU, einsum elsewhere (jaxbig.xla_options.AUTO_ATTENTION)
    scan_layers: bool = False  # false: layers unrolled (fastest at a few layers); true: lax.scan over them (compile time flat in depth)
    fused_mlp: bool = True  # gate and up projections as one [D, 2, F] matmul at trace time (MaxText's fused_mlp); params stay two matrices
    init_std: float = 0.02  # std of the normal init of every weight matrix

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}; "
            "grouped-query attention needs every KV head to serve the same number of query heads",
        )
        _require(self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even for RoPE")
        _require(self.dtype in ("auto", "float32", "bfloat16"), f"model.dtype={self.dtype!r}: use auto, float32 or bfloat16")
        _require(self.param_dtype in ("float32", "bfloat16"), f"model.param_dtype={self.param_dtype!r}: use float32 or bfloat16")
        _require(self.remat in ("none", "minimal", "dots", "full"), f"model.remat={self.remat!r}: use none, minimal (alias dots) or full")
        _require(self.attention in ("auto", "einsum", "dot_product"), f"model.attention={self.attention!r}: use auto, einsum or dot_product")
        _require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")
        _require(self.rope_scaling in ("none", "linear", "llama3"), f"model.rope_scaling={self.rope_scaling!r}: use none, linear or llama3")
        _require(self.rope_factor > 0, f"model.rope_factor={self.rope_factor} must be positive (1 = no scaling)")
        _require(
            self.rope_scaling != "llama3" or 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
            f"model.rope_low_freq_factor={self.rope_low_freq_factor} and model.rope_high_freq_factor={self.rope_high_freq_factor}: "
            "llama3 scaling needs 0 < low < high (Llama 3.1: 1 and 4)",
        )
        _require(self.rope_original_max_len > 0, f"model.rope_original_max_len={self.rope_original_max_len} must be positive")

    # How the model computes, not what its params are: a run may resume, or a fine-tune start, with these changed.
    COMPUTE_FIELDS = ("dtype", "remat", "attention", "scan_layers", "fused_mlp")

    def changes_from(self, other: ModelConfig, *, ignore: tuple[str, ...] = COMPUTE_FIELDS) -> list[str]:
        """`model.FIELD OLD -> NEW` for every field `self` changes from `other`, leaving out `ignore`."""
        return [
            f"model.{f.name} {getattr(other, f.name)!r} -> {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def compute_dtype(self, backend: str | None = None) -> str:
        """`dtype`, with auto resolved for `backend` (default: JAX's default backend) by `jaxbig.xla_options.AUTO_DTYPE`."""
        if self.dtype != "auto":
            return self.dtype
        if backend is None:
            import jax  # only to resolve `auto`: this module is imported before a script sets JAX's device count

            backend = jax.default_backend()
        return AUTO_DTYPE.get(backend, "float32")

    def attention_impl(self, backend: str | None = None) -> str:
        """`attention`, with auto resolved for `backend` (default: JAX's default backend) by `jaxbig.xla_options.AUTO_ATTENTION`."""
        if self.attention != "auto":
            return self.attention
        if backend is None:
            import jax  # only to resolve `auto`, as in compute_dtype

            backend = jax.default_backend()
        return AUTO_ATTENTION.get(backend, "einsum")

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Parameter count, from the shapes (no allocation)."""
        D, F, L, H, KV, K, V = self.d_model, self.d_ff, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.vocab_size
        per_layer = D * H * K + 2 * D * KV * K + H * K * D + 3 * D * F + 2 * D
        per_layer += (H * K + 2 * KV * K) if self.qkv_bias else 0
        n = L * per_layer + D  # final norm
        n += V * D if include_embedding else 0
        n += 0 if self.tie_embeddings else D * V
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (matmul params, embedding lookup excluded) + causal attention.

        The attention term is 12·L·T·H·K halved for the causal mask (6·L·T·H·K), as MaxText
        and PaLM's appendix B count it; remat recomputation is not counted (this is model FLOPs).
        """
        n_matmul = self.num_params(include_embedding=False) - (2 * self.num_layers + 1) * self.d_model
        if self.qkv_bias:
            n_matmul -= self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim  # added, not multiplied
        if self.tie_embeddings:
            n_matmul += self.vocab_size * self.d_model  # the tied table is still the logits matmul
        return 6.0 * n_matmul + 6.0 * self.num_layers * seq_len * self.num_heads * self.head_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis fills the remaining devices."""

    data: int = -1  # pure data parallelism (params replicated)
    pipeline: int = 1  # pipeline stages (layers split into consecutive stages)
    fsdp: int = 1  # data parallelism with params and optimizer state sharded (ZeRO-3)
    tensor: int = 1  # Megatron tensor parallelism over heads, mlp and vocab

    def __post_init__(self):
        sizes = self.sizes()
        fills = [k for k, v in sizes.items() if v == -1]
        _require(len(fills) <= 1, f"mesh: only one axis may be -1, got {', '.join(f'{k}=-1' for k in fills)}")
        for k, v in sizes.items():
            _require(v == -1 or v >= 1, f"mesh.{k}={v}: axis sizes are positive integers or -1 (fill)")

    def sizes(self) -> dict[str, int]:
        """Axis sizes in mesh order, outermost first."""
        return {"data": self.data, "pipeline": self.pipeline, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the mesh axes are used beyond the logical rules: the pipeline schedule."""

    microbatches: int = 0  # pipeline microbatches per step (0 = 2 x pipeline stages)
    schedule: str = "gpipe"  # pipeline schedule: gpipe or circular
    repeats: int = 1  # circular schedule: layer chunks per stage (virtual stages)
    sequence_parallel: bool = False  # shard the residual stream (norms, residual adds) over tensor along the sequence

    def __post_init__(self):
        _require(self.microbatches >= 0, f"parallel.microbatches={self.microbatches} must be >= 0 (0 = 2 x stages)")
        _require(self.schedule in ("gpipe", "circular"), f"parallel.schedule={self.schedule!r}: use gpipe or circular")
        _require(self.repeats >= 1, f"parallel.repeats={self.repeats} must be >= 1")
        _require(
            self.schedule == "circular" or self.repeats == 1,
            f"parallel.repeats={self.repeats} needs parallel.schedule=circular (gpipe runs each stage's layers once)",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The text corpus and how it is cut into training sequences."""

    paths: tuple[str, ...] = ()  # text files or directories; empty = the Python standard library's source
    seq_len: int = 128  # T, tokens per training sequence
    val_fraction: float = 0.05  # share of files held out for validation (by a hash of the file path)
    max_bytes: int = 0  # cap on the corpus size read (0 = no cap); files are taken in a fixed hashed order
    shuffle: bool = True  # shuffle training windows (seeded by train.seed)
    prefetch: int = 4  # batches prepared ahead of the step by grain's reader threads
    prepared: str = ""  # a prepared data set (scripts/prepare_data.py --out DIR): packed rows with document segments
    workers: int = 0  # prepared data: grain worker processes decoding and packing (0 = a reader thread)

    def __post_init__(self):
        _require(self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _require(self.max_bytes >= 0, f"data.max_bytes={self.max_bytes} must be >= 0 (0 = no cap)")
        _require(self.prefetch >= 0, f"data.prefetch={self.prefetch} must be >= 0")
        _require(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        _require(not (self.workers and not self.prepared), f"data.workers={self.workers} needs data.prepared (a prepared data set); raw text is read by one thread")


OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
COMPRESSIONS = ("none", "bf16", "int8", "topk", "powersgd", "sign")
OUTER = ("none", "diloco", "async_ps")
PS_ALGORITHMS = ("async_sgd", "async_local_sgd")
PUSH_COMPRESSIONS = ("none", "bf16", "int8", "topk", "powersgd")  # what jaxbig.ps can send a push as


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer (optax), its schedule, and how gradients cross the data axis."""

    optimizer: str = "adamw"  # adamw, sgd (with optional momentum/Nesterov), lion or adafactor
    learning_rate: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # after the warmup: constant, cosine, linear (decay) or wsd (warmup-stable-decay)
    warmup_steps: int = 20  # linear warmup from 0 to the peak
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: share of train.steps spent in the final linear decay
    b1: float = 0.9  # adamw and lion: first-moment decay
    b2: float = 0.95  # adamw and lion: second-moment decay (lion: the momentum it keeps)
    eps: float = 1e-8  # adamw: denominator epsilon
    momentum: float = 0.0  # sgd: heavy-ball momentum (0 = plain SGD)
    nesterov: bool = False  # sgd: Nesterov momentum (needs momentum > 0)
    weight_decay: float = 0.1  # decoupled; applied to matrices only, not norms or biases
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    accumulate_steps: int = 1  # microbatches per step: gradients are summed over them before one update
    compression: str = "none"  # gradient exchange over the data axis: none, bf16, int8, topk, powersgd or sign
    powersgd_rank: int = 4  # powersgd: rank of the low-rank gradient approximation
    powersgd_view: str = "matrix"  # powersgd: each layer's weight its own matrix (matrix), layers in the rows (stacked), or all fused
    powersgd_iterations: int = 1  # powersgd: power-iteration steps per train step; each all-reduces P and Q again (bytes x iterations)
    powersgd_vocab: bool = False  # powersgd: compress the embedding and output head too (false: they go exact; their gradients are per-token rows, not low rank)
    topk_fraction: float = 0.01  # topk: share of each gradient's entries sent per step
    error_feedback: bool = True  # compression: add what compression dropped to the next step's gradient
    compression_start_step: int = 0  # compression: exact f32 all-reduce for steps before this one, then compress (0: from the first)
    outer: str = "none"  # none; diloco: local steps per data replica with an outer Nesterov step; async_ps: the parameter server on Ray (the ps section)
    sync_every: int = 8  # diloco: H, inner steps between synchronisations
    outer_learning_rate: float = 0.8  # diloco and ps.algorithm=async_local_sgd: outer learning rate on the delta (paper, H=500: 0.7)
    outer_momentum: float = 0.0  # diloco and async_local_sgd: outer Nesterov momentum (paper, H=500: 0.9; at H=8 it overshoots)
    local_start_step: int = 0  # diloco: synchronous data-parallel steps before this one, then local steps (0: local from the first)

    def __post_init__(self):
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        _require(self.learning_rate > 0, f"optim.learning_rate={self.learning_rate} must be positive")
        _require(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0.0 < self.decay_fraction <= 1.0, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, f"optim.b1={self.b1}, optim.b2={self.b2} must be in [0, 1)")
        _require(0.0 <= self.momentum < 1.0, f"optim.momentum={self.momentum} must be in [0, 1)")
        _require(
            self.momentum == 0.0 or self.optimizer == "sgd",
            f"optim.momentum={self.momentum} applies to optim.optimizer=sgd only, got {self.optimizer!r}; "
            "adamw and lion take optim.b1",
        )
        _require(not self.nesterov or self.momentum > 0, "optim.nesterov=true needs optim.momentum > 0 (e.g. 0.9), got 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _require(self.accumulate_steps >= 1, f"optim.accumulate_steps={self.accumulate_steps} must be >= 1")
        _require(self.compression in COMPRESSIONS, f"optim.compression={self.compression!r}: use one of {', '.join(COMPRESSIONS)}")
        _require(self.powersgd_rank >= 1, f"optim.powersgd_rank={self.powersgd_rank} must be >= 1")
        _require(self.powersgd_iterations >= 1, f"optim.powersgd_iterations={self.powersgd_iterations} must be >= 1")
        _require(
            self.powersgd_view in ("matrix", "stacked", "fused"),
            f"optim.powersgd_view={self.powersgd_view!r}: use matrix, stacked or fused",
        )
        _require(0.0 < self.topk_fraction <= 1.0, f"optim.topk_fraction={self.topk_fraction} must be in (0, 1]")
        _require(self.outer in OUTER, f"optim.outer={self.outer!r}: use none, diloco or async_ps")
        _require(self.sync_every >= 1, f"optim.sync_every={self.sync_every} must be >= 1")
        _require(self.outer_learning_rate > 0, f"optim.outer_learning_rate={self.outer_learning_rate} must be positive")
        _require(0.0 <= self.outer_momentum < 1.0, f"optim.outer_momentum={self.outer_momentum} must be in [0, 1)")
        _require(
            self.compression_start_step >= 0, f"optim.compression_start_step={self.compression_start_step} must be >= 0"
        )
        _require(
            self.compression_start_step == 0 or self.compression != "none",
            f"optim.compression_start_step={self.compression_start_step} delays compression, but optim.compression=none; "
            "set a compression method or the start step back to 0",
        )
        _require(self.local_start_step >= 0, f"optim.local_start_step={self.local_start_step} must be >= 0")
        _require(
            self.local_start_step == 0 or self.outer == "diloco",
            f"optim.local_start_step={self.local_start_step} delays DiLoCo's local steps, but optim.outer={self.outer!r}; "
            "set optim.outer=diloco or the start step back to 0",
        )
        _require(
            self.local_start_step % self.sync_every == 0,
            f"optim.local_start_step={self.local_start_step} is not a multiple of optim.sync_every={self.sync_every}, so the "
            f"synchronisations would not fall on train.steps; use {self.local_start_step - self.local_start_step % self.sync_every} "
            f"or {self.local_start_step - self.local_start_step % self.sync_every + self.sync_every}",
        )
        _require(
            self.outer != "diloco" or self.compression == "none",
            f"optim.outer={self.outer!r} with optim.compression={self.compression!r}: DiLoCo already communicates only every "
            f"optim.sync_every={self.sync_every} steps and sends parameter deltas, not gradients; set optim.compression=none",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """How XLA compiles the steps: a backend option profile and the persistent compilation cache."""

    xla_profile: str = "auto"  # auto (the measured best for the backend), default (XLA's own defaults) or a profile in jaxbig.xla_options
    cache_dir: str = "~/.cache/jaxbig/xla"  # persistent compilation cache: a second run loads its compiled steps ("" = off)

    def __post_init__(self):
        names = profile_names()
        _require(self.xla_profile in names, f"compile.xla_profile={self.xla_profile!r}: use one of {', '.join(names)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: how long, how big, how often to log, evaluate and checkpoint."""

    steps: int = 300  # optimizer steps
    batch_size: int = 16  # B, global sequences per step (split over data x fsdp)
    seed: int = 0  # params init and data order
    run_dir: str = "runs/tiny"  # metrics, TensorBoard events, checkpoints and the resolved config
    log_every: int = 10  # console/JSONL/TensorBoard cadence in steps
    eval_every: int = 50  # validation cadence in steps (also after the last step)
    eval_batches: int = 4  # validation batches per evaluation
    checkpoint_every: int = 100  # checkpoint cadence in steps (also after the last step); 0 = only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept (plus the one with the best eval loss)
    skip_nonfinite: bool = False  # skip updates whose gradients are NaN/Inf (optax.apply_if_finite) instead of stopping
    init_from: str = ""  # a run_dir whose latest params start this run (fine-tuning; e.g. one scripts/convert.py imported); "" = random init

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every={self.checkpoint_every} must be >= 0")
        _require(bool(self.run_dir), "train.run_dir must not be empty")
        _require(
            not self.init_from.startswith("hf:"),
            f"train.init_from={self.init_from!r}: import the Hugging Face model first "
            f"(scripts/convert.py --from hf {self.init_from[3:]} --run_dir runs/NAME), then --init_from runs/NAME",
        )
        _require(
            not self.init_from or Path(self.init_from).resolve() != Path(self.run_dir).resolve(),
            f"train.init_from={self.init_from!r} is the run_dir itself; fine-tune into a new --run_dir",
        )


PRUNE_METHODS = ("none", "magnitude", "nm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Pruning during training (jaxbig.compress.prune): masks in the optimizer state keep pruned weights at zero."""

    method: str = "none"  # none, magnitude (unstructured, to `sparsity`) or nm (N:M: n of every m weights along the contracted axis kept)
    sparsity: float = 0.5  # magnitude: final fraction of the pruned weights set to zero
    initial_sparsity: float = 0.0  # magnitude: sparsity at start_step, ramped to `sparsity` by end_step (Zhu & Gupta cubic)
    scope: str = "layer"  # magnitude: one threshold per weight per layer (layer) or one over all pruned weights (global)
    n: int = 2  # nm: weights kept in every group
    m: int = 4  # nm: group size, consecutive along the weight's contracted (input) axis
    start_step: int = 0  # first mask update, in optimizer steps (masks are all ones before it)
    end_step: int = 0  # last mask update; masks are fixed after it (end_step = start_step: one shot)
    update_every: int = 10  # steps between mask updates in [start_step, end_step]
    include: tuple[str, ...] = (r"blocks/attn/w.*", r"blocks/mlp/w.*")  # regexes (full match) over '/'-joined param paths: the linear layers

    def __post_init__(self):
        _require(self.method in PRUNE_METHODS, f"prune.method={self.method!r}: use one of {', '.join(PRUNE_METHODS)}")
        _require(0.0 <= self.sparsity < 1.0, f"prune.sparsity={self.sparsity} must be in [0, 1)")
        _require(
            0.0 <= self.initial_sparsity <= self.sparsity,
            f"prune.initial_sparsity={self.initial_sparsity} must be in [0, prune.sparsity={self.sparsity}]",
        )
        _require(self.scope in ("layer", "global"), f"prune.scope={self.scope!r}: use layer or global")
        _require(
            1 <= self.n < self.m,
            f"prune.n={self.n}, prune.m={self.m}: N:M sparsity keeps n of every m weights, so it needs 1 <= n < m (e.g. 2:4)",
        )
        _require(self.start_step >= 0, f"prune.start_step={self.start_step} must be >= 0")
        _require(
            self.end_step >= self.start_step,
            f"prune.end_step={self.end_step} is before prune.start_step={self.start_step}; "
            f"use end_step >= start_step (end_step={self.start_step} prunes in one shot)",
        )
        _require(self.update_every >= 1, f"prune.update_every={self.update_every} must be >= 1")
        _require(bool(self.include), "prune.include is empty; name the params to prune, e.g. prune.include=blocks/mlp/w.*")
        for pattern in self.include:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"prune.include pattern {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Knowledge distillation (jaxbig.compress.distill): loss = (1-w)·CE + w·T²·KL(teacher_T || student_T)."""

    teacher: str = ""  # run_dir of a trained teacher (its latest checkpoint); empty = no distillation
    temperature: float = 1.0  # T: both models' logits are divided by it before the softmax
    weight: float = 0.5  # w: share of the KL term in the loss (0 = plain next-token training)

    def __post_init__(self):
        _require(self.temperature > 0, f"distill.temperature={self.temperature} must be positive (1 = the plain softmax)")
        _require(0.0 <= self.weight <= 1.0, f"distill.weight={self.weight} must be in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PSConfig:
    """The parameter server (optim.outer=async_ps, jaxbig.ps): server shards and workers as Ray actors.

    Steps count worker steps (batches of train.batch_size) summed over the workers: train.steps is the
    token budget, and log/eval/checkpoint cadences are in the same steps.
    """

    workers: int = 2  # worker actors; each owns devices_per_worker devices and runs the run's jitted step on them
    devices_per_worker: int = 1  # devices per worker, laid out by the mesh section (one worker's mesh)
    num_server_shards: int = 1  # server actors; the params and their optimizer state are split over them by param groups
    algorithm: str = "async_sgd"  # async_sgd (a gradient per step, applied on arrival) or async_local_sgd (a parameter delta every local_steps)
    max_staleness: int = 4  # SSP bound: a worker more than this many pushes ahead of the slowest waits (0 = synchronous rounds)
    local_steps: int = 8  # async_local_sgd: H, inner steps per push (the fastest worker's, with dynamic_local_steps)
    dynamic_local_steps: bool = True  # async_local_sgd: DyLU (Liu et al. 2024), each worker's H scaled by its measured speed
    momentum_delay: int = 0  # async_local_sgd: N, pushes per delayed Nesterov momentum update (0 = ps.workers; 1 = plain Nesterov)
    worker_slowdown: tuple[float, ...] = ()  # per worker, each >= 1: worker i sleeps (f-1) x its compute time per step (empty: all 1)
    max_restarts: int = 3  # how often Ray restarts a worker whose process died; it rejoins from the server's params

    def __post_init__(self):
        for name in ("workers", "devices_per_worker", "num_server_shards", "local_steps"):
            _require(getattr(self, name) >= 1, f"ps.{name}={getattr(self, name)} must be >= 1")
        _require(self.algorithm in PS_ALGORITHMS, f"ps.algorithm={self.algorithm!r}: use one of {', '.join(PS_ALGORITHMS)}")
        _require(
            self.max_staleness >= 0,
            f"ps.max_staleness={self.max_staleness} must be >= 0 (0 = synchronous rounds, larger = more asynchronous)",
        )
        _require(self.momentum_delay >= 0, f"ps.momentum_delay={self.momentum_delay} must be >= 0 (0 = ps.workers)")
        _require(self.max_restarts >= 0, f"ps.max_restarts={self.max_restarts} must be >= 0")
        _require(
            not self.worker_slowdown or len(self.worker_slowdown) == self.workers,
            f"ps.worker_slowdown has {len(self.worker_slowdown)} entries for ps.workers={self.workers}; give one per worker "
            f"(e.g. {','.join(['1'] * (self.workers - 1) + ['3'])}) or none",
        )
        _require(
            all(f >= 1.0 for f in self.worker_slowdown),
            f"ps.worker_slowdown={','.join(map(str, self.worker_slowdown))}: each factor must be >= 1 (1 = full speed, 3 = 3x slower)",
        )

    def slowdown(self, worker: int) -> float:
        return self.worker_slowdown[worker] if self.worker_slowdown else 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    compile: CompileConfig = CompileConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    ps: PSConfig = PSConfig()

    def __post_init__(self):
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            f"lower data.seq_len or raise model.max_seq_len",
        )
        _require(
            self.optim.warmup_steps <= self.train.steps,
            f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.train.steps}; "
            "shorten the warmup or train longer",
        )
        _require(
            self.train.batch_size % self.optim.accumulate_steps == 0,
            f"train.batch_size={self.train.batch_size} is not divisible by optim.accumulate_steps={self.optim.accumulate_steps}; "
            "each microbatch must hold the same number of sequences",
        )
        steps = (
            ("compression_start_step", self.optim.compression_start_step),
            ("local_start_step", self.optim.local_start_step),
        )
        for name, start in steps:
            _require(
                start < self.train.steps,
                f"optim.{name}={start} is not before train.steps={self.train.steps}, so it would never take effect; "
                f"use a step below {self.train.steps}, or 0 to turn the warm-up off",
            )
        _require(
            self.optim.outer != "diloco" or self.train.steps % self.optim.sync_every == 0,
            f"train.steps={self.train.steps} is not a multiple of optim.sync_every={self.optim.sync_every}; with optim.outer=diloco "
            f"the last {self.train.steps % self.optim.sync_every} inner steps would never reach the synchronised model; "
            f"use train.steps={self.train.steps - self.train.steps % self.optim.sync_every or self.optim.sync_every}",
        )

        if self.optim.outer == "async_ps":
            self._check_ps()
        if self.prune.method != "none":
            _require(
                self.prune.end_step <= self.train.steps,
                f"prune.end_step={self.prune.end_step} exceeds train.steps={self.train.steps}; the sparsity would never reach "
                f"prune.sparsity; use prune.end_step <= {self.train.steps}",
            )
        for section, on in (("prune.method=" + self.prune.method, self.prune.method != "none"), ("distill.teacher", bool(self.distill.teacher))):
            _require(
                not on or (self.optim.compression == "none" and self.optim.outer == "none"),
                f"{section} runs on the standard train step only, not with optim.compression={self.optim.compression!r} / "
                f"optim.outer={self.optim.outer!r} (the shard_map step); set those to none",
            )

    def _check_ps(self) -> None:
        ps, optim = self.ps, self.optim
        _require(
            optim.compression in PUSH_COMPRESSIONS,
            f"optim.compression={optim.compression!r} with optim.outer=async_ps: pushes can be {', '.join(PUSH_COMPRESSIONS)}",
        )
        _require(
            optim.compression_start_step == 0,
            f"optim.compression_start_step={optim.compression_start_step} with optim.outer=async_ps: pushes are compressed from the first; use 0",
        )
        _require(
            not self.data.prepared,
            f"data.prepared={self.data.prepared!r} with optim.outer=async_ps: the parameter server reads raw-text windows "
            "(batch = f(seed, index), one index stream per worker); drop data.prepared",
        )
        _require(
            not (ps.algorithm == "async_sgd" and ps.max_staleness == 0 and self.train.steps % ps.workers),
            f"train.steps={self.train.steps} is not a multiple of ps.workers={ps.workers}; with ps.max_staleness=0 every round "
            f"takes one step from each worker; use train.steps={self.train.steps - self.train.steps % ps.workers or ps.workers}",
        )
        _require(
            not self.train.skip_nonfinite,
            "train.skip_nonfinite=true with optim.outer=async_ps: the server applies every push; set it to false",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"]["paths"] = list(d["data"]["paths"])
        d["prune"]["include"] = list(d["prune"]["include"])
        d["ps"]["worker_slowdown"] = list(d["ps"]["worker_slowdown"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- building


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` converted to the field type `tp`, or raises a ConfigError naming both."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            return tuple(_check_type(key, v, item_tp) for v in value)
    else:  # pragma: no cover - a field type this parser does not know is a bug here
        raise TypeError(f"unsupported config field type {tp} for {key}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {name}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(prefix + c for c in choices)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in hints:
            raise _unknown_key(key, list(hints))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; set its fields, e.g. {key}.{next(iter(_field_types(tp)))}=...")
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _check_type(key, v, tp)
    return cls(**kwargs)


def _set_nested(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is a value, not a section")
    node[parts[-1]] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`model.num_layers=8` -> ("model.num_layers", 8); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. model.num_layers=8")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, model: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML preset at `path`, then `model` (fields of the model section, e.g. the model a
    fine-tune starts from), then `section.key=value` overrides (each key once)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            presets = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
            raise ConfigError(f"config file {str(path)!r} not found; presets: {', '.join(presets) or 'none'}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    if model:
        tree["model"] = {**(tree.get("model") or {}), **model}
    seen: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        if key in seen:
            raise ConfigError(f"{key} is set twice on the command line; keep one")
        seen.add(key)
        _set_nested(tree, key, value)
    return _build(Config, tree, "")


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")


def override_keys(config: Config) -> list[str]:
    """All settable keys, `section.field`, for help texts."""
    return sorted(_flatten(config.to_dict()))


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PSConfig",
    "PruneConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "override_keys",
    "parse_override",
]
