"""Partition planning: which slots each partition of a split visits, and in which order. Pure arithmetic on
shard sample counts (no I/O); the design is in docs/data.md.

A split's shards are dealt to P logical *partitions* (shard i -> partition i % P; a split with fewer
shards than partitions is cut into P runs of consecutive samples). Global batch row r
only ever reads partition r * P // B, so what a row sees depends neither on the data-parallel size nor on
the number of loader workers. Each partition is an endless run of epochs: epoch e visits the partition's
shards in an order shuffled by (seed, partition, e), and shuffles their samples in a bounded buffer
(windows of `shuffle_buffer` consecutive samples) driven by the same generator.

Vocabulary:
- a *slot* is a position in one epoch of a partition: the records of the epoch's shards, in that
  epoch's shard order, numbered from 0. Every record has a slot whether or not it decodes, so positions,
  and with them resume, never depend on what turned out to be corrupt.
- an epoch's *order* is the permutation in which the partition hands out its slots: a bounded-buffer
  shuffle computed on slot numbers alone, so fast-forwarding to a saved position needs no sample data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# RNG domains, so that shuffling (here) and augmentation (reader.ShardSource) never share a stream.
RNG_ORDER, RNG_TRANSFORM = 1, 2


def check_partitions(
    *, global_batch: int, partitions: int, dp_rank: int, dp_size: int, num_workers: int, seed: int
) -> None:
    """Validates the batch/partition/DP/worker arithmetic; one-line ValueErrors that name the field."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if partitions < 1:
        raise ValueError(f"partitions={partitions} must be >= 1")
    if partitions % dp_size:
        raise ValueError(
            f"partitions={partitions} must be a multiple of dp_size={dp_size} (each rank owns P/dp)"
        )
    if global_batch < 1 or global_batch % partitions:
        raise ValueError(
            f"global_batch={global_batch} must be a positive multiple of partitions={partitions} "
            "(each partition feeds global_batch/partitions rows)"
        )
    if num_workers < 0 or num_workers > partitions // dp_size:
        raise ValueError(
            f"num_workers={num_workers} must be in [0, partitions/dp_size={partitions // dp_size}] "
            "(a worker serves at least one partition)"
        )
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")


def window_order(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which slots 0..n-1 are handed out: each run of `window` consecutive slots is filled
    into a buffer, shuffled and drained (identity if window <= 1).

    Unlike a streaming shuffle buffer, where an item may linger for many times the buffer size, a slot
    never moves out of its window. So resuming mid-epoch re-reads at most one shard plus one window of
    records, not everything since the start of the epoch (measurements in docs/data.md).
    """
    order = np.arange(n, dtype=np.int64)
    if window > 1:
        for start in range(0, n, window):
            order[start : start + window] = start + rng.permutation(min(window, n - start))
    return order


@dataclass(frozen=True)
class Segment:
    """Records [lo, hi) of shard number `shard` of the split."""

    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class PartitionPlan:
    """What partition `index` reads: its segments, and how each epoch orders the segments and slots."""

    index: int
    segments: tuple[Segment, ...]
    seed: int
    shuffle_segments: bool
    shuffle_buffer: int

    @property
    def size(self) -> int:
        return sum(s.hi - s.lo for s in self.segments)

    def epoch(self, epoch: int) -> tuple[list[Segment], np.ndarray]:
        rng = np.random.default_rng([self.seed, RNG_ORDER, self.index, epoch])
        segments = list(self.segments)
        if self.shuffle_segments:
            segments = [segments[i] for i in rng.permutation(len(segments))]
        return segments, window_order(self.size, self.shuffle_buffer, rng)


def shard_partitions(
    counts: Sequence[int], partitions: int, *, seed: int, shuffle_buffer: int, shuffle_shards: bool = True
) -> list[PartitionPlan]:
    """Training partitions: shard i goes to partition i % P; shard order is reshuffled every epoch (kept
    with shuffle_shards=False: the partitions then move through the split's shards together, in the
    order they were written). A split with fewer shards than partitions (a small dataset) is cut into P
    runs of consecutive samples instead, so that every dataset with at least P samples trains at any
    partition count."""
    if len(counts) >= partitions:
        segments = [
            tuple(Segment(i, 0, counts[i]) for i in range(p, len(counts), partitions))
            for p in range(partitions)
        ]
    else:
        n = sum(counts)
        segments = [
            range_segments(counts, p * n // partitions, (p + 1) * n // partitions) for p in range(partitions)
        ]
    return [
        PartitionPlan(
            p, segments=segments[p], seed=seed, shuffle_segments=shuffle_shards, shuffle_buffer=shuffle_buffer
        )
        for p in range(partitions)
    ]


def range_segments(counts: Sequence[int], lo: int, hi: int) -> tuple[Segment, ...]:
    """The segments that cover samples [lo, hi) of the split (manifest order)."""
    segments, start = [], 0
    for i, count in enumerate(counts):
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            segments.append(Segment(i, a - start, b - start))
        start += count
    return tuple(segments)


def range_partitions(
    counts: Sequence[int], partitions: int, *, seed: int, shuffle_buffer: int
) -> list[PartitionPlan]:
    """Evaluation partitions: partition p holds samples [p*N//P, (p+1)*N//P) in manifest order."""
    n = sum(counts)
    return [
        PartitionPlan(
            p,
            segments=range_segments(counts, p * n // partitions, (p + 1) * n // partitions),
            seed=seed,
            shuffle_segments=False,
            shuffle_buffer=shuffle_buffer,
        )
        for p in range(partitions)
    ]
