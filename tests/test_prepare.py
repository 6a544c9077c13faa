"""Data preparation: text -> tokenized ArrayRecord shards + manifest, read back exactly; bad input is refused cleanly."""

import json

import numpy as np
import pytest

from jaxbig.data.corpus import CorpusError
from jaxbig.data.prepare import PreparedData, prepare


def _read_back(root, split):
    data = PreparedData(root)
    docs = data.documents(split)
    return data, [data.tokenizer.decode(data.decode(docs[i])) for i in range(len(docs))]


def test_byte_shards_round_trip(text_dir, tmp_path):
    out = tmp_path / "bytes"
    m = prepare([str(text_dir)], out, val_fraction=0.2, shard_mb=0.1)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["tokenizer"]["name"] == "byte" and m["dtype"] == "<u2"
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40
    assert len(m["splits"]["train"]["shards"]) > 1  # 0.1 MB shards
    originals = {f.read_text() for f in text_dir.iterdir()}
    _, train = _read_back(out, "train")
    _, val = _read_back(out, "val")
    assert set(train) | set(val) == originals and not set(train) & set(val)
    assert sum(len(t.encode()) for t in train) == m["splits"]["train"]["tokens"]
    assert not list(tmp_path.glob(".bytes.tmp-*"))


def test_sentencepiece_trained_and_reloaded(text_dir, tmp_path):
    m = prepare([str(text_dir)], tmp_path / "spm", tokenizer="sentencepiece", vocab_size=512, val_fraction=0.2)
    assert m["tokenizer"]["vocab_size"] == 512 and (tmp_path / "spm" / "tokenizer.model").is_file()
    data, val = _read_back(tmp_path / "spm", "val")
    originals = {f.read_text() for f in text_dir.iterdir()}
    assert set(val) <= originals  # whitespace and all, exactly
    assert m["splits"]["train"]["tokens"] < 0.8 * m["splits"]["train"]["bytes"]  # subwords: fewer tokens than bytes
    # The same model, given as a file, tokenizes identically.
    m2 = prepare([str(text_dir)], tmp_path / "spm2", tokenizer="sentencepiece", spm_model=str(tmp_path / "spm" / "tokenizer.model"), val_fraction=0.2)
    assert m2["splits"] == m["splits"]
    a, b = PreparedData(tmp_path / "spm"), PreparedData(tmp_path / "spm2")
    np.testing.assert_array_equal(a.decode(a.documents("train")[0]), b.decode(b.documents("train")[0]))


def test_bpe_trained_and_reloaded_as_hf(text_dir, tmp_path):
    m = prepare([str(text_dir)], tmp_path / "bpe", tokenizer="bpe", vocab_size=400, val_fraction=0.2)
    assert m["tokenizer"] == {"name": "hf", "vocab_size": 400, "eos_id": 0, "bos_id": None, "model_file": "tokenizer.json"}
    assert (tmp_path / "bpe" / "tokenizer.json").is_file() and (tmp_path / "bpe" / "tokenizer_config.json").is_file()
    data, val = _read_back(tmp_path / "bpe", "val")
    assert set(val) <= {f.read_text() for f in text_dir.iterdir()}  # whitespace and all, exactly
    assert m["splits"]["train"]["tokens"] < 0.7 * m["splits"]["train"]["bytes"]
    # The prepared set is itself a Hugging Face tokenizer directory: hf:DIR and hf:FILE tokenize identically.
    for i, path in enumerate([tmp_path / "bpe", tmp_path / "bpe" / "tokenizer.json"]):
        again = prepare([str(text_dir)], tmp_path / f"hf{i}", tokenizer=f"hf:{path}", val_fraction=0.2)
        assert again["splits"] == m["splits"] and again["tokenizer"] == m["tokenizer"]
        other = PreparedData(tmp_path / f"hf{i}")
        assert other.tokenizer.fingerprint() == data.tokenizer.fingerprint()
        np.testing.assert_array_equal(other.decode(other.documents("train")[0]), data.decode(data.documents("train")[0]))


def test_bad_hf_tokenizers_are_refused_and_leave_nothing(text_dir, tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(CorpusError, match=r"corrupt/tokenizer.json' is not a Hugging Face tokenizer.json"):
        prepare([str(text_dir)], tmp_path / "out", tokenizer=f"hf:{tmp_path / 'corrupt'}", val_fraction=0.2)
    from jaxbig.data.tokenizer import ByteTokenizer, to_hf

    to_hf(ByteTokenizer()).save(tmp_path / "no_eos.json")  # a tokenizer.json alone: nothing beside it names an eos
    with pytest.raises(CorpusError, match="names no end-of-sequence token to separate documents; set eos_token in its tokenizer_config.json"):
        prepare([str(text_dir)], tmp_path / "out", tokenizer=f"hf:{tmp_path / 'no_eos.json'}", val_fraction=0.2)
    with pytest.raises(CorpusError, match="--vocab_size=300 does not match"):
        prepare([str(text_dir)], tmp_path / "out", tokenizer=f"hf:{tmp_path / 'no_eos.json'}", vocab_size=300, val_fraction=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "no_eos.json"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": ["/no/such/place"]}, "does not exist"),
        ({"inputs": ["/no/such/*.txt"]}, "matches no files"),
        ({"tokenizer": "byte", "vocab_size": 512}, "the byte tokenizer has exactly 256 tokens"),
        ({"tokenizer": "sentencepiece"}, "needs --vocab_size"),
        ({"tokenizer": "sentencepiece", "vocab_size": 100}, "vocab_size=100 is too small"),
        ({"tokenizer": "sentencepiece", "vocab_size": 1_000_000}, "cannot train a vocab_size=1000000 model on this corpus"),
        ({"tokenizer": "sentencepiece", "spm_model": "/no/model"}, "SentencePiece model '/no/model' not found"),
        ({"tokenizer": "wordpiece"}, "use byte, sentencepiece, bpe or hf:PATH"),
        ({"tokenizer": "bpe"}, "training a byte-level BPE tokenizer needs --vocab_size"),
        ({"tokenizer": "bpe", "vocab_size": 200}, "vocab_size=200 is too small for a byte-level BPE"),
        ({"tokenizer": "hf:/no/model"}, "tokenizer '/no/model' not found; give a tokenizer.json file or a Hugging Face model directory"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(text_dir, tmp_path, kwargs, message):
    kwargs = {"inputs": [str(text_dir)], "val_fraction": 0.2, **kwargs}
    with pytest.raises(CorpusError, match=message):
        prepare(kwargs.pop("inputs"), tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_binary_and_empty_inputs(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\x00\x01")
    with pytest.raises(CorpusError, match="is not UTF-8 text"):
        prepare([str(tmp_path / "blob.txt")], tmp_path / "out")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "blob.txt").write_bytes(b"\x00\x01")
    with pytest.raises(CorpusError, match=r"no text in .* \(1 binary files skipped\)"):
        prepare([str(tmp_path / "d")], tmp_path / "out")


def test_existing_output_needs_overwrite(text_dir, tmp_path):
    out = tmp_path / "set"
    prepare([str(text_dir)], out, val_fraction=0.2)
    with pytest.raises(CorpusError, match="already exists; pass --overwrite"):
        prepare([str(text_dir)], out, val_fraction=0.2)
    prepare([str(text_dir)], out, val_fraction=0.5, overwrite=True)
    assert PreparedData(out).manifest["split_rule"]["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
