"""Request logging as TF Serving does it: a sample of the answered requests as `PredictionLog` TFRecords.

    scripts/serve.py ... --request_logging_sample_rate 0.01 --request_logging_dir logs/tiny

Each sampled Predict is one `tensorflow.serving.PredictionLog` (predict_log: the PredictRequest with its
model_spec name, version and signature, and the PredictResponse; log_metadata: the model_spec and the sampling
rate), written with TensorFlow's own `tf.io.TFRecordWriter` to DIR/prediction_log-NNNNN.tfrecord. A file
is closed once it would pass `max_file_bytes`, and the oldest files are deleted beyond `max_files`, so the
logs never hold more than about max_file_bytes * max_files bytes. Read them with
`tf.data.TFRecordDataset(path)` and `PredictionLog.FromString`; a file (of at most a few hundred records) is
also a warmup file: copied to <version>/assets.extra/tf_serving_warmup_requests it is replayed before the
version turns AVAILABLE.

The request path draws the sample and queues the arrays it already has (jaxbig.serve.handoff: no copy, never
blocks; a full queue drops the record and counts it); one background thread builds the protos and writes. A write that fails
(a full disk, a removed directory) stops logging for the rest of the process with one warning: serving goes on.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import prometheus_client as prom

from jaxbig.config import ConfigError
from jaxbig.serve.handoff import Handoff

log = logging.getLogger(__name__)
PREFIX = "prediction_log"
FILE_RE = re.compile(rf"{PREFIX}-(\d+)\.tfrecord")
QUEUE_SIZE = 256  # sampled requests waiting to be written; beyond that they are dropped (counted)
QUEUE_BYTES = 256 << 20  # and at most this many bytes of their arrays


def check_log_dir(path: str | Path) -> Path:
    """Creates `path` if needed and proves it writable (a probe file); ConfigError naming the path otherwise."""
    path = Path(path)
    probe = path / f".{PREFIX}-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--request_logging_dir {str(path)!r} is not writable ({e.strerror or e}); give a writable directory") from None
    return path


class RequestLogger:
    def __init__(self, directory: str | Path, sample_rate: float, registry: prom.CollectorRegistry, model: str, *, max_file_bytes: int, max_files: int, seed: int | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"--request_logging_sample_rate {sample_rate} must be in [0, 1] (0: off, 1: every request)")
        self.directory, self.sample_rate, self.model = check_log_dir(directory), sample_rate, model
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.logged = prom.Counter("jaxbig_request_log_records", "PredictionLog records written.", ["model"], registry=registry)
        self.dropped = prom.Counter("jaxbig_request_log_dropped", "Sampled requests not written: queue full or logging stopped.", ["model"], registry=registry)
        self.failed = prom.Gauge("jaxbig_request_log_failed", "1 once a write failed and logging stopped (a full disk).", ["model"], registry=registry)
        for metric in (self.logged, self.dropped, self.failed):
            metric.labels(model)
        self.enabled = True
        self._random = random.Random(seed)
        existing = self.files()
        self._next = int(FILE_RE.fullmatch(existing[-1].name).group(1)) + 1 if existing else 0  # never overwrite an earlier run's logs
        self._writer = None
        self._bytes = 0
        self._handoff = Handoff(self._log, "request-log", max_items=QUEUE_SIZE, max_bytes=QUEUE_BYTES)

    def files(self) -> list[Path]:
        """The log files in the directory, oldest first."""
        return sorted((p for p in self.directory.iterdir() if FILE_RE.fullmatch(p.name)), key=lambda p: int(FILE_RE.fullmatch(p.name).group(1)))

    # ---- the request path ------------------------------------------------------------------------
    def maybe_log(self, version: int, signature: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        if self.sample_rate == 0.0 or self._random.random() >= self.sample_rate:
            return
        if not self.enabled or not self._handoff.offer(version, signature, inputs, outputs):
            self.dropped.labels(self.model).inc()

    # ---- the writer thread -----------------------------------------------------------------------
    def _record(self, version: int, signature: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bytes:
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        entry = prediction_log_pb2.PredictionLog()
        spec = entry.log_metadata.model_spec
        spec.name, spec.signature_name = self.model, signature
        spec.version.value = version
        entry.log_metadata.sampling_config.sampling_rate = self.sample_rate
        request, response = entry.predict_log.request, entry.predict_log.response
        request.model_spec.CopyFrom(spec)
        response.model_spec.CopyFrom(spec)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return entry.SerializeToString()

    def _write(self, record: bytes) -> None:
        import tensorflow as tf

        size = len(record) + 16  # TFRecord framing: length (8), its CRC (4), data, its CRC (4)
        if self._writer is not None and self._bytes + size > self.max_file_bytes:
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._writer = tf.io.TFRecordWriter(str(self.directory / f"{PREFIX}-{self._next:05d}.tfrecord"))
            self._next, self._bytes = self._next + 1, 0
            for old in self.files()[: -self.max_files]:
                old.unlink(missing_ok=True)
        self._writer.write(record)
        self._writer.flush()  # a full disk shows here, and a reader sees whole records
        self._bytes += size
        self.logged.labels(self.model).inc()

    def _log(self, version: int, signature: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        import tensorflow as tf

        if not self.enabled:
            self.dropped.labels(self.model).inc()
            return
        try:
            self._write(self._record(version, signature, inputs, outputs))
        except (OSError, tf.errors.OpError) as e:
            self.enabled = False
            self.failed.labels(self.model).set(1)
            self.dropped.labels(self.model).inc()
            log.warning("request logging stopped: writing to %s failed (%s); requests are still served, without logs", self.directory, e)

    def drain(self) -> None:
        """Waits until every queued record is written (or dropped)."""
        self._handoff.drain()

    def stop(self) -> None:
        self._handoff.stop()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:  # noqa: BLE001 - the last flush may hit the full disk too
                log.warning("closing the request log failed: %s", e)
