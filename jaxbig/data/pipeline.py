"""grain pipelines that yield global batches sharded over the mesh's batch axes.

A training example is a window of T+1 tokens cut at a stride of T from the token stream
(inputs are the first T, targets the last T). Windows are shuffled per epoch with the run's
seed, and batch number `step` is a pure function of (seed, step), so a resumed run reads
exactly the batches it would have read. Each process reads only its stride of the windows
and assembles its rows into the global array.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxbig.config import ConfigError
from jaxbig.parallel.rules import logical_to_spec

Batch = dict[str, jax.Array]  # {"inputs": [B, T] int32, "targets": [B, T] int32}

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
    if batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} processes")


def to_global(local_rows: np.ndarray, sharding: NamedSharding) -> Batch:
    """This process's rows [B/P, T+1] -> a global batch of inputs and targets [B, T]."""
    return {
        "inputs": jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(local_rows[:, :-1])),
        "targets": jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(local_rows[:, 1:])),
    }


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """Infinite MapDataset of this process's rows of each global batch: index `step` -> [B/P, T+1]."""
    ds = grain.MapDataset.source(WindowSource(tokens, seq_len))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat()
    ds = ds[jax.process_index() :: jax.process_count()]
    return ds.batch(batch_size // jax.process_count(), drop_remainder=True)


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
) -> Iterator[Batch]:
    """Global training batches from `start_step` on, prefetched by grain reader threads."""
    check_batch_divides(batch_size, mesh)
    ds = train_dataset(tokens, seq_len, batch_size, seed, shuffle)[start_step:]
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    for rows in ds.to_iter_dataset(options):
        yield to_global(rows, sharding)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, mesh: Mesh, num_batches: int) -> list[Batch]:
    """The first `num_batches` validation batches, in order (wrapping round a short split)."""
    check_batch_divides(batch_size, mesh)
    ds = grain.MapDataset.source(WindowSource(tokens, seq_len)).repeat()
    ds = ds[jax.process_index() :: jax.process_count()].batch(batch_size // jax.process_count(), drop_remainder=True)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    return [to_global(ds[i], sharding) for i in range(num_batches)]
