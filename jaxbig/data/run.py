"""Which tokenizer a run's model reads and writes, decided in one place for sampling, export and training.

In order: `<run_dir>/tokenizer.json` (with the tokenizer_config.json beside it: a run imported from a Hugging
Face model holds them); else the tokenizer of the prepared data the run trains on (`data.prepared`); else bytes.
"""

from __future__ import annotations

from pathlib import Path

from jaxbig.config import Config
from jaxbig.data.corpus import CorpusError
from jaxbig.data.prepare import PreparedData
from jaxbig.data.tokenizer import TOKENIZER_JSON, ByteTokenizer, HFTokenizer, SentencePieceTokenizer


def run_tokenizer(cfg: Config, run_dir: str | Path) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """The run's tokenizer (see the module docstring).

    Raises CorpusError (a ConfigError) when its files are missing or bad, or when it has more tokens than
    `model.vocab_size` (the model could not embed its ids).
    """
    tokenizer = _find(cfg, Path(run_dir))
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise CorpusError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's {tokenizer.vocab_size} tokens; "
            f"use model.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def _find(cfg: Config, run_dir: Path) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    if (run_dir / TOKENIZER_JSON).is_file():
        try:
            return HFTokenizer.load(run_dir)
        except ValueError as e:
            raise CorpusError(f"run_dir {str(run_dir)!r}: {e}") from None
    if cfg.data.prepared:
        try:
            return PreparedData(cfg.data.prepared).tokenizer
        except (CorpusError, ValueError) as e:
            raise CorpusError(f"the run's tokenizer is its prepared data's (data.prepared={cfg.data.prepared!r}): {e}") from None
    return ByteTokenizer()


__all__ = ["run_tokenizer"]
