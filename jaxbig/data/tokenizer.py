"""Byte-level tokenizer: token id = byte value; id 0 (NUL, never in text) separates documents."""

from __future__ import annotations

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
