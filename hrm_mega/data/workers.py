"""Loader worker processes for `SampleStream`: DataLoader workers that read partitions ahead of the main
process, as far as its shared `demand` counters ask.

Protocol. The main process writes, per local partition j, the slot up to which it wants items into
`demand[j]` (shared memory). Worker w serves the fixed partitions `owners[w]` and answers each request
with one message:
- ("items", j, first_slot, [sample or Skip, ...]) for the partition furthest below its target;
- ("idle",) now and then while every target is met, so that shutdown and parent-death checks still run;
- ("error", exception class name, one-line message), after which it stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hrm_mega.data.partition import PartitionPlan
from hrm_mega.data.reader import ShardSource, partition_samples
from hrm_mega.data.shards import DataFormatError

_POLL_SECONDS, _IDLE_POLLS = 0.002, 100  # a worker with nothing wanted checks every 2 ms, idles after 0.2 s


class PartitionWorkers(IterableDataset):
    """Runs in the DataLoader workers and yields the messages of the protocol above."""

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
            msg = str(exn) if isinstance(exn, DataFormatError) else one_line(exn)
            yield ("error", type(exn).__name__, msg)


def start_workers(
    source: ShardSource,
    plans: list[PartitionPlan],
    starts: list[int],
    demand: torch.Tensor,
    *,
    num_workers: int,
    chunk: int,
    depth: int,
    loop: bool,
) -> Iterator[tuple]:
    """Starts `num_workers` processes reading `plans` from absolute slots `starts` on; returns the
    long-lived iterator of their messages (stop it with stop_workers)."""
    owners = [list(range(w, len(plans), num_workers)) for w in range(num_workers)]
    workers = PartitionWorkers(source, plans, starts, demand, owners, chunk, loop)
    # Enough requests in flight for every partition to be read ahead `depth` slots while the model
    # computes. in_order=False: a worker waiting for demand must not hold up the others' results
    # (each partition still arrives in order: one worker makes it, and its results stay in order).
    per_worker = -(-len(plans) // num_workers)
    prefetch_factor = per_worker * -(-depth // chunk) + 1
    loader = DataLoader(
        workers,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_keep,
        prefetch_factor=prefetch_factor,
        in_order=False,
        worker_init_fn=_ignore_stop_signals,
    )
    return iter(loader)


def stop_workers(messages: Iterator[tuple] | None) -> None:
    """Shuts down the processes behind an iterator from start_workers (None: nothing to stop)."""
    if messages is not None and hasattr(messages, "_shutdown_workers"):
        messages._shutdown_workers()


def one_line(exn: BaseException) -> str:
    """An exception as one line; for a DataLoader re-raise, the worker's own error."""
    lines = [line for line in str(exn).strip().splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if "Original Traceback" in str(exn):  # DataLoader re-raise: the last line is the worker's own error
        return lines[-1].strip()
    return f"{type(exn).__name__}: {lines[0].strip()}"


def _ignore_stop_signals(_: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process: launchers signal the whole process
    group, and the trainer must outlive the signal long enough to write its checkpoint."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _keep(item: Any) -> Any:  # DataLoader collate_fn: pass items through (numpy pickles cheaper than tensors)
    return item
