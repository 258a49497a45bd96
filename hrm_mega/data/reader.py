"""Shard reading: a split's shards as a `ShardSource`, the samples of one partition plan in its order
(`partition_samples`), and one unshuffled pass over a split for fixed-mode evaluation (`iterate_split`).
Samples are whatever `decoder_for(manifest)` makes of a record (puzzle rows or packed text rows); slots,
plans and orders are in partition.py.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from hrm_mega.data.partition import RNG_TRANSFORM, PartitionPlan, Segment, range_segments
from hrm_mega.data.shards import DataFormatError, read_manifest, split_shards

MAX_WARNINGS = 100  # distinct corrupt-data warnings per stream; the counters keep counting after that

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


@dataclass(frozen=True)
class ShardSource:
    """One split's shards plus how to turn records into samples; picklable for DataLoader workers."""

    paths: tuple[str, ...]  # local files, or URLs from data.shard_url (remote.py)
    counts: tuple[int, ...]
    checksums: tuple[str, ...]  # each shard's sha256 from the manifest ("" when it has none)
    digest: str  # identifies the exact shard contents (from the manifest checksums)
    spec: SampleSpec
    decode: Decoder
    seed: int
    fail: bool
    transform: Transform | None = None
    retries: int = 0  # further attempts at a remote shard

    @classmethod
    def open(
        cls, data_dir: str | Path, split: str, *, seed: int, corrupt_policy: str, transform: Transform | None,
        shard_url: str = "", retries: int = 3,
    ) -> ShardSource:  # fmt: skip
        if corrupt_policy not in CORRUPT_POLICIES:
            raise ValueError(f"corrupt_policy={corrupt_policy!r} must be one of {CORRUPT_POLICIES}")
        manifest = read_manifest(data_dir)
        spec = SampleSpec.from_manifest(manifest)
        if transform is not None and spec.kind != "puzzle":
            raise ValueError(
                f"transform: augmentation does not apply to text datasets ({data_dir} has task "
                f"{manifest['task']!r}); set data.augment=false"
            )
        entries = manifest["splits"].get(split, {}).get("shards", [])
        if shard_url:  # the manifest here, the shards wherever the template says
            split_shards(data_dir, split, manifest, check_files=False)
            paths = [shard_url.format(split=split, name=e["name"]) for e in entries]
        else:
            paths = split_shards(data_dir, split, manifest)
        digest = hashlib.sha256("".join(e.get("sha256", "") for e in entries).encode()).hexdigest()[:16]
        return cls(
            paths=tuple(str(p) for p in paths),
            counts=tuple(int(e["num_samples"]) for e in entries),
            checksums=tuple(str(e.get("sha256", "")) for e in entries),
            digest=digest,
            spec=spec,
            decode=decoder_for(manifest),
            seed=seed,
            fail=corrupt_policy == "fail",
            transform=transform,
            retries=retries,
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
            rng = np.random.default_rng([self.seed, RNG_TRANSFORM, epoch, sample["sample_id"]])
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
        path, expected, sha256 = (
            source.paths[seg.shard],
            source.counts[seg.shard],
            source.checksums[seg.shard],
        )
        reading = read_segment(
            path,
            seg.lo,
            seg.hi,
            mask,
            expected=expected,
            fail=source.fail,
            sha256=sha256,
            retries=source.retries,
        )
        for i, item in reading:
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


def warn_skip(skip: Skip, warned: int) -> int:
    """Warns about a skipped record unless MAX_WARNINGS were given already; returns the new count."""
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
    shard_url: str = "",
    read_retries: int = 3,
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
    source = ShardSource.open(
        data_dir, split, seed=0, corrupt_policy=corrupt_policy, transform=None, shard_url=shard_url,
        retries=read_retries,
    )  # fmt: skip
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
                warned = warn_skip(item, warned)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                break
        valid = [True] * len(batch) + [False] * (batch_size - len(batch))
        batch += [pad_sample(source.spec) for _ in range(batch_size - len(batch))]
        yield collate(batch, source.spec, valid=valid)
