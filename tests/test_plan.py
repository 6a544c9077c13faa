"""Planning a layout (compiled memory and traffic on abstract inputs), the HLO loop counts, and the layout guards."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbig.config import ConfigError, MeshConfig, ModelConfig, load_config
from jaxbig.parallel.guards import check_divisibility, check_fsdp_replication, replicated_over
from jaxbig.parallel.hlo import collective_bytes, parse_collectives
from jaxbig.parallel.mesh import make_mesh, parse_mesh_spec
from jaxbig.parallel.pipeline import bubble_fraction, num_microbatches
from jaxbig.parallel.rules import RULES, tree_shardings
from jaxbig.train.plan import analytic_param_bytes, pipeline_bubble, plan_layout
from jaxbig.train.state import logical_axes

SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "model.d_ff=128",
         "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8"]  # fmt: skip


def _cfg(spec: str, *extra: str):
    return load_config(None, SMALL + [f"mesh.{k}={v}" for k, v in parse_mesh_spec(spec).items()] + list(extra))


def test_plan_reads_memory_and_traffic_and_params_match_the_analytic_count():
    spec = "fsdp=4,tensor=2"
    cfg = _cfg(spec)
    p = plan_layout(cfg, make_mesh(cfg.mesh, spec=spec), name="small")
    n = cfg.model.num_params()
    assert abs(p.param_error) < 0.01  # compiled per-device param bytes vs shapes / mesh sizes
    assert p.param_bytes_analytic == pytest.approx(analytic_param_bytes(cfg.model, {"fsdp": 4, "tensor": 2}))
    assert n * 4 / 8 < p.param_bytes < n * 4 / 8 * 1.05  # almost everything split 8 ways; norm scales whole
    assert p.opt_bytes == pytest.approx(2 * p.param_bytes, abs=64)  # Adam mu and nu, sharded like the params
    inputs = p.param_bytes + p.opt_bytes + p.batch_bytes + p.other_input_bytes
    assert inputs == pytest.approx(p.argument_bytes, rel=0.01)
    assert p.temp_bytes > 0 and p.peak_bytes > inputs
    assert p.collectives["all-reduce"] > 0 and p.collectives["all-gather"] > 0  # TP all-reduces, FSDP all-gathers
    assert set(p.collective_axes["all-gather"]) >= {"fsdp"} and "tensor" in p.collective_axes["all-reduce"]
    assert p.bubble == 0 and not p.unknown_trip_counts


def test_analytic_count_is_num_params_and_follows_the_mesh():
    m = ModelConfig(num_kv_heads=2)
    one = analytic_param_bytes(m, {})
    assert one == m.num_params() * 4
    assert analytic_param_bytes(m, {"fsdp": 8}) < one / 7  # all but the norm scales split 8 ways
    # 2 KV heads on tensor=4: K/V replicated over tensor, the rest split
    kv = m.num_layers * 2 * m.d_model * m.num_kv_heads * m.head_dim * 4
    assert analytic_param_bytes(m, {"tensor": 4}) == pytest.approx((one - kv - 9 * m.d_model * 4) / 4 + kv + 9 * m.d_model * 4)


def test_pipeline_bubble_formula():
    assert pipeline_bubble(1, 0) == 0
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11)  # GPipe (p-1)/(m+p-1)
    assert pipeline_bubble(4, 0) == pytest.approx(3 / 11)  # m defaults to 2p
    assert pipeline_bubble(4, 8, repeats=2) == pytest.approx(3 / 19)  # circular (p-1)/(v*m+p-1)


def test_plan_compiles_the_pipeline_schedule_the_loop_runs():
    spec = "data=2,tensor=2,pipeline=2"
    cfg = _cfg(spec)  # 2 layers, one per stage; batch 8 = data 2 x 4 microbatches (2 x stages)
    p = plan_layout(cfg, make_mesh(cfg.mesh, spec=spec), name="small")
    assert abs(p.param_error) < 0.01  # the layer stack split over pipeline, as analytic_param_bytes assumes
    assert p.param_bytes_analytic == pytest.approx(analytic_param_bytes(cfg.model, {"data": 2, "tensor": 2, "pipeline": 2}))
    assert p.bubble == pytest.approx(bubble_fraction(2, num_microbatches(cfg.parallel, 2), 1)) == pytest.approx(1 / 5)
    assert p.schedule == "gpipe, 4 microbatches"
    # activations move between stages: ppermutes over pipeline, once per schedule step (loop trip counts known)
    assert p.collective_axes["collective-permute"].get("pipeline", 0) > 0 and not p.unknown_trip_counts


def test_plan_refuses_a_pipeline_the_loop_refuses():
    cfg = _cfg("data=2,pipeline=2", "parallel.microbatches=3")
    with pytest.raises(ConfigError, match="parallel.microbatches=3 is not a multiple of the 2 pipeline stages"):
        plan_layout(cfg, make_mesh(cfg.mesh, spec="data=2,pipeline=2"))


def test_collectives_in_a_loop_count_once_per_iteration():
    mesh = make_mesh(MeshConfig(fsdp=8))
    w = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

    def forward(w, x):  # FSDP: each layer's weight is all-gathered inside the scan
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    hlo = jax.jit(forward).lower(w, x).compile().as_text()
    (gather,) = [c for c in parse_collectives(hlo, mesh) if c.kind == "all-gather"]
    assert (gather.count, gather.count_known, gather.axes, gather.result_bytes) == (5, True, ("fsdp",), 64 * 64 * 4)
    assert collective_bytes(hlo, mesh, over="fsdp")["all-gather"] == 5 * 64 * 64 * 4 * 7 / 8
    (line,) = [ln for ln in hlo.splitlines() if " all-gather(" in ln]
    (alone,) = parse_collectives(line, mesh)  # a lone instruction line still parses, run once
    assert (alone.count, alone.axes) == (1, ("fsdp",))


def test_divisibility_errors_name_the_numbers_and_the_fix():
    m = ModelConfig(num_heads=12, num_kv_heads=4, head_dim=16, d_ff=384, d_model=96, vocab_size=264)
    with pytest.raises(ConfigError, match=r"model.num_heads=12 is not divisible by mesh tensor=8.*use tensor in \{1, 2, 4, 12\}"):
        check_divisibility(m, {"tensor": 8})
    with pytest.raises(ConfigError, match=r"model.num_kv_heads=4 does not fit mesh tensor=6: .*neither"):
        check_divisibility(m, {"tensor": 6})
    with pytest.raises(ConfigError, match=r"model.vocab_size=250 is not divisible by mesh tensor=4.*pad model.vocab_size"):
        check_divisibility(ModelConfig(vocab_size=250), {"tensor": 4})
    with pytest.raises(ConfigError, match=r"model.d_ff=510 is not divisible by mesh tensor=4"):
        check_divisibility(ModelConfig(d_ff=510), {"tensor": 4})
    with pytest.raises(ConfigError, match=r"model.d_model=96 is not divisible by mesh fsdp=5: .*use fsdp in \{1, 2, 3, 4, 6, 8, 12, 16\}"):
        check_divisibility(m, {"fsdp": 5})
    check_divisibility(m, {"tensor": 12, "fsdp": 8})  # 4 KV heads on tensor=12: replicated, allowed
    check_divisibility(ModelConfig(num_kv_heads=2), {"tensor": 4})


def test_fsdp_refuses_a_layout_that_leaves_params_replicated():
    mesh = make_mesh(MeshConfig(fsdp=8))
    m = ModelConfig()
    _, abstract, logical = logical_axes(m)
    shardings = tree_shardings(logical, abstract, mesh)
    share, offenders = replicated_over(abstract, shardings, "fsdp")
    assert share < 0.002 and {o.split("/")[-2] for o, _ in offenders} == {"attn_norm", "mlp_norm", "final_norm"}
    check_fsdp_replication(abstract, shardings, mesh)  # the rules' layout passes
    # Rules that no longer split `embed` over fsdp: every weight stays whole on every fsdp shard.
    bad = tree_shardings(logical, abstract, mesh, rules=tuple((k, () if k == "embed" else v) for k, v in RULES))
    with pytest.raises(ConfigError, match=r"mesh fsdp=8 leaves 100.0% of the parameter bytes replicated over fsdp \(limit 2%\); largest: blocks/mlp/w_"):
        check_fsdp_replication(abstract, bad, mesh)


def test_train_refuses_a_bad_layout_before_allocating(tmp_path):
    from jaxbig.train.loop import train

    cfg = load_config(None, SMALL + [f"train.run_dir={tmp_path / 'r'}", "mesh.data=1", "mesh.tensor=8"])
    with pytest.raises(ConfigError, match="model.num_heads=4 is not divisible by mesh tensor=8"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_plan_script(repo):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    sets = [a for o in SMALL for a in ("--set", o)]
    out = subprocess.run([sys.executable, "scripts/plan.py", "--mesh", "data=2,fsdp=2", *sets], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=2,pipeline=1,fsdp=2,tensor=1 (4 devices)" in out.stdout and "(+0.00%)" in out.stdout
    bad = subprocess.run([sys.executable, "scripts/plan.py", "--mesh", "data=2,pipeline=4", *sets], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.num_layers=2 is not divisible by pipeline stages x repeats = 4 x 1" in bad.stderr and "Traceback" not in bad.stderr


# Configs whose step differs from the plain one: compression and DiLoCo (the data-parallel step under shard_map),
# gradient accumulation (a microbatch loop) and distillation (the teacher's params an input). mesh, --set overrides.
STEP_KINDS = {
    "accumulate": ("4x2", ["optim.accumulate_steps=4", "train.batch_size=32"]),
    "distill": ("4x2", ["distill.weight=0.5"]),  # its teacher: the `accumulate` run
    "int8": ("8", ["optim.compression=int8"]),
    "diloco": ("8", ["optim.outer=diloco", "optim.sync_every=2"]),
}
# For each config, in one process (one start-up): scripts/train.py's main(), XLA's dump of its step moved to the
# config's folder, then the planner (scripts/plan.py's plan_layout) on the same config. The persistent compilation
# cache, empty at the start, holds what training compiled: a plan of the very same program loads it (a cache hit:
# the key hashes the lowered module and the compile options), any other program compiles anew.
TRAIN_THEN_PLAN = """
import json, shutil, sys
from pathlib import Path
from scripts.train import main
from jaxbig.config import load_config
from jaxbig.parallel.mesh import make_mesh
from jaxbig.train.plan import plan_layout
from jaxbig.xla_options import cache_stats
dump, plans = Path(sys.argv[1]), {}
for name, spec, argv, overrides in json.loads(sys.argv[2]):
    if main(argv) != 0:
        sys.exit(f"scripts/train.py {' '.join(argv)} failed")
    (dump / name).mkdir()
    for f in dump.glob("*.txt"):
        shutil.move(f, dump / name / f.name)
    hits = cache_stats["hits"]
    cfg = load_config(None, overrides)
    p = plan_layout(cfg, make_mesh(cfg.mesh, spec=spec))
    plans[name] = dict(collectives=p.collectives, runs=p.collective_runs, teacher_bytes=p.teacher_bytes,
                       conditional_bytes=p.conditional_bytes, cache_hits=cache_stats["hits"] - hits)
