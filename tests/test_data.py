"""Tokenizer, corpus split and the grain pipeline."""

import jax
import numpy as np
import pytest

from jaxbig.config import ConfigError, MeshConfig
from jaxbig.data import ByteTokenizer, CorpusError, eval_batches, load_corpus, train_batches
from jaxbig.data.corpus import stdlib_root
from jaxbig.parallel.mesh import make_mesh


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + x  # ünïcode"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="NUL"):
        tok.encode("a\x00b")


def test_stdlib_corpus_is_real_and_split_by_file():
    c = load_corpus(max_bytes=2_000_000)
    assert c.num_train_files > 10 and c.num_val_files >= 1
    assert len(c.train_BYTES) > 10 * len(c.val_BYTES) > 0
    assert b"def " in c.train_BYTES[:200_000].tobytes()
    assert str(stdlib_root()) in c.source
    again = load_corpus(max_bytes=2_000_000)  # deterministic
    np.testing.assert_array_equal(c.val_BYTES, again.val_BYTES)


def test_user_paths(text_dir, tmp_path):
    c = load_corpus((str(text_dir),), val_fraction=0.2)
    assert c.num_train_files + c.num_val_files == 40
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus((str(tmp_path / "missing"),))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no text files found"):
        load_corpus((str(tmp_path / "empty"),))
    (tmp_path / "one.txt").write_text("hello world\n")
    with pytest.raises(CorpusError, match="0 validation files"):
        load_corpus((str(tmp_path / "one.txt"),))


def test_batches_are_a_function_of_the_step_and_sharded_over_data(text_dir):
    c = load_corpus((str(text_dir),), val_fraction=0.2)
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    first = train_batches(c.train_BYTES, 32, 8, mesh, seed=1, prefetch=0)
    seen = [next(first) for _ in range(5)]
    resumed = next(train_batches(c.train_BYTES, 32, 8, mesh, seed=1, start_step=3, prefetch=2))
    np.testing.assert_array_equal(resumed["inputs"], seen[3]["inputs"])
    b = seen[0]
    assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(b["inputs"])[:, 1:], np.asarray(b["targets"])[:, :-1])
    assert b["inputs"].sharding.spec[0] == "data"
    assert len(b["inputs"].addressable_shards) == 8 and b["inputs"].addressable_shards[0].data.shape == (2, 32)
    other_seed = next(train_batches(c.train_BYTES, 32, 8, mesh, seed=2, prefetch=0))
    assert not np.array_equal(other_seed["inputs"], b["inputs"])
    val = eval_batches(c.val_BYTES, 32, 8, mesh, 2)
    assert len(val) == 2 and not np.array_equal(val[0]["inputs"], val[1]["inputs"])


def test_batch_must_divide_over_replicas(text_dir):
    c = load_corpus((str(text_dir),), val_fraction=0.2)
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    with pytest.raises(ConfigError, match=r"train.batch_size=6 is not divisible by data x fsdp = 4 x 1 = 4"):
        next(train_batches(c.train_BYTES, 32, 6, mesh, seed=0))
    assert jax.device_count() == 8
