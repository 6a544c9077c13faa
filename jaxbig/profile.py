"""The reference profile: what the training data and the model looked like at export, and the statistics live traffic is compared with.

`scripts/export.py` writes it into manifest.json under "profile" (jaxbig.export.profile computes it);
the server (jaxbig.serve.monitor) reads it and compares each version's traffic with it. Both sides use the
functions here, so a request's entropy or log-likelihood means exactly what the profile's means. numpy only:
the server never imports JAX.

    token drift   the token distribution in bins: the reference's `num_bins - 1` most frequent tokens, one bin
                  each, and one bin for every other token (a vocabulary of 32k tokens has too many rare ones for
                  a window of a few thousand tokens to estimate each); PSI and KL(window || reference) on them
    lengths       documents' lengths in tokens (clipped to max_seq_len) in power-of-two buckets
    quality       mean next-token entropy of the predicted distribution and mean log-likelihood per token,
                  on windows of the run's own validation split
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxbig.config import ConfigError

FORMAT = "jaxbig-profile/1"
FLOOR = 1e-4  # a bin's share is at least this in PSI and KL, so an empty bin gives a finite, bounded term
DEFAULT_BINS = 64


class ProfileError(ConfigError):
    """A profile that cannot be read; the message names the file and the fix."""


def length_edges(max_seq_len: int) -> list[int]:
    """Upper bucket edges 1, 2, 4, ... up to max_seq_len (the last edge is max_seq_len itself)."""
    edges = [1]
    while edges[-1] < max_seq_len:
        edges.append(min(edges[-1] * 2, max_seq_len))
    return edges


def length_counts(lengths: np.ndarray, edges: list[int]) -> list[int]:
    """How many lengths fall in each bucket (length <= edge, above the previous edge); longer ones in the last."""
    idx = np.searchsorted(np.asarray(edges), np.minimum(np.asarray(lengths), edges[-1]), side="left")
    return np.bincount(idx, minlength=len(edges)).tolist()


def next_token_stats(logits_BTV: np.ndarray, targets_BS: np.ndarray) -> tuple[float, float | None]:
    """(mean entropy in nats of the predicted distributions at all B*T positions; mean negative log-likelihood per
    token of targets[:, s] under the distribution at position s, for s < S <= T, or None when S is 0).

    A request's tokens score as next_token_stats(logits, tokens[:, 1:]); a validation window of T + 1 tokens as
    next_token_stats(logits of window[:, :-1], window[:, 1:]). In the logits' own dtype (float32 as served: a
    monitoring statistic needs no more), without materialising log-probabilities: with m = max z,
    e = exp(z - m) and lse = m + log(sum e), the entropy is lse - sum(e * z) / sum(e) and the NLL lse - z[target].
    """
    S = targets_BS.shape[1]
    if S > logits_BTV.shape[1]:
        raise ValueError(f"{S} targets per row for {logits_BTV.shape[1]} positions; at most one target per position")
    z_BTV = logits_BTV
    m_BT1 = z_BTV.max(-1, keepdims=True)
    e_BTV = np.exp(z_BTV - m_BT1)
    sum_BT = e_BTV.sum(-1)
    lse_BT = m_BT1[..., 0] + np.log(sum_BT)
    entropy = float((lse_BT - (e_BTV * z_BTV).sum(-1) / sum_BT).sum()) / lse_BT.size
    if S == 0:
        return entropy, None
    B = targets_BS.shape[0]
    picked_BS = z_BTV[np.arange(B)[:, None], np.arange(S)[None, :], targets_BS]
    return entropy, float((lse_BT[:, :S] - picked_BS).sum()) / (B * S)


def psi(window: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index sum((w - r) * ln(w / r)) of two distributions over the same bins (shares floored at FLOOR)."""
    w, r = np.maximum(window, FLOOR), np.maximum(reference, FLOOR)
    return float(((w - r) * np.log(w / r)).sum())


