"""The reference profile of an export (jaxbig.profile): the run's training data and the model on its validation split.

    profile = reference_profile(cfg, graphdef, params)   # a jaxbig.profile.ReferenceProfile

Data: the token unigram counts and document lengths of the training split, as the run reads it (raw text:
jaxbig.data.load_corpus with the run's paths, split and cap; prepared data: its train shards), up to
MAX_TRAIN_TOKENS tokens. Model: the float checkpoint (before any export quantization) on the first
`windows` windows of `data.seq_len + 1` tokens of the validation split, through jaxbig.profile.next_token_stats,
the same function the server applies to the logits it serves.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxbig.config import Config, ConfigError
from jaxbig.data.corpus import load_corpus
from jaxbig.data.prepare import PreparedData
from jaxbig.profile import ReferenceProfile, next_token_stats, length_counts, length_edges

MAX_TRAIN_TOKENS = 4 << 20  # a unigram estimate over 4M tokens is far finer than any serving window it is compared with
WINDOWS = 8  # validation windows the model is run on (a batch of 8: one compile, one call)


def _prepared_tokens(data: PreparedData, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the split's first documents up to `limit`, their documents' lengths)."""
    docs, lengths, total = [], [], 0
    source = data.documents(split)
    for i in range(len(source)):
        doc = data.decode(source[i])
        docs.append(doc)
        lengths.append(len(doc))
        total += len(doc)
        if total >= limit:
            break
    return np.concatenate(docs), np.asarray(lengths)


def _document_lengths(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Lengths of the documents in a stream where each ends with eos_id (the eos counted with its document)."""
    ends = np.flatnonzero(tokens == eos_id)
    return np.diff(np.concatenate([[-1], ends])) if len(ends) else np.asarray([len(tokens)])


def reference_profile(cfg: Config, graphdef: nnx.GraphDef, params, *, windows: int = WINDOWS) -> ReferenceProfile:
    """The profile of a run (see the module docstring). Raises ConfigError when the validation split is too short."""
    T, V = cfg.data.seq_len, cfg.model.vocab_size
    if cfg.data.prepared:
        data = PreparedData(cfg.data.prepared)
        train_tokens, lengths = _prepared_tokens(data, "train", MAX_TRAIN_TOKENS)
        val_tokens, _ = _prepared_tokens(data, "val", windows * T + 1)
        source = f"prepared data {cfg.data.prepared}"
    else:
        corpus = load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes)
        train_tokens, val_tokens = corpus.train_BYTES[:MAX_TRAIN_TOKENS], corpus.val_BYTES
        lengths = _document_lengths(train_tokens, 0)  # ByteTokenizer.eos_id separates documents in the raw corpus
        source = f"corpus {corpus.source}"
    n = min(windows, (len(val_tokens) - 1) // T)
    if n < 1:
        raise ConfigError(f"the validation split holds {len(val_tokens)} tokens, fewer than one window of data.seq_len + 1 = {T + 1}; raise data.val_fraction")
    window_NT = np.stack([val_tokens[i * T : i * T + T + 1] for i in range(n)]).astype(np.int32)
    forward = jax.jit(lambda params, tokens_NT: nnx.merge(graphdef, params)(tokens_NT))  # params as arguments, not constants
    logits_NTV = np.asarray(forward(params, window_NT[:, :-1]))
    entropy, nll = next_token_stats(logits_NTV, window_NT[:, 1:])
    counts = np.bincount(train_tokens.astype(np.int64), minlength=V)
    ids = np.flatnonzero(counts)
    edges = length_edges(cfg.model.max_seq_len)
    return ReferenceProfile(
        vocab_size=V,
        token_ids=tuple(ids.tolist()),
        token_counts=tuple(counts[ids].tolist()),
        train_tokens=int(counts.sum()),
        length_edges=tuple(edges),
        length_counts=tuple(length_counts(lengths, edges)),
        mean_entropy_nats=entropy,
        mean_log_likelihood_nats=-nll,
        validation_tokens=int(n * T),
        source=f"{source}: {len(train_tokens)} training tokens, {len(lengths)} documents; {n} validation windows of {T} + 1 tokens",
    )
