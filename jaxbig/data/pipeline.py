"""grain pipelines that yield global batches sharded over the mesh's batch axes.

A training example is a window of T+1 tokens cut at a stride of T from the token stream
(inputs are the first T, targets the last T). Windows are shuffled per epoch with the run's
seed, and batch number `step` is a pure function of (seed, step), so a resumed run reads
exactly the batches it would have read. Each process reads only the rows of each global
batch that its own devices hold (`process_rows`) and assembles them into the global array, so
the global batch at step s is the same, row for row, whatever the number of processes.
"""

from __future__ import annotations

import time

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxbig.config import ConfigError
from jaxbig.parallel.rules import logical_to_spec

Batch = dict[str, jax.Array]  # {"inputs", "targets"[, "segment_ids", "positions"]}: [B, T] int32 each

BATCH_AXES = ("activation_batch", "activation_length")


class WindowSource:
    """grain random-access source: window i = tokens[i*T : i*T + T + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"corpus split of {len(tokens)} tokens is shorter than one window of data.seq_len+1={seq_len + 1}")

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].astype(np.int32)


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, (batch_size, seq_len), dict(mesh.shape)))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % replicas:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {replicas}; "
            f"use a multiple of {replicas}"
        )


def process_rows(sharding: NamedSharding, batch_size: int, devices=None) -> np.ndarray:
    """Indices of the global batch rows held by `devices` (default: this process's), ascending.

    With the batch split over data x fsdp, a process whose devices sit on one data shard reads
    B / (data x fsdp) rows; processes whose devices replicate the same rows (e.g. tensor or
    pipeline spanning processes) read the same rows, as `make_array_from_process_local_data` needs.
    """
    devices = sharding.addressable_devices if devices is None else set(devices)
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((batch_size, 1)).items():
        if device in devices:
            rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def to_global(local_rows: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> Batch:
    """This process's rows ({name: [R, T]}, ascending global row order) -> a global batch ({name: [B, T]})."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v), (batch_size, v.shape[1]))
        for k, v in local_rows.items()
    }


class BatchStream:
    """Global batches from a grain iterator over this process's rows.

    `iterator` is what a checkpoint saves (grain's state: its position). `resumes_from_checkpoint`
    says whether a resumed run must restore that state (packed input) or can rebuild the stream
    from the step alone (raw-text windows: batch = f(seed, step)). `waits` records how long each
    batch kept the loop waiting for input.
    """

    def __init__(self, iterator: grain.DatasetIterator, sharding: NamedSharding, batch_size: int, *, resumes_from_checkpoint: bool):
        self.iterator, self.sharding, self.batch_size = iterator, sharding, batch_size
        self.resumes_from_checkpoint = resumes_from_checkpoint
        self.waits: list[float] = []

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        t = time.perf_counter()
        rows = next(self.iterator)
        self.waits.append(time.perf_counter() - t)
        return to_global(rows, self.sharding, self.batch_size)

    def close(self) -> None:
        """Stops grain's prefetch threads or worker processes."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


class _BatchRows:
    """grain random-access source: index `step` -> rows `rows` of global batch `step` of `windows`."""

    def __init__(self, windows: grain.MapDataset, batch_size: int, rows: np.ndarray):
        self.windows, self.batch_size, self.rows = windows, batch_size, rows

    def __len__(self) -> int:
        return len(self.windows) // self.batch_size

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        base = int(step) * self.batch_size
        rows_RT1 = np.stack([self.windows[base + int(r)] for r in self.rows])
        return {"inputs": rows_RT1[:, :-1], "targets": rows_RT1[:, 1:]}


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rows: np.ndarray, shuffle: bool = True) -> grain.MapDataset:
    """Infinite MapDataset of one process's rows of each global batch: index `step` -> [len(rows), T+1].

    Global batch `step` is windows step*B .. step*B+B-1 of the shuffled, repeated window stream.
    """
    ds = grain.MapDataset.source(WindowSource(tokens, seq_len))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return grain.MapDataset.source(_BatchRows(ds.repeat(), batch_size, rows))


def train_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    mesh: Mesh,
    *,
    seed: int,
    shuffle: bool = True,
    start_step: int = 0,
    prefetch: int = 4,
) -> BatchStream:
    """Global training batches from `start_step` on, prefetched by a grain reader thread."""
    check_batch_divides(batch_size, mesh)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    ds = train_dataset(tokens, seq_len, batch_size, seed, process_rows(sharding, batch_size), shuffle)[start_step:]
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return BatchStream(iter(ds.to_iter_dataset(options)), sharding, batch_size, resumes_from_checkpoint=False)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, mesh: Mesh, num_batches: int) -> list[Batch]:
    """The first `num_batches` validation batches, in order (wrapping round a short split)."""
    check_batch_divides(batch_size, mesh)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    windows = grain.MapDataset.source(WindowSource(tokens, seq_len)).repeat()
    ds = grain.MapDataset.source(_BatchRows(windows, batch_size, process_rows(sharding, batch_size)))
    return [to_global(ds[i], sharding, batch_size) for i in range(num_batches)]
