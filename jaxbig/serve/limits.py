"""What a jaxbig export accepts, checked before the model runs, in one place for every runtime and client.

TF Serving checks a request against the SignatureDef only (the set of inputs, dtype, rank). The
model's own limits are not in a SignatureDef: a token id outside the vocabulary reaches the
embedding gather, which XLA clamps or reads past, and the answer is garbage (NaN logits) with
HTTP 200. An export's manifest.json knows the vocabulary and `model.max_seq_len`, so
`ModelLimits.check` refuses, for the signatures jaxbig exports (jaxbig.export.savedmodel):

  serving_default  tokens [B, T]: ids in [0, vocab_size), 1 <= T <= max_seq_len
  generate         prompt [B, P]: ids in [0, vocab_size), 1 <= P <= max_seq_len - 1;
                   max_new_tokens in [1, max_seq_len - P]; temperature finite and >= 0; seed in int32

Every refusal is INVALID_ARGUMENT (HTTP 400) naming the input, the value and the allowed range.
The embedded server runs it after the signature check, whichever runtime serves the version
(jaxbig.serve.core); RestClient, GrpcClient and scripts/generate.py --server run it before they
send. The exported SavedModel asserts the same rules itself, so a real TF Serving refuses such
requests too (with TF's assertion text rather than these messages).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxbig.serve.errors import invalid_argument

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MANIFEST = "manifest.json"  # written by jaxbig.export.bundle next to the SavedModel


def _where(signature: str, name: str) -> str:
    return f"input '{name}' of signature '{signature}'"


def _scalar(signature: str, name: str, value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise invalid_argument(f"{_where(signature, name)} must be a scalar; got shape {list(arr.shape)}")
    return arr.item()


def _integer(signature: str, name: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    v = _scalar(signature, name, value)
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid_argument(f"{_where(signature, name)} is {v!r}; it must be an integer in [{lo}, {hi}]{why}")
    if not lo <= v <= hi:
        raise invalid_argument(f"{_where(signature, name)} is {v}; it must be in [{lo}, {hi}]{why}")
    return v


def check_generate_args(max_new_tokens: Any, temperature: Any, seed: Any, *, prompt_len: int | None = None, max_seq_len: int | None = None) -> None:
    """The `generate` scalars: max_new_tokens >= 1 (and <= max_seq_len - prompt_len when both are known),
    temperature finite and >= 0, seed an int32. Raises ServingError(INVALID_ARGUMENT)."""
    sig = "generate"
    if max_seq_len is not None and prompt_len is not None:
        why = f" (model.max_seq_len {max_seq_len} - prompt length {prompt_len})"
        _integer(sig, "max_new_tokens", max_new_tokens, 1, max_seq_len - prompt_len, why)
    else:
        _integer(sig, "max_new_tokens", max_new_tokens, 1, INT32_MAX)
    t = _scalar(sig, "temperature", temperature)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise invalid_argument(f"{_where(sig, 'temperature')} is {t!r}; it must be a finite number >= 0 (0 = greedy)")
    _integer(sig, "seed", seed, INT32_MIN, INT32_MAX, " (int32)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelLimits:
    """The model-side limits of one export version, from its manifest."""

    vocab_size: int  # token ids must lie in [0, vocab_size)
    max_seq_len: int  # longest sequence: serving_default's T, generate's prompt + max_new_tokens

    def __post_init__(self):
        if self.vocab_size < 1 or self.max_seq_len < 2:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1 and max_seq_len={self.max_seq_len} >= 2")

    @classmethod
    def from_manifest(cls, manifest: dict) -> ModelLimits:
        model = manifest["model"]
        return cls(vocab_size=int(model["vocab_size"]), max_seq_len=int(model["max_seq_len"]))

    @classmethod
    def read(cls, version_dir: str | Path) -> ModelLimits | None:
        """The limits recorded in `version_dir`/manifest.json; None for a SavedModel jaxbig did not export."""
        path = Path(version_dir) / MANIFEST
        if not path.is_file():
            return None
        return cls.from_manifest(json.loads(path.read_text()))

    def check_tokens(self, signature: str, name: str, ids: Any, max_len: int) -> None:
        """ids [B, L] of an integer dtype, 1 <= L <= max_len, every id in [0, vocab_size)."""
        arr = np.asarray(ids)
        where = _where(signature, name)
        if arr.ndim != 2:
            raise invalid_argument(f"{where} has shape {list(arr.shape)}; it must be [batch, length]")
        if arr.dtype.kind not in "iu":
            raise invalid_argument(f"{where} has dtype {arr.dtype.name}; token ids must be integers (int32)")
        length = arr.shape[1]
        if not 1 <= length <= max_len:
            raise invalid_argument(f"{where} has length {length}; it must be in [1, {max_len}] (model.max_seq_len {self.max_seq_len})")
        if arr.size == 0:
            return
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise invalid_argument(
                f"{where} holds token id {int(arr[b, t])} at [{b}, {t}] ({int(bad.sum())} id(s) out of range); "
                f"token ids must be in [0, {self.vocab_size}) (the model's vocab_size)"
            )

    def check(self, signature: str, inputs: dict[str, Any]) -> None:
        """Refuses what the model cannot answer (see the module docstring); other signatures pass unchecked."""
        if signature == "serving_default" and "tokens" in inputs:
            self.check_tokens(signature, "tokens", inputs["tokens"], self.max_seq_len)
        elif signature == "generate" and {"prompt", "max_new_tokens", "temperature", "seed"} <= set(inputs):
            self.check_tokens(signature, "prompt", inputs["prompt"], self.max_seq_len - 1)
            prompt_len = np.shape(inputs["prompt"])[1]
            check_generate_args(inputs["max_new_tokens"], inputs["temperature"], inputs["seed"], prompt_len=prompt_len, max_seq_len=self.max_seq_len)
