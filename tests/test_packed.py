"""Packed training input from prepared shards: rows are the document stream cut at T, segments keep documents
apart in attention, and the grain iterator resumes exactly from its saved state (with worker processes too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig.config import MeshConfig, ModelConfig
from jaxbig.data.packed import packed_batches, packed_dataset, row_positions
from jaxbig.data.prepare import PreparedData
from jaxbig.models import create_model
from jaxbig.parallel.mesh import make_mesh
from tests.numerics import assert_close, forward_chain

T = 32


def test_rows_are_the_document_stream_cut_at_T(prepared_dir):
    data = PreparedData(prepared_dir)
    eos = data.tokenizer.eos_id
    it = iter(packed_dataset(data, "train", T, 4, seed=0, shuffle=False))
    rows = [next(it) for _ in range(150)]
    inputs = np.concatenate([r["inputs"].reshape(-1) for r in rows])
    targets = np.concatenate([r["targets"].reshape(-1) for r in rows])
    docs = data.documents("train")
    stream = np.concatenate([data.decode(docs[i]) for i in range(len(docs))] * 2)  # unshuffled: index order
    assert len(inputs) < len(stream)
    # Inputs are the documents back to back; targets the next token within the same document (eos at its end).
    ends = np.cumsum([len(data.decode(docs[i])) for i in range(len(docs))])
    expected_targets = np.concatenate([np.append(data.decode(docs[i])[1:], eos) for i in range(len(docs))] * 2)
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])
    np.testing.assert_array_equal(targets, expected_targets[: len(targets)])
    for r in rows:
        seg, pos = r["segment_ids"], r["positions"]
        assert seg.shape == pos.shape == (4, T) and seg.min() >= 1
        assert (np.diff(seg, axis=1) >= 0).all() and (seg[:, 0] == 1).all()
        changes = np.diff(seg, axis=1) > 0
        assert (r["targets"][:, :-1][changes] == eos).all()  # a segment ends with its document's eos
        np.testing.assert_array_equal(pos, row_positions(seg))
    # Rows that hold a document boundary: 150 x 4 x 32 tokens span several of the test corpus's files.
    assert ends[1] < len(inputs) and sum(int(r["segment_ids"].max() > 1) for r in rows) >= 2


def test_row_positions_restart_per_segment():
    seg = np.array([[1, 1, 1, 2, 2, 3], [1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(row_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resumes_exactly(prepared_dir, workers):
    data = PreparedData(prepared_dir)
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    stream = packed_batches(data, T, 8, mesh, seed=3, workers=workers)
    for _ in range(3):
        next(stream)
    state = stream.iterator.get_state()
    expected = [jax.device_get(next(stream)) for _ in range(3)]
    stream.close()
    resumed = packed_batches(data, T, 8, mesh, seed=3, workers=workers)
    resumed.iterator.set_state(state)
    for want in expected:
        got = jax.device_get(next(resumed))
        assert set(got) == {"inputs", "targets", "segment_ids", "positions"}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    resumed.close()


def test_attention_never_crosses_segments():
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=16)
    model = create_model(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 1, 256)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.asarray(row_positions(np.asarray(seg)))
    packed = model(tokens, pos, segment_ids_BT=seg)
    alone = model(tokens[:, 5:])  # the second document on its own, positions from 0
    assert_close(packed[:, 5:], alone, forward_chain(cfg, 1, 12))  # another shape, another program (tests/numerics.py)
    other_first = tokens.at[:, :5].set((tokens[:, :5] + 7) % 256)
    # The same program on other tokens in the first document: the second's masked-out scores are exactly 0 after the softmax.
    np.testing.assert_array_equal(model(other_first, pos, segment_ids_BT=seg)[:, 5:], packed[:, 5:])
    assert not np.allclose(model(tokens)[:, 5:], packed[:, 5:])  # without segments the documents do mix
