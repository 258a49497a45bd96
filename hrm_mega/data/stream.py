"""Resumable, deterministic streaming of puzzle or text shards for training. The design is in docs/data.md.

Samples are whatever `decoder_for(manifest)` makes of a record: puzzle rows (inputs, labels, ids) or
packed text rows (input_ids, labels, position_ids, doc_ids; docs/data_format.md). Everything below
works on slots and records and is the same for both.

A split's shards are dealt to P logical *partitions* (shard i -> partition i % P). Global batch row r
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

import hashlib
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hrm_mega.data.collate import collate, pad_sample
from hrm_mega.data.decode import (
    CORRUPT_POLICIES,
    CorruptDataWarning,
    Decoder,
    Record,
    SampleSpec,
    Skip,
    decoder_for,
    read_segment,
)
from hrm_mega.data.shards import DataFormatError, read_manifest, split_shards

STATE_FORMAT = "hrm-mega/stream/1"
DEFAULT_SHUFFLE_BUFFER = 1024
_POLL_SECONDS, _IDLE_POLLS = 0.002, 100  # a worker with nothing wanted checks every 2 ms, idles after 0.2 s
MAX_WARNINGS = 100  # distinct corrupt-data warnings per stream; the counters keep counting after that
_ORDER, _TRANSFORM = 1, 2  # RNG domains, so that shuffling and augmentation never share a stream

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


# ---- which slots a partition visits, and in which order ---------------------------------------------


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
        rng = np.random.default_rng([self.seed, _ORDER, self.index, epoch])
        segments = list(self.segments)
        if self.shuffle_segments:
            segments = [segments[i] for i in rng.permutation(len(segments))]
        return segments, window_order(self.size, self.shuffle_buffer, rng)


def shard_partitions(
    counts: Sequence[int], partitions: int, *, seed: int, shuffle_buffer: int
) -> list[PartitionPlan]:
    """Training partitions: shard i goes to partition i % P; shard order is reshuffled every epoch."""
    return [
        PartitionPlan(
            p,
            segments=tuple(Segment(i, 0, counts[i]) for i in range(p, len(counts), partitions)),
            seed=seed,
            shuffle_segments=True,
            shuffle_buffer=shuffle_buffer,
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


# ---- reading one partition ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSource:
    """One split's shards plus how to turn records into samples; picklable for DataLoader workers."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    digest: str  # identifies the exact shard contents (from the manifest checksums)
    spec: SampleSpec
    decode: Decoder
    seed: int
    fail: bool
    transform: Transform | None = None

    @classmethod
    def open(
        cls, data_dir: str | Path, split: str, *, seed: int, corrupt_policy: str, transform: Transform | None
    ) -> ShardSource:
        if corrupt_policy not in CORRUPT_POLICIES:
            raise ValueError(f"corrupt_policy={corrupt_policy!r} must be one of {CORRUPT_POLICIES}")
        manifest = read_manifest(data_dir)
        spec = SampleSpec.from_manifest(manifest)
        if transform is not None and spec.kind == "text":
            raise ValueError(
                f"transform: augmentation does not apply to text datasets ({data_dir} has task "
                f"{manifest['task']!r}); set data.augment=false"
            )
        paths = split_shards(data_dir, split, manifest)
        entries = manifest["splits"][split]["shards"]
        digest = hashlib.sha256("".join(e.get("sha256", "") for e in entries).encode()).hexdigest()[:16]
        return cls(
            paths=tuple(str(p) for p in paths),
            counts=tuple(int(e["num_samples"]) for e in entries),
            digest=digest,
            spec=spec,
            decode=decoder_for(manifest),
            seed=seed,
            fail=corrupt_policy == "fail",
            transform=transform,
        )

    def sample(self, record: Record, epoch: int) -> dict[str, Any] | Skip:
        """Decodes one record and applies the transform, whose RNG is keyed by (seed, epoch, sample)."""
        shard, key = record.get("__url__", "?"), record["__key__"]
        try:
            sample = self.decode(record, self.spec)
        except DataFormatError as exn:
            if self.fail:
                raise DataFormatError(f"{shard}: key {key}: {exn}") from None
            return Skip(shard, key, str(exn), unreadable=False)
        sample["epoch"] = epoch
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, _TRANSFORM, epoch, sample["sample_id"]])
            sample = self.transform(sample, rng)
        return sample


