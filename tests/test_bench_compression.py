"""The compression benchmark's byte accounting: a method on its own mesh is compared with `none` on that mesh."""

import pytest

from benchmarks import compression
from jaxbig.parallel.mesh import make_mesh

SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=16", "model.d_ff=128",
         "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "optim.warmup_steps=2"]  # fmt: skip


def test_diloco_on_two_replicas_is_measured_against_the_exact_all_reduce_on_its_own_mesh(tmp_path, monkeypatch):
    methods = {m: compression.METHODS[m] for m in ("none", "diloco", "diloco-m2")}
    monkeypatch.setattr(compression, "METHODS", methods)
    results = {r.name: r for r in compression.run(None, 16, (), tmp_path, SMALL, say=lambda *a, **k: None)}

    assert dict(make_mesh(results["diloco-m2"].cfg.mesh).shape)["data"] == 2
    assert dict(make_mesh(results["diloco"].cfg.mesh).shape)["data"] == 8
    assert results["diloco"].exact_bytes == results["none"].bytes_per_step
    # A ring all-reduce sends 2(N-1)/N of what each device holds: 7/4 of the gradient over 8 replicas;
    # over 2 replicas 1x of the quarter that tensor=4 leaves on a device (norm scales stay whole).
    ratio = results["diloco-m2"].exact_bytes / results["none"].bytes_per_step
    assert 0.25 / 1.75 <= ratio < 0.2
    for name in ("diloco", "diloco-m2"):
        r = results[name]
        assert r.warmup_steps == 8  # a fifth of 16 steps, rounded up to H
        assert r.fraction == pytest.approx(1 / 8, rel=0.02)  # synchronises every H = 8 steps
        assert r.average_fraction == pytest.approx((8 + 8 / 8) / 16, rel=0.02)  # 8 exact steps, then 8 local ones
    table = compression.table(list(results.values()))
    assert "mesh data=2, tensor=4" in table and "0.1250" in table
