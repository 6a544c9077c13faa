"""Speed options: XLA profiles keep the numbers, the compilation cache is hit on a second run, the regression check fails."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig.config import ConfigError, MeshConfig, load_config
from jaxbig.xla_options import AUTO, AUTO_DTYPE, PROFILES, compiler_options, profile_names
from conftest import TINY_MODEL
from tests.numerics import LINEAR_SGD, assert_close, assert_steps_close, backward_chain, forward_chain


def test_bad_speed_options_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"compile.xla_profile='turbo': use one of auto, default, "):
        load_config(None, ["compile.xla_profile=turbo"])
    with pytest.raises(ConfigError, match=r"model.attention='flash': use auto, einsum or dot_product"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(ValueError, match=r"compile.xla_profile='ynn_all' is not a profile for the gpu backend; use auto or one of default"):
        compiler_options("ynn_all", "gpu")
    assert "auto" in profile_names() and all(name in PROFILES[b] for b in AUTO for name in AUTO[b].values())
    assert compiler_options("auto", "cpu") == PROFILES["cpu"][AUTO["cpu"]["float32"]]
    assert compiler_options("auto", "cpu", "bfloat16") == PROFILES["cpu"][AUTO["cpu"]["bfloat16"]]
    model = load_config(None, []).model
    assert model.dtype == "auto" and model.compute_dtype("gpu") == model.compute_dtype("tpu") == "bfloat16"
    # attention=auto: dot_product on GPU (cuDNN's fused attention, test below), the measured fastest (einsum) on CPU.
    assert model.attention == "auto" and model.attention_impl("gpu") == "dot_product" and model.attention_impl("cpu") == "einsum"
    assert model.attention_impl() == "einsum" and dataclasses.replace(model, attention="dot_product").attention_impl("cpu") == "dot_product"
    assert model.compute_dtype() == AUTO_DTYPE["cpu"]  # these tests run on the CPU backend
    assert load_config(None, ["model.dtype=float32"]).model.compute_dtype("gpu") == "float32"  # an explicit dtype wins


def test_dot_product_names_cudnn_only_where_cudnn_takes_the_call():
    """JAX's own `implementation=None` is XLA's attention on GPUs too, so jaxbig names cuDNN: GPU, bf16/fp16, head_dim
    a multiple of 8 up to 128; never under `portable_attention()` (the export lowers one module for CPU and CUDA)."""
    from jaxbig.models.llama import dot_product_kernel, portable_attention

    assert dot_product_kernel("gpu", jnp.bfloat16, 128) == dot_product_kernel("gpu", jnp.float16, 64) == "cudnn"
    assert dot_product_kernel("gpu", jnp.float32, 64) == "xla"  # cuDNN's flash kernel takes half precision only
    assert dot_product_kernel("gpu", jnp.bfloat16, 256) == dot_product_kernel("gpu", jnp.bfloat16, 60) == "xla"
    assert dot_product_kernel("cpu", jnp.bfloat16, 64) == dot_product_kernel("tpu", jnp.bfloat16, 64) == "xla"
    with portable_attention():
        assert dot_product_kernel("gpu", jnp.bfloat16, 64) == "xla"
    assert dot_product_kernel("gpu", jnp.bfloat16, 64) == "cudnn"  # the block restores the choice


def _compiled_step(profile: str):
    """(step, initial state, batches, model config): the tiny model's train step under the XLA `profile`, SGD linear in the gradient."""
    from jaxbig.data import batch_sharding
    from jaxbig.optim import build_optimizer
    from jaxbig.parallel.mesh import make_mesh
    from jaxbig.train.state import init_train_state
    from jaxbig.train.step import jit_train_step, make_train_step

    cfg = load_config(None, TINY_MODEL + [f"optim.{k}={v}" for k, v in LINEAR_SGD.items()])
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    B, T = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, size=(3, B, T + 1)).astype(np.int32)
    batches = [{"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])} for t in tokens]
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        graphdef, state, shardings, _ = init_train_state(cfg.model, tx, mesh, 0)
        step = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, batch_sharding(mesh, B, T), compiler_options=compiler_options(profile, "cpu"))
    return step, jax.device_get(state), batches, cfg


def test_every_cpu_profile_trains_the_same_model():
    """Each profile changes how XLA compiles the step, not what it computes: each of 3 steps, from the default
    profile's state before it, agrees with the default's within float32 rounding (tests/numerics.py; reassociation
    and fast_math's approximate exp/log are a few units of roundoff per operation, inside those bounds)."""
    step, state, batches, cfg = _compiled_step("default")
    B, T = batches[0]["inputs"].shape
    n_fwd, n_bwd = forward_chain(cfg.model, B, T), backward_chain(cfg.model, B, T)
    states, losses = [state], []
    for batch in batches:
        state, metrics = step(jax.device_put(state), batch)
        states.append(jax.device_get(state))
        losses.append(float(metrics["loss"]))
    for name in PROFILES["cpu"]:
        if name == "default":
            continue
        other, *_ = _compiled_step(name)
        for i, batch in enumerate(batches):
            got, metrics = other(jax.device_put(states[i]), batch)
            assert_close(metrics["loss"], losses[i], n_fwd, err_msg=f"{name} step {i} loss")
            assert_steps_close(got.params, states[i + 1].params, states[i].params, n_bwd)


def test_second_run_loads_its_steps_from_the_compilation_cache(repo, tmp_path, text_dir):
    """Two processes, one cache directory: the first compiles and stores, the second only loads."""
    cache = tmp_path / "xla-cache"
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the session's cache
    summaries = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        cmd = [sys.executable, str(repo / "scripts" / "train.py"), "--mesh", "4x2", "--steps", "2", "--run_dir", str(run_dir), "--no-progress"]
        for o in [*TINY_MODEL, f"data.paths={text_dir}", "data.val_fraction=0.2", "optim.warmup_steps=0", "train.eval_batches=1", f"compile.cache_dir={cache}"]:
            cmd += ["--set", o]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
        assert out.returncode == 0, out.stderr[-2000:]
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    first, second = (s["compilation_cache"] for s in summaries)
    assert first["dir"] == second["dir"] == str(cache)
    assert first["hits"] == 0 and first["misses"] >= 2  # at least the train and eval steps were compiled and stored
    assert second["misses"] == 0 and second["hits"] >= first["misses"] - 1  # the same programs, loaded
    for s in summaries:
        assert s["time_to_first_step_s"] >= s["first_step_s"] > 0 and s["compile_s"] is not None


def test_the_regression_check_fails_a_slow_run(tmp_path):
    from benchmarks.perf import LoopRun, check, read_baseline, write_cpu_section

    doc = tmp_path / "benchmarks.md"
    write_cpu_section(doc, "AMD EPYC", 'text\n<!-- perf:baseline {"tiny@1x1": 8000, "small@4x2": 3000} -->')
    baseline = read_baseline("AMD EPYC", doc)

    def run(config, mesh, tokens_per_s):
        return LoopRun(
            config=config, mesh=mesh, batch=16, seq_len=128, tokens_per_step=2048, flops_per_token=1e6, num_params=10**6,
            step_s=[2048 / tokens_per_s] * 5, first_call_s=2.0, compile_s=1.0, time_to_first_step_s=3.0, peak_rss_mib=500.0, final_loss=2.0,
        )

    assert check([run("tiny", "1x1", 7000), run("small", "4x2", 2900)], baseline, margin=0.15) == []
    slow = check([run("tiny", "1x1", 6000), run("small", "4x2", 2900), run("d512", "1x1", 10)], baseline, margin=0.15)
    assert slow == ["tiny@1x1: 6,000 tokens/s < 0.85 x baseline 8,000"]
    with pytest.raises(ValueError, match="no `perf:baseline` for CPU 'AMD EPYC'"):
        read_baseline("AMD EPYC", tmp_path / "missing.md")


def test_perf_report_divides_bfloat16_rows_by_the_bfloat16_peak():
    """MFU per row against the peak of the row's compute dtype: a bfloat16 run divided by the float32 peak read 1.34 on
    d512 (impossible); jaxbig's `model.dtype=bfloat16` rows and the peers' `--dtype bfloat16` rows take the bf16 peak."""
    from benchmarks.perf import LoopRun, report

    def run(config, tokens_per_s):
        return LoopRun(
            config=config, mesh="1x1", batch=16, seq_len=256, tokens_per_step=4096, flops_per_token=22.4e6, num_params=3_540_000,
            step_s=[4096 / tokens_per_s] * 5, first_call_s=2.0, compile_s=1.0, time_to_first_step_s=3.0, peak_rss_mib=500.0, final_loss=2.0,
        )

    peers = {"small": [{"label": "PyTorch eager, 2 threads `--dtype` `bfloat16`", "tokens_per_s": 7000.0, "first_step_s": None}]}
    text = report([run("small", 4000.0), run("small bf16", 6000.0)], None, {}, peers, 140e9, 300e9, command="x", load=(0.0, 0.0))
    mfu = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 13 and cells[1] == "1x1":  # the loop table: config | mesh | ... | MFU (8th)
            mfu["loop", cells[0]] = float(cells[7])
        elif len(cells) == 6 and cells[0] == "small":  # side by side: shape | implementation | tokens/s | GFLOP/s | MFU | ratio
            mfu["side", cells[1]] = float(cells[4])
    assert mfu["loop", "small"] == round(4000 * 22.4e6 / 140e9, 3)
    assert mfu["loop", "small bf16"] == round(6000 * 22.4e6 / 300e9, 3)
    assert mfu["side", "jaxbig, `model.dtype=bfloat16` (float32 params)"] == round(6000 * 22.4e6 / 300e9, 3)
    assert mfu["side", peers["small"][0]["label"]] == round(7000 * 22.4e6 / 300e9, 3)
    assert max(mfu.values()) <= 1.0


def test_perf_times_a_real_train_py_process(tmp_path, text_dir):
    """`bench.py --perf`'s row: one `scripts/train.py` process on the preset's own shape, its per-step times read back
    from metrics.jsonl (the compile step and SKIP_STEPS warm steps dropped) and its start-up from summary.json."""
    from benchmarks.perf import SKIP_STEPS, train_process

    steps = SKIP_STEPS + 6
    run = train_process("tiny", "1x1", steps, tmp_path / "cache", [f"data.paths={text_dir}", "data.val_fraction=0.2"])
    cfg = load_config(None)  # configs/tiny.yaml spells out the defaults
    assert (run.batch, run.seq_len, run.tokens_per_step) == (cfg.train.batch_size, cfg.data.seq_len, cfg.train.batch_size * cfg.data.seq_len)
    assert len(run.step_s) == steps - 1 - SKIP_STEPS and all(s > 0 for s in run.step_s), run.step_s
    assert run.time_to_first_step_s >= run.first_call_s > run.compile_s > 0
    assert np.isfinite(run.final_loss) and run.peak_rss_mib > 100


_FAULTS_SCRIPT = """
import resource, sys
sys.path.insert(0, {repo!r})
import jaxbig, jaxbig.runtime
import jax, jax.numpy as jnp

@jax.jit
def step(x):  # a 64 MiB temporary per call (XLA:CPU allocates it per execution)
    y = jnp.outer(x, x)
    return (jnp.sin(y) @ x).sum()

x = jnp.ones(4096)
faults = []
for _ in range(20):  # the heap settles within the first few calls; the median is a settled call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(jaxbig.runtime.host_malloc_tuned, sorted(faults[8:])[6])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (jaxbig.runtime.tune_host_malloc) are Linux-only")
def test_step_buffers_stay_mapped_between_calls(repo):
    """`import jaxbig` keeps XLA:CPU's per-call temporary buffer in the heap: a settled call does not
    page-fault it back in (16,384 faults per call for 64 MiB with glibc's defaults)."""

    def faults_per_call(malloc: str) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
        env.update(JAXBIG_HOST_MALLOC=malloc, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT.format(repo=str(repo))], env=env, capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    tuned, faults = faults_per_call("")
    default_tuned, default_faults = faults_per_call("default")
    assert (tuned, default_tuned) == ("True", "False")
    assert default_faults > 10_000, f"glibc's defaults should page-fault the 64 MiB temporary each call; got {default_faults} faults"
    assert faults < 1_000, f"with jaxbig's malloc settings a call page-faulted {faults} times (defaults: {default_faults})"


def test_sequence_parallel_steps_avoid_the_profiles_xla_cannot_compile_them_with(tmp_path, text_dir):
    """XLA:CPU's YNNPACK elementwise fusions reject a sequence-parallel step's layout at the first call;
    `auto` picks a profile that runs it, and naming a failing one is refused before the run starts."""
    from jaxbig.train.loop import train
    from jaxbig.xla_options import AUTO_SEQUENCE_PARALLEL, NOT_WITH_SEQUENCE_PARALLEL

    assert AUTO_SEQUENCE_PARALLEL["cpu"]["float32"] not in NOT_WITH_SEQUENCE_PARALLEL["cpu"]
    assert compiler_options("auto", "cpu", sequence_parallel=True) == PROFILES["cpu"][AUTO_SEQUENCE_PARALLEL["cpu"]["float32"]]
    with pytest.raises(ValueError, match=r"compile.xla_profile='ynn_all' cannot compile a sequence-parallel step on cpu .* use compile.xla_profile=auto \(here ynn_reduce\)"):
        compiler_options("ynn_all", "cpu", sequence_parallel=True)

    sets = [*TINY_MODEL, f"data.paths=[{text_dir}]", "mesh.data=4", "mesh.tensor=2", "parallel.sequence_parallel=true",
            "train.steps=2", "optim.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=0"]
    summary = train(load_config(None, [*sets, f"train.run_dir={tmp_path / 'auto'}"]), progress=False)
    assert np.isfinite(summary["final_loss"])
    with pytest.raises(ConfigError, match="cannot compile a sequence-parallel step"):
        train(load_config(None, [*sets, "compile.xla_profile=ynn_all", f"train.run_dir={tmp_path / 'named'}"]), progress=False)
    assert not (tmp_path / "named").exists()


def test_attention_kernels_benchmark_names_xla_on_cpu(capsys):
    """`python -m benchmarks.attention_kernels` (the GPU measurement in docs/benchmarks.md) runs here, smaller: on CPU
    every dot_product row is XLA's attention (no cuDNN call)."""
    from benchmarks import attention_kernels

    assert attention_kernels.main(["--config", "tiny", "--batch", "1", "--seq-len", "32", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip() for r in rows] == [name for name, _, _ in attention_kernels.KERNELS]
    assert [r[1].strip() for r in rows] == ["-", "xla", "xla"] and all(r[2].strip() == "0" for r in rows)
    # All three rows train the same fresh model (tests/test_model.py::test_speed_options_compute_the_same_model checks
    # einsum against dot_product within float32 bounds): a loss near log V, the near-uniform start.
    vocab = load_config(None, []).model.vocab_size
    assert all(abs(float(r[7]) - np.log(vocab)) < 0.5 for r in rows)
