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
