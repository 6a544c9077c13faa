"""Tokenizers: byte-level (id = byte value; id 0, NUL, never in text, separates documents) and SentencePiece."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens. Vocabulary 256; `eos_id` 0 marks the end of a document."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if b"\x00" in data:
            raise ValueError("text contains a NUL byte, which the byte tokenizer reserves as the document separator")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr > 0) & (arr < 256)]  # drop separators and ids outside the byte range
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram, byte fallback so any text encodes). `eos_id` separates documents."""

    name = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm  # only for SentencePiece models; the byte tokenizer (the default) needs none

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SentencePiece model {str(path)!r} not found; give a .model file written by SentencePiece")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{str(path)!r} is not a SentencePiece model ({e})") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> SentencePieceTokenizer:
        """Trains on `texts` (one document each), keeping whitespace exactly as it is (code needs it)."""
        import sentencepiece as spm  # only for SentencePiece models; the byte tokenizer (the default) needs none

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"SentencePiece model_type={model_type!r}: use bpe or unigram")
        min_vocab = 256 + 4  # byte fallback pieces + unk, bos, eos, pad... below this SentencePiece cannot honour the size
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small for SentencePiece with byte fallback; use at least {min_vocab}")
        lines = (line for text in texts for line in text.splitlines() if line.strip())
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_by_whitespace=True,
                max_sentence_length=1 << 16,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"SentencePiece cannot train a vocab_size={vocab_size} model on this corpus: {str(e).strip()}") from None
        return cls(model.getvalue())

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < self.vocab_size) & (arr != self.eos_id)]
        return self._sp.decode(arr.tolist())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "model_file": "tokenizer.model"}


def tokenizer_from_dict(d: dict, root: str | Path) -> ByteTokenizer | SentencePieceTokenizer:
    """The tokenizer a prepared data set's manifest names (model files are relative to `root`)."""
    if d["name"] == ByteTokenizer.name:
        return ByteTokenizer()
    if d["name"] == SentencePieceTokenizer.name:
        return SentencePieceTokenizer.load(Path(root) / d["model_file"])
    raise ValueError(f"unknown tokenizer {d['name']!r} in the manifest; jaxbig knows byte and sentencepiece")
