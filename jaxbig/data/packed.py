"""Training input from a prepared data set (`scripts/prepare_data.py`): shuffled documents, packed rows.

Per process, a grain pipeline:
  ArrayRecord documents -> this process's share -> shuffle (seed, per epoch) -> repeat
  -> decode, append eos, split into (inputs, targets) -> concat-then-split into rows of T tokens
  -> segment ids and positions per row -> batch of this process's rows -> worker processes.

Documents are concatenated and cut into rows of exactly T tokens (grain's
`ConcatThenSplitIterDataset`: no padding); each row carries `segment_ids` (1, 2, ... per
document piece) so attention never crosses documents, and `positions` that restart at 0 at
every document start and at every row start (a document continued from the previous row is a
new sequence, as with the raw-text windows). Targets never cross documents either: a
document's last target is its eos.

Unlike the raw-text windows, the packed stream is not a function of the step alone (packing
depends on everything read before), so its position is the grain iterator's state, saved in
every checkpoint. Processes whose devices hold the same batch rows (tensor or pipeline axes
spanning processes) read the same share, so their rows agree as `make_array_from_process_local_data` needs.
The worker count changes the stream (each worker packs its own slice), so resume with the
same `data.workers`.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxbig.config import ConfigError
from jaxbig.data.pipeline import BatchStream, batch_sharding, check_batch_divides, process_rows
from jaxbig.data.prepare import PreparedData

FEATURES = ("inputs", "targets")


class _Example(grain.transforms.Map):
    """A document record -> {"inputs": d[:-1], "targets": d[1:]} of `d` = its tokens + eos."""

    def __init__(self, dtype: np.dtype, eos_id: int):
        self.dtype, self.eos_id = dtype, eos_id

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        d = np.append(np.frombuffer(record, dtype=self.dtype).astype(np.int32), np.int32(self.eos_id))
        return {"inputs": d[:-1], "targets": d[1:]}


def row_positions(segment_ids_RT: np.ndarray) -> np.ndarray:
    """Index within the segment for each token, restarting at each segment start and each row start."""
    R, T = segment_ids_RT.shape
    idx_RT = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T))
    starts_RT = np.ones((R, T), dtype=bool)
    starts_RT[:, 1:] = segment_ids_RT[:, 1:] != segment_ids_RT[:, :-1]
    seg_start_RT = np.maximum.accumulate(np.where(starts_RT, idx_RT, 0), axis=1)
    return (idx_RT - seg_start_RT).astype(np.int32)


class _Row(grain.transforms.Map):
    """grain's packed example -> inputs, targets, segment_ids, positions (each [T] int32)."""

    def map(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg_T = ex["inputs_segment_ids"].astype(np.int32)
        return {
            "inputs": ex["inputs"].astype(np.int32),
            "targets": ex["targets"].astype(np.int32),
            "segment_ids": seg_T,
            "positions": row_positions(seg_T[None])[0],
        }


def process_share(sharding: NamedSharding, batch_size: int) -> tuple[int, int, np.ndarray]:
    """(this process's group, number of groups, its rows): processes holding the same rows form one group."""
    groups = sorted({tuple(process_rows(sharding, batch_size, [d for d in jax.devices() if d.process_index == p])) for p in range(jax.process_count())})
    rows = process_rows(sharding, batch_size)
    return groups.index(tuple(rows)), len(groups), rows


def packed_dataset(
    data: PreparedData, split: str, seq_len: int, rows: int, *, seed: int, shuffle: bool = True, share: int = 0, shares: int = 1
) -> grain.IterDataset:
    """Infinite IterDataset of batches [rows, T] of packed rows from share `share` of `shares` of the documents."""
    docs = grain.MapDataset.source(data.documents(split))
    n = len(docs)
    if n < shares:
        raise ConfigError(f"{str(data.root)!r} split {split!r} has {n} documents, fewer than the {shares} process groups reading it; prepare more data")
    docs = docs[share::shares]
    if shuffle:
        docs = docs.shuffle(seed=seed)
    tokenizer = data.tokenizer
    examples = docs.repeat().map(_Example(data.dtype, tokenizer.eos_id)).to_iter_dataset()
    packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct={f: seq_len for f in FEATURES})
    return packed.map(_Row()).batch(rows, drop_remainder=True)


def packed_batches(
    data: PreparedData, seq_len: int, batch_size: int, mesh: Mesh, *, seed: int, shuffle: bool = True, workers: int = 0, prefetch: int = 4
) -> BatchStream:
    """Global packed training batches; `workers` > 0 runs the pipeline in that many processes."""
    check_batch_divides(batch_size, mesh)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    share, shares, rows = process_share(sharding, batch_size)
    ds = packed_dataset(data, "train", seq_len, len(rows), seed=seed, shuffle=shuffle, share=share, shares=shares)
    return BatchStream(iter(prefetched(ds, workers, prefetch)), sharding, batch_size, resumes_from_checkpoint=True)


def prefetched(ds: grain.IterDataset, workers: int, prefetch: int) -> grain.IterDataset:
    """`ds` run ahead of the loop: in `workers` processes, or in a reader thread when 0."""
    if workers:
        from absl import flags  # only with worker processes: they are what reads absl flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; scripts here use argparse
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
    if prefetch:
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def packed_eval_batches(data: PreparedData, seq_len: int, batch_size: int, mesh: Mesh, num_batches: int) -> list:
    """The first `num_batches` packed validation batches, unshuffled (the same every evaluation)."""
    check_batch_divides(batch_size, mesh)
    sharding = batch_sharding(mesh, batch_size, seq_len)
    share, shares, rows = process_share(sharding, batch_size)
    it = iter(packed_dataset(data, "val", seq_len, len(rows), seed=0, shuffle=False, share=share, shares=shares))
    stream = BatchStream(it, sharding, batch_size, resumes_from_checkpoint=False)
    return [next(stream) for _ in range(num_batches)]
