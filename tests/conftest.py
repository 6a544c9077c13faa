"""Every test runs on 8 emulated CPU devices with rank promotion raising (STYLE habit 8)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # one persistent compilation cache per test session (subprocesses too)
    import tempfile

    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxbig-test-xla-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A small real-text corpus: 40 stdlib modules copied into a directory (fast to load)."""
    from jaxbig.data.corpus import stdlib_root

    out = tmp_path_factory.mktemp("corpus")
    files = sorted(stdlib_root().glob("*.py"))[:40]
    for f in files:
        (out / f.name).write_bytes(f.read_bytes())
    return out


# A model small enough that a run of a few steps takes seconds (tests of the loop, not of the model).
TINY_MODEL = [
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.d_ff=128",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.batch_size=8",
]
TINY = [*TINY_MODEL, "train.eval_batches=2", "optim.warmup_steps=5"]
# A run of 3 steps for the export and serving tests (what is exported matters, not how well it learned).
SMALL = [
    *TINY_MODEL,
    "data.val_fraction=0.2",
    "train.steps=3",
    "train.log_every=3",
    "train.eval_every=3",
    "train.eval_batches=1",
    "optim.warmup_steps=1",
    "mesh.data=8",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, text_dir) -> Path:
    """`text_dir` prepared as byte-level ArrayRecord shards (scripts/prepare_data.py's format)."""
    from jaxbig.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "bytes"
    prepare([str(text_dir)], out, val_fraction=0.2, shard_mb=0.2)
    return out


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, text_dir) -> tuple[Path, Path]:
    """(run_dir, staging): a SMALL run exported as float32 version 1 and int8 version 2 under `staging`, each as a
    SavedModel and as ONNX when onnxruntime and jax2onnx are installed. Trained and exported once per session: the
    serving and monitoring tests copy the versions they serve out of `staging`."""
    import importlib.util

    from jaxbig.config import load_config
    from jaxbig.export.bundle import export_run
    from jaxbig.train.loop import train

    root = tmp_path_factory.mktemp("serve")
    run_dir = root / "run"
    train(load_config(None, SMALL + [f"train.run_dir={run_dir}", f"data.paths={text_dir}"]), progress=False)
    staging = root / "staging"
    fmt = "all" if all(importlib.util.find_spec(m) for m in ("onnxruntime", "jax2onnx")) else "savedmodel"
    export_run(run_dir, staging, 1, quantize="none", format=fmt)
    export_run(run_dir, staging, 2, quantize="int8", format=fmt)
    return run_dir, staging
