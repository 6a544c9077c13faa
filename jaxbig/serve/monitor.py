"""Model monitoring in the embedded server: drift and quality of each version's traffic against its export's profile.

The request path only hands (version, signature, inputs, outputs) to a bounded queue (`observe`, through
jaxbig.serve.handoff: no copy, the arrays are the ones the server already has); one background thread turns
them into statistics, so a slow statistic never delays an answer. When the queue is full (QUEUE_SIZE requests
or QUEUE_BYTES of arrays) the request is not observed and `jaxbig_monitor_dropped_total` counts it. Every series carries `model` and `version`, so two versions served
side by side during a rollout are compared on the same dashboard.

    jaxbig_monitor_token_psi{model,version}          PSI of the window's token distribution vs the profile's (computed
                                                     when scraped; NaN before the version's first request)
    jaxbig_monitor_token_kl{model,version}           KL(window || profile) in nats, same bins (jaxbig.profile)
    jaxbig_monitor_window_tokens{model,version}      tokens in the sliding window (the last --monitoring_window_tokens
                                                     prompt tokens, whole requests)
    jaxbig_monitor_prompt_length_tokens{model,version,signature}   histogram: tokens per row (serving_default's
                                                     `tokens`, generate's `prompt`)
    jaxbig_monitor_entropy_nats{model,version}       histogram: per serving_default request, the mean entropy of the
                                                     predicted next-token distributions (its logits)
    jaxbig_monitor_nll_nats{model,version}           histogram: per serving_default request of >= 2 tokens, the mean
                                                     negative log-likelihood per token of its own tokens under the model
                                                     (-log-likelihood: out-of-domain text scores high)
    jaxbig_monitor_reference_entropy_nats{model,version}, jaxbig_monitor_reference_nll_nats{model,version}
                                                     the profile's values on the run's validation split
    jaxbig_monitor_generated_tokens_total{model,version}   generate: tokens up to and including the first eos
    jaxbig_monitor_generate_rows_total{model,version,stop}  generate rows by stop = eos | max_length
    jaxbig_monitor_observed_requests_total{model,version,signature}, jaxbig_monitor_dropped_total{model}

The generate signature returns max_new_tokens tokens per row whatever they are (it does not stop early); a row
counts as stopped at eos when its output holds the tokenizer's eos_id (the text ends there), else by max length.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from pathlib import Path

import numpy as np
import prometheus_client as prom

from jaxbig.profile import DEFAULT_BINS, ProfileError, ReferenceProfile, kl, next_token_stats, psi
from jaxbig.serve.handoff import Handoff

log = logging.getLogger(__name__)
LENGTH_BUCKETS = tuple(2**i for i in range(18))  # 1 .. 131072 tokens
NATS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20)
SIGNATURES = ("serving_default", "generate")  # jaxbig's exports (jaxbig.export.savedmodel); others are not monitored
QUEUE_SIZE = 1024  # requests waiting for the statistics thread; more are dropped (counted), never waited for
QUEUE_BYTES = 256 << 20  # and at most this many bytes of their arrays (a long request's logits are B*T*V floats)


@dataclasses.dataclass
class _Version:
    """What the statistics thread keeps per version: its metric children, the profile's bins and the drift window."""

    children: dict[str, object]  # the version's labelled metrics, looked up once (labels() takes a lock each time)
    eos_id: int | None
    bin_of_V: np.ndarray | None = None  # token id -> bin (None: no profile, no drift)
    reference_K: np.ndarray | None = None  # the profile's share per bin
    window: collections.deque = dataclasses.field(default_factory=collections.deque)  # (tokens, counts_K) per request
    counts_K: np.ndarray | None = None
    tokens: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # the window: slid here, read at scrape time

    def divergence(self, fn) -> float:
        """fn(window's share per bin, the profile's) now; NaN while the window is empty (no comparison yet)."""
        with self.lock:
            if not self.tokens:
                return float("nan")
            share_K = self.counts_K / self.tokens
        return fn(share_K, self.reference_K)


