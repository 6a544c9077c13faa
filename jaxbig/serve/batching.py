"""Server-side batching: concurrent requests to the same version and signature run as one call.

TF Serving's BatchingSession, in miniature: the first request of a batch waits up to
`batch_timeout_micros` for others; requests merge only when every input has the same shape
apart from dim 0 and the same dtype (TF Serving's `pad_variable_length_inputs: false`, except
that mismatched requests run in separate batches instead of failing), up to `max_batch_size`
rows; the merged outputs are split back along dim 0. A request larger than `max_batch_size`
runs alone. Signatures with a scalar input (`generate`) are not batchable and bypass the queue
(TF Serving's batching would reject them: "Batching Run() input tensors must have at least one
dimension"). Written here: TF Serving's batcher is C++, and no kept Python library merges
requests of a TF signature.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import grpc
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.serve.errors import ServingError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchingParameters:
    """The fields of TF Serving's BatchingParameters that the embedded server honours (same names)."""

    max_batch_size: int = 8  # rows in one merged call
    batch_timeout_micros: int = 2000  # how long the first request of a batch waits for company
    max_enqueued_batches: int = 64  # queue bound, in batches; a request beyond it fails with UNAVAILABLE
    num_batch_threads: int = 2  # merged calls that may run at once
    allowed_batch_sizes: tuple[int, ...] = ()  # padded sizes, increasing, ending at max_batch_size; () = powers of 2 and max_batch_size

    def __post_init__(self):
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size):
            raise ConfigError(f"allowed_batch_sizes={list(sizes)} must increase strictly and end at max_batch_size={self.max_batch_size}")
        for field in dataclasses.fields(self):
            if field.name == "allowed_batch_sizes":
                continue
            value = getattr(self, field.name)
            minimum = 0 if field.name == "batch_timeout_micros" else 1
            if not isinstance(value, int) or value < minimum:
                raise ConfigError(f"batching {field.name}={value!r} must be an integer >= {minimum}")


def padded_size(rows: int, params: BatchingParameters) -> int:
    """The smallest allowed batch size holding `rows` (rows itself when it exceeds them all)."""
    sizes = params.allowed_batch_sizes or tuple(sorted({2**i for i in range(params.max_batch_size.bit_length()) if 2**i < params.max_batch_size} | {params.max_batch_size}))
    return next((s for s in sizes if s >= rows), rows)


def batch_key(inputs: dict[str, np.ndarray]) -> tuple | None:
    """What must match for two requests to merge; None when some input has no batch dimension."""
    if any(a.ndim == 0 for a in inputs.values()):
        return None
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1:
        return None
    return tuple(sorted((k, a.shape[1:], a.dtype.str) for k, a in inputs.items()))


@dataclasses.dataclass(eq=False)
class _Task:
    key: tuple
    inputs: dict[str, np.ndarray]
    rows: int
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, params: BatchingParameters, on_batch: Callable[[int, int], None] = lambda rows, requests: None):
        self.params, self._on_batch = params, on_batch
        self._cv = threading.Condition()
        self._pending: list[_Task] = []
        self._stopped = False
        self._threads = [threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True) for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, key: tuple, inputs: dict[str, np.ndarray], run) -> dict[str, np.ndarray]:
        """Runs `run` on a batch holding these inputs (`key` includes the servable); blocks until done."""
        task = _Task(key, inputs, next(iter(inputs.values())).shape[0], run)
        with self._cv:
            if self._stopped:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if len(self._pending) >= self.params.max_enqueued_batches * self.params.max_batch_size:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full")
            self._pending.append(task)
            self._cv.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def _take_batch(self) -> list[_Task] | None:
        timeout = self.params.batch_timeout_micros / 1e6
        with self._cv:
            while True:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._pending:
                    return None
                first = self._pending[0]
                same = [t for t in self._pending if t.key == first.key]
                wait = first.enqueued + timeout - time.monotonic()
                if sum(t.rows for t in same) >= self.params.max_batch_size or wait <= 0 or self._stopped:
                    break
                self._cv.wait(wait)  # another worker may take `first` meanwhile: look again
            batch, rows = [], 0
            for t in same:
                if not batch or rows + t.rows <= self.params.max_batch_size:
                    batch.append(t)
                    rows += t.rows
            taken = set(map(id, batch))
            self._pending = [t for t in self._pending if id(t) not in taken]
            return batch

    def _worker(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                # one task or many: the same padding, so a lone 3-row request also runs as 4 rows
                total = sum(t.rows for t in batch)
                pad = padded_size(total, self.params) - total
                merged = {k: np.concatenate([t.inputs[k] for t in batch] + [batch[-1].inputs[k][-1:]] * pad) for k in batch[0].inputs}
                combined = batch[0].run(merged)
                bad = [k for k, v in combined.items() if v.ndim == 0 or v.shape[0] != total + pad]
                if bad:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f"Batched output tensor(s) {bad} do not have the batch's {total + pad} rows in dim 0")
                combined = {k: v[:total] for k, v in combined.items()}
                splits = np.cumsum([t.rows for t in batch])[:-1]
                parts = {k: np.split(v, splits) for k, v in combined.items()}
                outputs = [{k: parts[k][i] for k in parts} for i in range(len(batch))]
                self._on_batch(total + pad, len(batch))
                for t, out in zip(batch, outputs, strict=True):
                    t.outputs = out
            except BaseException as e:  # noqa: BLE001 - handed to every request of the batch
                for t in batch:
                    t.error = e
            for t in batch:
                t.done.set()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