(dump / "plans.json").write_text(json.dumps(plans))
"""


def test_plan_reports_the_collective_bytes_of_the_step_train_compiles(tmp_path, repo, text_dir):
    """scripts/plan.py's figures against XLA's own dump of the step scripts/train.py compiles for the same config,
    and the planner's program is that very program (it loads training's compiled step from the persistent cache)."""
    from jaxbig.parallel.hlo import KINDS

    run = ["train.eval_batches=1", "optim.warmup_steps=0", "train.steps=2", f"compile.cache_dir={tmp_path / 'xla-cache'}", f"data.paths={text_dir}"]
    cases, cfgs = [], {}
    for name, (spec, extra) in STEP_KINDS.items():
        teacher = [f"distill.teacher={tmp_path / 'accumulate'}"] if name == "distill" else []
        own = run + extra + teacher + [f"train.run_dir={tmp_path / name}"]
        overrides = [o for o in SMALL if o.split("=")[0] not in {e.split("=")[0] for e in own}] + own
        with_mesh = overrides + [f"mesh.{k}={v}" for k, v in parse_mesh_spec(spec).items()]
        cfgs[name] = load_config(None, with_mesh)
        cases.append((name, spec, ["--mesh", spec, "--no-progress", *(a for o in overrides for a in ("--set", o))], with_mesh))
    dump = tmp_path / "hlo"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}  # compile.cache_dir: a new one
    env["XLA_FLAGS"] = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_(train|local|distill_train)_step"
    out = subprocess.run([sys.executable, "-c", TRAIN_THEN_PLAN, str(dump), json.dumps(cases)], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    plans = json.loads((dump / "plans.json").read_text())
    for name, p in plans.items():
        (step_hlo,) = (dump / name).glob("*.cpu_after_optimizations.txt")
        mesh = make_mesh(cfgs[name].mesh, spec=STEP_KINDS[name][0])
        hlo = step_hlo.read_text()
        trained = collective_bytes(hlo, mesh)
        assert p["collectives"] == trained, (name, p["collectives"], trained)
        assert p["runs"] == {k: sum(c.count for c in parse_collectives(hlo, mesh) if c.kind == k) for k in KINDS}, name
        assert sum(trained.values()) > 0, name
        assert p["cache_hits"] == 1, f"{name}: the planner compiled a program training did not"
    assert plans["distill"]["teacher_bytes"] > 0 and plans["diloco"]["conditional_bytes"] > 0


def test_benchmark_section_is_replaced_and_the_rest_kept(tmp_path, repo):
    from benchmarks.harness import write_section

    doc = tmp_path / "benchmarks.md"
    doc.write_text((repo / "docs" / "benchmarks.md").read_text())
    foundation = doc.read_text()
    write_section(doc, "SECTION-ONE", "<!-- s -->", "<!-- e -->", "## Title\n")
    write_section(doc, "SECTION-TWO", "<!-- s -->", "<!-- e -->", "## Title\n")
    text = doc.read_text()
    assert text.startswith(foundation.rstrip("\n")) and "SECTION-TWO" in text and "SECTION-ONE" not in text and text.count("## Title") == 1


def test_bf16_all_reduce_widened_by_the_cpu_backend_is_flagged():
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tensor")))
    w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("tensor")))
    hlo = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P())).lower(x, w).compile().as_text()  # row-parallel
    (c,) = parse_collectives(hlo, mesh)
    assert c.kind == "all-reduce" and c.axes == ("tensor",)
    # XLA CPU reduces bf16 partial sums in f32 (research notes, parallel.md section 3): 4 bytes an element, flagged.
    assert c.promoted and c.result_bytes == 64 * 256 * 4


def test_llama_1b_preset_has_the_published_size(repo):
    m = load_config(repo / "configs" / "llama_1b.yaml").model
    assert m.num_params() == 1_235_814_400  # Llama 3.2 1B: 1.24B with tied embeddings
    assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff, m.vocab_size) == (2048, 16, 32, 8, 64, 8192, 128256)
    assert m.tie_embeddings and m.rope_theta == 500_000.0