def read_in_order(
    source: ShardSource, segments: Sequence[Segment], order: np.ndarray, start: int
) -> Iterator[Record | Skip]:
    """Yields the records (undecoded) or Skips of slots order[start:], reading each needed shard once.

    Shards with no slot left in order[start:] are not opened; records already handed out are read past
    without decoding. Read-ahead is held until its turn comes: at most one shuffle window's worth.
    """
    n = len(order)
    if start >= n:
        return
    bounds = np.cumsum([0] + [s.hi - s.lo for s in segments]).tolist()
    wanted = np.zeros(n, dtype=bool)
    wanted[order[start:]] = True
    todo, pos = order.tolist(), start
    pending: dict[int, Record | Skip] = {}
    for k, seg in enumerate(segments):
        mask = wanted[bounds[k] : bounds[k + 1]]
        if not mask.any():
            continue
        path, expected = source.paths[seg.shard], source.counts[seg.shard]
        for i, item in read_segment(path, seg.lo, seg.hi, mask, expected=expected, fail=source.fail):
            pending[bounds[k] + i] = item
            while pos < n and todo[pos] in pending:
                yield pending.pop(todo[pos])
                pos += 1
    if pos != n:
        raise RuntimeError(f"internal error: partition epoch stopped at slot {pos} of {n}")


def partition_samples(
    source: ShardSource, plan: PartitionPlan, start: int, *, loop: bool
) -> Iterator[dict | Skip]:
    """One item per slot of `plan` from absolute slot `start` (epoch * size + position) on: a decoded,
    transformed sample carrying its `epoch`, or a Skip. Endless if `loop`, else one epoch."""
    if plan.size == 0:
        return
    epoch, pos = divmod(start, plan.size)
    while loop or epoch == 0:
        segments, order = plan.epoch(epoch)
        for item in read_in_order(source, segments, order, pos):
            yield item if isinstance(item, Skip) else source.sample(item, epoch)
        epoch, pos = epoch + 1, 0


# ---- loader workers ---------------------------------------------------------------------------------


