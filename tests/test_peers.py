"""The benchmark peers (`benchmarks/peers/`) count params and FLOPs as jaxbig does."""

import dataclasses

import pytest

from benchmarks.peers.shapes import Shape
from jaxbig.config import ModelConfig

SHAPES = [
    Shape(),  # configs/small.yaml
    Shape(d_model=512, num_heads=8, d_ff=1536),  # the d=512 shape of issue 9
    Shape(d_model=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16, d_ff=200, vocab_size=300, tie_embeddings=True),
]


def _model_config(s: Shape) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in dataclasses.asdict(s).items() if k in fields})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s.d_model}H{s.num_heads}N{s.num_kv_heads}tie{int(s.tie_embeddings)}")
def test_peer_formulas_match_jaxbig(shape):
    cfg = _model_config(shape)
    assert shape.num_params() == cfg.num_params()
    assert shape.num_params(include_embedding=False) == cfg.num_params(include_embedding=False)
    assert shape.flops_per_token(256) == cfg.flops_per_token(256)


@pytest.mark.parametrize("shape", SHAPES[::2], ids=["small", "gqa-tied"])
def test_torch_peer_has_jaxbig_param_count(shape):
    pytest.importorskip("torch")  # the peer runs in its own venv (make bench-peers); CI has no torch
    from benchmarks.peers import torch_llama

    model = torch_llama.Llama(shape, max_seq_len=32)
    assert sum(p.numel() for p in model.parameters()) == _model_config(shape).num_params()
