"""The model shape a peer trains, with jaxbig's parameter and FLOP counts. Standard library only.

The peers run in their own environments (PyTorch, MaxText), without jaxbig or JAX, so the
two formulas are copied here from `jaxbig.config.ModelConfig.num_params` and
`ModelConfig.flops_per_token`; `tests/test_peers.py` checks the copies still agree.
Letters as in `jaxbig.models.llama`: D d_model, L layers, H heads, N kv heads, K head dim,
F d_ff, V vocab, T sequence length.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    vocab_size: int = 256  # V
    d_model: int = 256  # D
    num_layers: int = 4  # L
    num_heads: int = 4  # H
    num_kv_heads: int = 4  # N (grouped-query attention when < H)
    head_dim: int = 64  # K
    d_ff: int = 768  # F, SwiGLU hidden width
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Copy of `ModelConfig.num_params`: weights, norm scales, no biases."""
        D, F, L, H, N, K, V = self.d_model, self.d_ff, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.vocab_size
        per_layer = D * H * K + 2 * D * N * K + H * K * D + 3 * D * F + 2 * D
        n = L * per_layer + D  # final norm
        n += V * D if include_embedding else 0
        n += 0 if self.tie_embeddings else D * V
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Copy of `ModelConfig.flops_per_token`: 6 x matmul params + 6·L·T·H·K (causal attention, halved)."""
        n_matmul = self.num_params(include_embedding=False) - (2 * self.num_layers + 1) * self.d_model
        if self.tie_embeddings:
            n_matmul += self.vocab_size * self.d_model
        return 6.0 * n_matmul + 6.0 * self.num_layers * seq_len * self.num_heads * self.head_dim
