"""Tokenizer, corpus and grain input pipelines."""

from jaxbig.data.corpus import Corpus, CorpusError, load_corpus
from jaxbig.data.pipeline import Batch, batch_sharding, eval_batches, train_batches
from jaxbig.data.tokenizer import ByteTokenizer

__all__ = ["Batch", "ByteTokenizer", "Corpus", "CorpusError", "batch_sharding", "eval_batches", "load_corpus", "train_batches"]