def _ignore_stop_signals(_: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process: launchers signal the whole process
    group, and the trainer must outlive the signal long enough to write its checkpoint."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _keep(item: Any) -> Any:  # DataLoader collate_fn: pass items through (numpy pickles cheaper than tensors)
    return item


def _one_line(exn: BaseException) -> str:
    lines = [line for line in str(exn).strip().splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if "Original Traceback" in str(exn):  # DataLoader re-raise: the last line is the worker's own error
        return lines[-1].strip()
    return f"{type(exn).__name__}: {lines[0].strip()}"


class _PartitionWorkers(IterableDataset):
    """Runs in the DataLoader workers. Worker w serves the fixed partitions `owners[w]`; per request it
    yields ("items", j, first_slot, [sample or Skip, ...]) for the partition furthest below its target
    (the shared `demand` counters, in slots, written by the main process), or ("error", exception class
    name, one-line message) and stops. While every target is met it waits for the main process to
    consume, answering ("idle",) now and then so that shutdown and parent-death checks still run."""

    def __init__(
        self,
        source: ShardSource,
        plans: list[PartitionPlan],
        starts: list[int],
        demand: torch.Tensor,
        owners: list[list[int]],
        chunk: int,
        loop: bool,
    ) -> None:
        self.source, self.plans, self.starts, self.demand = source, plans, starts, demand
        self.owners, self.chunk, self.loop = owners, chunk, loop

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        mine = self.owners[info.id if info is not None else 0]
        demand = self.demand.numpy()  # shared memory
        readers = {
            j: partition_samples(self.source, self.plans[j], self.starts[j], loop=self.loop) for j in mine
        }
        produced = {j: self.starts[j] for j in mine}
        try:
            while True:
                for _ in range(_IDLE_POLLS):
                    j = max(mine, key=lambda j: int(demand[j]) - produced[j])
                    want = int(demand[j]) - produced[j]
                    if want > 0:
                        break
                    time.sleep(_POLL_SECONDS)
                if want <= 0:
                    yield ("idle",)
                    continue
                items = list(islice(readers[j], min(want, self.chunk)))
                if not items:
                    raise RuntimeError(f"partition {self.plans[j].index} has no more samples")
                yield ("items", j, produced[j], items)
                produced[j] += len(items)
        except Exception as exn:
            msg = str(exn) if isinstance(exn, DataFormatError) else _one_line(exn)
            yield ("error", type(exn).__name__, msg)


# ---- the stream -------------------------------------------------------------------------------------


def check_layout(
    *, global_batch: int, partitions: int, dp_rank: int, dp_size: int, num_workers: int, seed: int
) -> None:
    """Validates the batch/partition/DP arithmetic; one-line ValueErrors that name the field."""
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


class PuzzleStream:
    """Hands out samples row by row: `take(rows)` returns a new sample for each given batch row.

    The name is historical: text datasets (task "text") stream the same way, one packed row per sample;
    a transform (augmentation) is refused for them.

    Rows are local to this DP rank (0 .. global_batch/dp_size - 1). With `loop=True` (training) each
    partition cycles through shuffled epochs forever. With `loop=False` (adaptive evaluation) the
    partitions are contiguous, unshuffled ranges of the split read once; `take` then returns fewer rows
    once partitions run dry (the `rows` field says which) and `exhausted` turns True at the end.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        seed: int,
        global_batch: int,
        partitions: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int | None = None,
        corrupt_policy: str = "skip",
        transform: Transform | None = None,
        loop: bool = True,
        prefetch: int | None = None,
    ) -> None:
        check_layout(
            global_batch=global_batch,
            partitions=partitions,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_workers=num_workers,
            seed=seed,
        )
        if shuffle_buffer is None:
            shuffle_buffer = DEFAULT_SHUFFLE_BUFFER if loop else 0
        if shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer={shuffle_buffer} must be >= 0 (0: no shuffle within a partition)"
            )
        self.source = ShardSource.open(
            data_dir, split, seed=seed, corrupt_policy=corrupt_policy, transform=transform
        )
        counts = self.source.counts
        if loop and len(counts) < partitions:
            raise ValueError(
                f"partitions={partitions} exceeds the {len(counts)} shards of {data_dir}/{split}; "
                "lower partitions or rebuild with more shards"
            )
        make = shard_partitions if loop else range_partitions
        plans = make(counts, partitions, seed=seed, shuffle_buffer=shuffle_buffer)
        if loop and any(p.size == 0 for p in plans):
            raise ValueError(
                f"{data_dir}/{split}: partition {next(p.index for p in plans if not p.size)} has no samples"
            )

        self.split, self.seed, self.loop, self.shuffle_buffer = split, seed, loop, shuffle_buffer
        self.partitions, self.dp_rank, self.dp_size = partitions, dp_rank, dp_size
        self.num_workers = num_workers
        self.num_samples = sum(counts)
        self.local_batch = global_batch // dp_size
        per_rank = partitions // dp_size
        self.plans = plans[dp_rank * per_rank : (dp_rank + 1) * per_rank]  # this rank's, local index j
        rows_per_partition = global_batch // partitions
        self.row_partition = [r // rows_per_partition for r in range(self.local_batch)]  # local row -> j

        # Per-partition progress, in slots (consumed) and in outcomes; this is all the state there is.
        self._consumed = [0] * per_rank
        self._samples = [0] * per_rank
        self._skipped = [0] * per_rank
        self._corrupt: list[set[str]] = [set() for _ in range(per_rank)]
        self._warnings = 0

        # Readers: in-process generators (num_workers=0), or worker processes feeding per-partition queues.
        self._depth = prefetch if prefetch is not None else max(4, 2 * rows_per_partition)
        self._chunk = max(1, min(self._depth // 2, 256))  # samples per worker message
        self._readers: list[Iterator[dict | Skip] | None] = [None] * per_rank
        self._queues: list[deque] = [deque() for _ in range(per_rank)]
        self._loader_iter: Iterator | None = None
        self._received = [0] * per_rank  # slots delivered by the workers, per partition
        self._demand = torch.zeros(per_rank, dtype=torch.int64).share_memory_() if num_workers else None
        self._demand_view = self._demand.numpy() if self._demand is not None else None  # cheap writes

    # ---- handing out samples ----

    def take(self, rows: Iterable[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """New samples for the given local rows, stacked in the given order.

        Puzzles: {"inputs": Long[k, seq], "labels": Long[k, seq], "puzzle_identifiers", "group_id",
        "sample_id", "epoch", "rows": Long[k]} (plus anything the transform adds). Text: {"input_ids",
        "labels", "position_ids", "doc_ids": Long[k, seq], "sample_id", "epoch", "rows": Long[k]}.
        Rows of one partition get its samples in ascending row order, whatever order they are passed
        in. k < len(rows) only with loop=False, when partitions are used up: `rows` lists the rows that
        got a sample.
        """
        rows = self._check_rows(rows)
        got: dict[int, dict] = {}
        for r in sorted(rows):
            sample = self._next_sample(self.row_partition[r])
            if sample is not None:
                got[r] = sample
        filled = [r for r in rows if r in got]
        return collate([got[r] for r in filled], self.source.spec, rows=filled)

    def first_batch(self) -> dict[str, torch.Tensor]:
        return self.take(range(self.local_batch))

    @property
    def exhausted(self) -> bool:
        """True when a loop=False stream has handed out every sample of its partitions."""
        return not self.loop and all(c >= p.size for c, p in zip(self._consumed, self.plans))

    @property
    def progress(self) -> dict[str, float | int]:
        """This rank's progress; `epoch` is slots consumed / size of this rank's partitions."""
        total = sum(p.size for p in self.plans)
        return {
            "epoch": sum(self._consumed) / total if total else 0.0,
            "samples": sum(self._samples),
            "skipped_samples": sum(self._skipped),
            "skipped_shards": len(set().union(*self._corrupt)),
        }

    def _check_rows(self, rows: Iterable[int] | torch.Tensor) -> list[int]:
        if isinstance(rows, torch.Tensor):
            rows = rows.reshape(-1).tolist()
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < self.local_batch]
        if bad:
            raise ValueError(f"take(rows): row {bad[0]} is outside the local batch [0, {self.local_batch})")
        if len(set(rows)) != len(rows):
            raise ValueError("take(rows): rows must not repeat")
        return rows

    def _next_sample(self, j: int) -> dict | None:
        while self.loop or self._consumed[j] < self.plans[j].size:
            item = self._pop(j)
            self._consumed[j] += 1
            if self._demand_view is not None:
                self._demand_view[j] = self._target(j)
            if not isinstance(item, Skip):
                self._samples[j] += 1
                return item
            self._skipped[j] += 1
            if item.unreadable:
                self._corrupt[j].add(os.path.basename(item.shard))
            self._warnings = _warn_skip(item, self._warnings)
        return None

    def _pop(self, j: int) -> dict | Skip:
        if not self.num_workers:
            if self._readers[j] is None:
                self._readers[j] = partition_samples(
                    self.source, self.plans[j], self._consumed[j], loop=self.loop
                )
            item = next(self._readers[j], None)
            if item is None:
                raise RuntimeError(f"internal error: partition {self.plans[j].index} ended early")
            return item
        queue = self._queues[j]
        while not queue:
            self._pull()
        return queue.popleft()

    # ---- workers ----

    def _target(self, j: int) -> int:
        """How far (in slots) the workers should read ahead for partition j."""
        target = self._consumed[j] + self._depth
        return target if self.loop else min(target, self.plans[j].size)

    def _start_workers(self) -> None:
        assert self._demand is not None and self._demand_view is not None
        for j in range(len(self.plans)):
            self._demand_view[j] = self._target(j)
        self._received = list(self._consumed)
        owners = [list(range(w, len(self.plans), self.num_workers)) for w in range(self.num_workers)]
        workers = _PartitionWorkers(
            self.source, self.plans, list(self._consumed), self._demand, owners, self._chunk, self.loop
        )
        # Enough requests in flight for every partition to be read ahead `depth` slots while the model
        # computes. in_order=False: a worker waiting for demand must not hold up the others' results
        # (each partition still arrives in order: one worker makes it, and its results stay in order).
        per_worker = -(-len(self.plans) // self.num_workers)
        prefetch_factor = per_worker * -(-self._depth // self._chunk) + 1
        loader = DataLoader(
            workers,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_keep,
            prefetch_factor=prefetch_factor,
            in_order=False,
            worker_init_fn=_ignore_stop_signals,
        )
        self._loader_iter = iter(loader)  # long-lived: workers run until close() or load_state_dict()

    def _pull(self) -> None:
        if self._loader_iter is None:
            self._start_workers()
        try:
            message = next(self._loader_iter)
        except StopIteration:
            self.close()
            raise RuntimeError(f"{self.split}: loader workers stopped unexpectedly") from None
        except Exception as exn:  # a worker killed by the OS, or an error DataLoader re-raises
            self.close()
            raise RuntimeError(f"{self.split}: loader worker failed: {_one_line(exn)}") from None
        if message[0] == "items":
            _, j, first, items = message
            if first != self._received[j]:
                self.close()
                raise RuntimeError(f"internal error: partition {self.plans[j].index} items out of order")
            self._received[j] += len(items)
            self._queues[j].extend(items)
            if len(self._queues[j]) > 4 * self._depth:  # demand keeps queues <= depth; guard the invariant
                self.close()
                raise RuntimeError(
                    f"loader queue of partition {self.plans[j].index} exceeds {4 * self._depth} items"
                )
        elif message[0] == "error":
            self.close()
            _, kind, text = message
            if kind == "DataFormatError":
                raise DataFormatError(text)
            raise RuntimeError(f"loader worker: {text}")

    def close(self) -> None:
        """Stops the worker processes (if any); the stream can still be used and restarts them."""
        loader_iter, self._loader_iter = self._loader_iter, None
        if loader_iter is not None and hasattr(loader_iter, "_shutdown_workers"):
            loader_iter._shutdown_workers()
        self._queues = [deque() for _ in self.plans]
        self._readers = [None] * len(self.plans)

    def __enter__(self) -> PuzzleStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resume ----

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of this rank's partitions (what was handed out, not prefetched)."""
        partition_state = {}
        for j, plan in enumerate(self.plans):
            epoch, position = divmod(self._consumed[j], plan.size) if plan.size else (0, 0)
            partition_state[str(plan.index)] = {
                "epoch": epoch,
                "position": position,
                "samples": self._samples[j],
                "skipped_samples": self._skipped[j],
                "corrupt_shards": sorted(self._corrupt[j]),
            }
        return {**self._identity(), "partition_state": partition_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state_dict; the following takes return exactly what the saved stream would have.

        The state may come from another DP layout (see merge_state_dicts) as long as it holds an entry
        for each of this rank's partitions.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: format is not {STATE_FORMAT!r}")
        for field, value in self._identity().items():
            if state.get(field) != value:
                raise ValueError(
                    f"loader state: {field}={state.get(field)!r} but this stream has {field}={value!r}; "
                    "resume with the same data settings"
                )
        entries = state.get("partition_state", {})
        consumed = []
        for plan in self.plans:
            entry = entries.get(str(plan.index))
            if entry is None:
                raise ValueError(
                    f"loader state has no entry for partition {plan.index} (different partitions?)"
                )
            position, epoch = int(entry["position"]), int(entry["epoch"])
            if not (
                0 <= position < max(plan.size, 1)
                and epoch >= 0
                and (self.loop or epoch * plan.size + position <= plan.size)
            ):
                raise ValueError(
                    f"loader state: partition {plan.index} position {epoch}:{position} is out of range"
                )
            consumed.append(epoch * plan.size + position)
        self.close()
        self._consumed = consumed
        self._samples = [int(entries[str(p.index)]["samples"]) for p in self.plans]
        self._skipped = [int(entries[str(p.index)]["skipped_samples"]) for p in self.plans]
        self._corrupt = [set(entries[str(p.index)]["corrupt_shards"]) for p in self.plans]

    @staticmethod
    def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Joins the states of all DP ranks into one that a stream of any DP layout can load."""
        settings = {k: v for k, v in states[0].items() if k != "partition_state"}
        partition_state: dict[str, Any] = {}
        for state in states:
            if {k: v for k, v in state.items() if k != "partition_state"} != settings:
                raise ValueError("merge_state_dicts: states come from streams with different data settings")
            partition_state.update(state["partition_state"])
        return {**settings, "partition_state": partition_state}

    def _identity(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "shards_digest": self.source.digest,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "partitions": self.partitions,
            "shuffle_buffer": self.shuffle_buffer,
            "loop": self.loop,
        }


def _warn_skip(skip: Skip, warned: int) -> int:
    if warned < MAX_WARNINGS:
        suffix = "" if warned < MAX_WARNINGS - 1 else " (further corrupt-data warnings suppressed)"
        warnings.warn(f"{skip.message()}; skipped{suffix}", CorruptDataWarning, stacklevel=4)
    return warned + 1


# ---- evaluation -------------------------------------------------------------------------------------


def iterate_split(
    data_dir: str | Path,
    split: str = "test",
    *,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    corrupt_policy: str = "skip",
) -> Iterator[dict[str, torch.Tensor]]:
    """One unshuffled pass over a split for fixed-mode evaluation.

    Rank d reads the contiguous samples [d*N//dp_size, (d+1)*N//dp_size) in manifest order, so the ranks
    together see every sample exactly once. Every rank yields the same number of batches,
    ceil(ceil(N/dp_size)/batch_size), each of exactly batch_size rows; rows past the end of the rank's
    share (or replacing skipped corrupt samples) are padding with `valid` False, `sample_id` -1 and
    labels all ignore_label_id. Keeping the batch count equal matters when the forward pass is a
    collective (ZeRO-3, TP).
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    source = ShardSource.open(data_dir, split, seed=0, corrupt_policy=corrupt_policy, transform=None)
    n = sum(source.counts)
    segments = range_segments(source.counts, dp_rank * n // dp_size, (dp_rank + 1) * n // dp_size)
    plan = PartitionPlan(dp_rank, segments, seed=0, shuffle_segments=False, shuffle_buffer=0)
    num_batches = _ceil_div(_ceil_div(n, dp_size), batch_size)
    return _eval_batches(source, plan, batch_size, num_batches)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _eval_batches(
    source: ShardSource, plan: PartitionPlan, batch_size: int, num_batches: int
) -> Iterator[dict]:
    items, warned = partition_samples(source, plan, 0, loop=False), 0
    for _ in range(num_batches):
        batch: list[dict] = []
        for item in items:
            if isinstance(item, Skip):
                warned = _warn_skip(item, warned)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                break
        valid = [True] * len(batch) + [False] * (batch_size - len(batch))
        batch += [pad_sample(source.spec) for _ in range(batch_size - len(batch))]
        yield collate(batch, source.spec, valid=valid)