class Monitor:
    def __init__(self, registry: prom.CollectorRegistry, model: str, *, window_tokens: int, profile: ReferenceProfile | None = None, num_bins: int = DEFAULT_BINS):
        self.model, self.window_tokens, self.num_bins, self.profile = model, window_tokens, num_bins, profile
        mv, r = ["model", "version"], registry
        self.psi = prom.Gauge("jaxbig_monitor_token_psi", "PSI of the window's token distribution against the export's profile.", mv, registry=r)
        self.kl = prom.Gauge("jaxbig_monitor_token_kl", "KL(window || profile) of the token distribution, nats.", mv, registry=r)
        self.window = prom.Gauge("jaxbig_monitor_window_tokens", "Prompt tokens in the drift window.", mv, registry=r)
        self.length = prom.Histogram("jaxbig_monitor_prompt_length_tokens", "Tokens per request row.", [*mv, "signature"], buckets=LENGTH_BUCKETS, registry=r)
        self.entropy = prom.Histogram("jaxbig_monitor_entropy_nats", "Mean next-token entropy per serving_default request.", mv, buckets=NATS_BUCKETS, registry=r)
        self.nll = prom.Histogram("jaxbig_monitor_nll_nats", "Mean negative log-likelihood per token of a serving_default request's own tokens.", mv, buckets=NATS_BUCKETS, registry=r)
        self.ref_entropy = prom.Gauge("jaxbig_monitor_reference_entropy_nats", "The profile's mean next-token entropy (validation split).", mv, registry=r)
        self.ref_nll = prom.Gauge("jaxbig_monitor_reference_nll_nats", "The profile's mean negative log-likelihood per token (validation split).", mv, registry=r)
        self.generated = prom.Counter("jaxbig_monitor_generated_tokens", "generate: tokens up to and including the first eos.", mv, registry=r)
        self.rows = prom.Counter("jaxbig_monitor_generate_rows", "generate rows by how they stopped (eos or max_length).", [*mv, "stop"], registry=r)
        self.observed = prom.Counter("jaxbig_monitor_observed_requests", "Requests the monitor has processed.", [*mv, "signature"], registry=r)
        self.dropped = prom.Counter("jaxbig_monitor_dropped", "Requests not observed because the monitor's queue was full.", ["model"], registry=r)
        self.dropped.labels(model)
        self._versions: dict[int, _Version] = {}
        self._lock = threading.Lock()
        self._handoff = Handoff(self._process, "monitor", max_items=QUEUE_SIZE, max_bytes=QUEUE_BYTES)

    # ---- versions --------------------------------------------------------------------------------
    def add_version(self, version: int, path: Path) -> None:
        """Reads the version's profile (manifest.json's, unless one was given for all) and publishes its reference values.

        Raises ProfileError for a manifest whose profile cannot be read; a version without one (a SavedModel
        jaxbig did not export, an export from before profiles) is monitored without drift, with a warning.
        """
        manifest_path = Path(path) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        profile = self.profile
        if profile is None and "profile" in manifest:
            profile = ReferenceProfile.from_dict(manifest["profile"], repr(str(manifest_path)))
        vocab = manifest.get("model", {}).get("vocab_size")
        if profile is not None and vocab is not None and profile.vocab_size != vocab:
            raise ProfileError(f"the reference profile has vocab_size {profile.vocab_size} but {manifest_path} serves a model of {vocab}; give a profile of this model's tokenizer")
        if profile is None:
            log.warning("%s version %d has no reference profile (%s): served without drift metrics; export it with scripts/export.py", self.model, version, manifest_path)
        labels = (self.model, str(version))
        children = {
            "entropy": self.entropy.labels(*labels), "nll": self.nll.labels(*labels), "generated": self.generated.labels(*labels),
            "eos": self.rows.labels(*labels, "eos"), "max_length": self.rows.labels(*labels, "max_length"),
            **{f"observed/{sig}": self.observed.labels(*labels, sig) for sig in SIGNATURES},
            **{f"length/{sig}": self.length.labels(*labels, sig) for sig in SIGNATURES},
        }
        state = _Version(children, manifest.get("tokenizer", {}).get("eos_id"))
        if profile is not None:
            state.bin_of_V, state.reference_K = profile.bins(self.num_bins)
            state.counts_K = np.zeros(self.num_bins, np.int64)
            self.ref_entropy.labels(*labels).set(profile.mean_entropy_nats)
            self.ref_nll.labels(*labels).set(-profile.mean_log_likelihood_nats)
            # PSI and KL are computed when Prometheus scrapes, not per request
            self.psi.labels(*labels).set_function(lambda: state.divergence(psi))
            self.kl.labels(*labels).set_function(lambda: state.divergence(kl))
            self.window.labels(*labels).set_function(lambda: state.tokens)
        with self._lock:
            self._versions[version] = state

    def keep_versions(self, versions: list[int]) -> None:
        """Forgets versions no longer served, and their gauges (a retired version must not keep an alert firing)."""
        with self._lock:
            gone = [v for v in self._versions if v not in versions]
            for v in gone:
                del self._versions[v]
        for v in gone:
            for gauge in (self.psi, self.kl, self.window, self.ref_entropy, self.ref_nll):
                try:
                    gauge.remove(self.model, str(v))
                except KeyError:
                    pass

    def known_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    # ---- the request path ------------------------------------------------------------------------
    def observe(self, version: int, signature: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Queues one answered request for the statistics thread; never blocks."""
        if not self._handoff.offer(version, signature, inputs, outputs):
            self.dropped.labels(self.model).inc()

    # ---- the statistics thread -------------------------------------------------------------------
    def _process(self, version: int, signature: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            state = self._versions.get(version)
        if state is None:
            return  # retired meanwhile
        metric = state.children
        if signature == "serving_default" and "tokens" in inputs and "logits" in outputs:
            tokens_BT = inputs["tokens"]
            entropy, nll = next_token_stats(outputs["logits"], tokens_BT[:, 1:])
            metric["entropy"].observe(entropy)
            if nll is not None:
                metric["nll"].observe(nll)
        elif signature == "generate" and "prompt" in inputs and "tokens" in outputs:
            tokens_BT, out_BN = inputs["prompt"], outputs["tokens"]
            is_eos_BN = out_BN == state.eos_id if state.eos_id is not None else np.zeros(out_BN.shape, bool)
            stopped_B = is_eos_BN.any(axis=1)
            lengths_B = np.where(stopped_B, is_eos_BN.argmax(axis=1) + 1, out_BN.shape[1])
            metric["generated"].inc(int(lengths_B.sum()))
            metric["eos"].inc(int(stopped_B.sum()))
            metric["max_length"].inc(int((~stopped_B).sum()))
        else:
            return
        metric[f"observed/{signature}"].inc()
        B, T = tokens_BT.shape
        for _ in range(B):
            metric[f"length/{signature}"].observe(T)
        if state.bin_of_V is not None:
            self._slide(state, tokens_BT)

    def _slide(self, state: _Version, tokens_BT: np.ndarray) -> None:
        """Adds a request's tokens to the version's window and drops the oldest requests beyond the window."""
        counts_K = np.bincount(state.bin_of_V[tokens_BT.ravel()], minlength=self.num_bins)
        with state.lock:
            state.window.append((tokens_BT.size, counts_K))
            state.counts_K += counts_K
            state.tokens += tokens_BT.size
            while len(state.window) > 1 and state.tokens - state.window[0][0] >= self.window_tokens:
                n, old_K = state.window.popleft()
                state.counts_K -= old_K
                state.tokens -= n

    def drain(self) -> None:
        """Waits until every queued request has been processed (tests, and before reading the metrics in a notebook)."""
        self._handoff.drain()

    def stop(self) -> None:
        self._handoff.stop()


__all__ = ["Monitor", "ProfileError"]
