"""The training stream: `SampleStream` hands out samples row by row, deterministic given the seed and
resumable exactly from its state dict. The design is in docs/data.md.

Samples are whatever `decoder_for(manifest)` makes of a record: puzzle rows (inputs, labels, ids) or
packed text rows (input_ids, labels, position_ids, doc_ids; docs/data_format.md). Partition planning
(which slots a partition visits, in which order) is in partition.py, shard reading in reader.py, the
read-ahead worker processes in workers.py.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hrm_mega.data.collate import collate
from hrm_mega.data.decode import Skip
from hrm_mega.data.partition import check_partitions, range_partitions, shard_partitions
from hrm_mega.data.reader import ShardSource, Transform, partition_samples, warn_skip
from hrm_mega.data.shards import DataFormatError
from hrm_mega.data.workers import one_line, start_workers, stop_workers

STATE_FORMAT = "hrm-mega/stream/1"  # in every checkpoint: keep it, and the state-dict keys, stable
DEFAULT_SHUFFLE_BUFFER = 1024


class SampleStream:
    """Hands out samples row by row: `take(rows)` returns a new sample for each given batch row.

    Puzzle datasets give one puzzle per sample, text datasets (task "text") one packed row per sample;
    a transform (augmentation) is refused for text.

    Rows are local to this DP rank (0 .. global_batch/dp_size - 1). With `loop=True` (training) each
    partition cycles through shuffled epochs forever (`in_order=True`: through epochs in the order the
    split was written, shard after shard, for a source sorted by difficulty). With `loop=False` (adaptive evaluation) the
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
        shard_url: str = "",
        read_retries: int = 3,
        in_order: bool = False,
    ) -> None:
        check_partitions(
            global_batch=global_batch,
            partitions=partitions,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_workers=num_workers,
            seed=seed,
        )
        if in_order:  # the order the split was written in (say, easy to hard): no shuffling at all
            shuffle_buffer = 0
        if shuffle_buffer is None:
            shuffle_buffer = DEFAULT_SHUFFLE_BUFFER if loop else 0
        if shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer={shuffle_buffer} must be >= 0 (0: no shuffle within a partition)"
            )
        self.source = ShardSource.open(
            data_dir, split, seed=seed, corrupt_policy=corrupt_policy, transform=transform,
            shard_url=shard_url, retries=read_retries,
        )  # fmt: skip
        counts = self.source.counts
        if loop and sum(counts) < partitions:
            raise ValueError(
                f"partitions={partitions} exceeds the {sum(counts)} samples of {data_dir}/{split}; "
                "lower partitions (each partition needs a sample)"
            )
        if loop:
            plans = shard_partitions(
                counts, partitions, seed=seed, shuffle_buffer=shuffle_buffer, shuffle_shards=not in_order
            )
        else:
            plans = range_partitions(counts, partitions, seed=seed, shuffle_buffer=shuffle_buffer)
        if loop and any(p.size == 0 for p in plans):
            raise ValueError(
                f"{data_dir}/{split}: partition {next(p.index for p in plans if not p.size)} has no samples"
            )

        self.split, self.seed, self.loop, self.shuffle_buffer = split, seed, loop, shuffle_buffer
        self.in_order = in_order
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
            self._warnings = warn_skip(item, self._warnings)
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
        # long-lived: the workers run until close() or load_state_dict()
        self._loader_iter = start_workers(
            self.source,
            self.plans,
            list(self._consumed),
            self._demand,
            num_workers=self.num_workers,
            chunk=self._chunk,
            depth=self._depth,
            loop=self.loop,
        )

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
            raise RuntimeError(f"{self.split}: loader worker failed: {one_line(exn)}") from None
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
        stop_workers(loader_iter)
        self._queues = [deque() for _ in self.plans]
        self._readers = [None] * len(self.plans)

    def __enter__(self) -> SampleStream:
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
            **({"in_order": True} if self.in_order else {}),  # absent from states saved before it existed
        }