def kl(window: np.ndarray, reference: np.ndarray) -> float:
    """KL(window || reference) in nats over the same bins (shares floored at FLOOR, then renormalised)."""
    w, r = np.maximum(window, FLOOR), np.maximum(reference, FLOOR)
    w, r = w / w.sum(), r / r.sum()
    return float((w * np.log(w / r)).sum())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceProfile:
    """One export's reference (see the module docstring); JSON under manifest.json's "profile"."""

    vocab_size: int  # the model's vocabulary: token ids lie in [0, vocab_size)
    token_ids: tuple[int, ...]  # the ids seen in the training sample, ascending
    token_counts: tuple[int, ...]  # how often each of token_ids occurs there
    train_tokens: int  # tokens counted (sum of token_counts)
    length_edges: tuple[int, ...]  # upper edges of the document-length buckets (length_edges(max_seq_len))
    length_counts: tuple[int, ...]  # documents per bucket
    mean_entropy_nats: float  # mean next-token entropy of the model on the validation windows
    mean_log_likelihood_nats: float  # mean log-likelihood per token of the validation text under the model (<= 0)
    validation_tokens: int  # next-token predictions the two means above average over
    source: str  # where the data came from (corpus or prepared data set, split, how much)

    def __post_init__(self):
        if self.vocab_size < 1 or len(self.token_ids) != len(self.token_counts) or not self.token_ids:
            raise ValueError(f"vocab_size {self.vocab_size}, {len(self.token_ids)} token ids and {len(self.token_counts)} counts: need vocab_size >= 1 and one count per id")
        if min(self.token_ids) < 0 or max(self.token_ids) >= self.vocab_size:
            raise ValueError(f"token ids span [{min(self.token_ids)}, {max(self.token_ids)}], outside the vocabulary [0, {self.vocab_size})")
        if len(self.length_edges) != len(self.length_counts):
            raise ValueError(f"{len(self.length_edges)} length edges and {len(self.length_counts)} counts")
        for name in ("mean_entropy_nats", "mean_log_likelihood_nats"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} is {getattr(self, name)}; it must be finite")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ReferenceProfile:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ProfileError(f"{where} holds no {FORMAT} profile (found {found!r}); export the model again with scripts/export.py")
        try:
            fields = {f.name: d[f.name] for f in dataclasses.fields(cls)}
            fields |= {k: tuple(int(x) for x in fields[k]) for k in ("token_ids", "token_counts", "length_edges", "length_counts")}
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where}: the profile is malformed ({type(e).__name__}: {e}); export the model again with scripts/export.py") from None

    @classmethod
    def read(cls, path: str | Path) -> ReferenceProfile:
        """From a manifest.json (its "profile") or a file holding the profile alone. Raises ProfileError."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot read a profile from {str(path)!r} ({type(e).__name__}: {e}); give a manifest.json scripts/export.py wrote, or a profile JSON") from None
        if isinstance(doc, dict) and "profile" in doc:
            doc = doc["profile"]
        return cls.from_dict(doc, repr(str(path)))

    def bins(self, num_bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
        """(bin of every token id [vocab_size] int32, reference share of every bin [num_bins]): the `num_bins - 1`
        most frequent reference tokens (ties by id) get a bin each, every other token shares the last."""
        if num_bins < 2:
            raise ValueError(f"num_bins={num_bins} must be >= 2 (at least one token bin and the bin of the others)")
        ids, counts = np.asarray(self.token_ids), np.asarray(self.token_counts, np.float64)
        top = np.lexsort((ids, -counts))[: num_bins - 1]
        bin_of_V = np.full(self.vocab_size, num_bins - 1, np.int32)
        bin_of_V[ids[top]] = np.arange(len(top), dtype=np.int32)
        share = np.zeros(num_bins)
        np.add.at(share, bin_of_V[ids], counts)
        return bin_of_V, share / share.sum()
