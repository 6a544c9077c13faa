"""Prometheus metrics of the embedded server, served at /monitoring/prometheus/metrics on the REST port.

Names are jaxbig's own (TF Serving exports `:tensorflow:serving:*` series whose exact set depends
on its build); the labels say what a dashboard needs: which model, API, protocol and status.
One registry per server, so several servers in one process (tests, notebooks) do not collide.

Resources: prometheus_client's ProcessCollector (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
open files, threads; Linux), `jaxbig_serving_memory_limit_bytes` (the cgroup's limit, else the machine's RAM),
and per version `jaxbig_serving_model_load_seconds` and `jaxbig_serving_model_memory_bytes` (the growth of
the process's RSS while the version loaded: its weights, runtime state and warmup; approximate when requests
allocate at the same time). Model monitoring (drift, quality) and request logging add their own series
(jaxbig.serve.monitor, jaxbig.serve.request_log).
"""

from __future__ import annotations

import prometheus_client as prom

from jaxbig.runtime import memory_limit_bytes

PATH = "/monitoring/prometheus/metrics"
# Latency buckets from 1 ms to ~33 s (the tiny model answers in milliseconds; generate can take seconds).
LATENCY_BUCKETS = tuple(0.001 * 2**i for i in range(16))
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "jaxbig_serving_requests", "Requests by model, API, protocol and final status (gRPC code name).",
            ["model", "api", "protocol", "status"], registry=self.registry,
        )
        self.latency = prom.Histogram(
            "jaxbig_serving_request_latency_seconds", "Time from request parsed to response ready.",
            ["model", "api", "protocol"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = prom.Histogram(
            "jaxbig_serving_batch_size", "Rows per model call when batching is on, padding included.",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_requests = prom.Histogram(
            "jaxbig_serving_batch_requests", "Requests merged into one model call when batching is on.",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.versions = prom.Gauge("jaxbig_serving_available_versions", "Versions in state AVAILABLE.", ["model"], registry=self.registry)
        self.latest = prom.Gauge("jaxbig_serving_latest_version", "The version Latest(model) resolves to.", ["model"], registry=self.registry)
        prom.ProcessCollector(registry=self.registry)
        self.memory_limit = prom.Gauge("jaxbig_serving_memory_limit_bytes", "Memory the process may use: its cgroup's limit, else the machine's RAM.", registry=self.registry)
        if (limit := memory_limit_bytes()) is not None:
            self.memory_limit.set(limit)
        self.load_seconds = prom.Gauge("jaxbig_serving_model_load_seconds", "Seconds a version took to load (warmup included).", ["model", "version"], registry=self.registry)
        self.load_bytes = prom.Gauge("jaxbig_serving_model_memory_bytes", "Growth of the process's RSS while a version loaded.", ["model", "version"], registry=self.registry)

    def observe(self, model: str, api: str, protocol: str, status: str, seconds: float) -> None:
        self.requests.labels(model, api, protocol, status).inc()
        self.latency.labels(model, api, protocol).observe(seconds)

    def on_batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def exposition(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
