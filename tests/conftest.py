"""Every test runs on 8 emulated CPU devices with rank promotion raising (STYLE habit 8)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
