"""Tokenizer, corpus and grain input pipelines."""

from jaxbig.data.corpus import Corpus, CorpusError, load_corpus
from jaxbig.data.pipeline import Batch, batch_sharding, eval_batches, train_batches
from jaxbig.data.run import run_tokenizer
from jaxbig.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, to_hf

__all__ = [
    "Batch", "ByteTokenizer", "Corpus", "CorpusError", "HFTokenizer", "SentencePieceTokenizer",
    "batch_sharding", "eval_batches", "load_corpus", "run_tokenizer", "to_hf", "train_batches",
]  # fmt: skip
