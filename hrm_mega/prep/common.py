"""Plumbing shared by the shard builders: errors, per-item seeding, ordered parallel maps, dataset writing.

Determinism rule: every random draw for item `i` of a split comes from its own generator, seeded by
(seed, split id, i); workers hand items back in index order; samples are then written in an order that
depends only on the seed (write_order). So the bytes on disk do not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from hrm_mega.data.shards import (
    SHARD_PATTERN,
    ShardInfo,
    ShardWriter,
    split_shards,
    verify_shards,
    write_manifest,
)

SPLITS = ("train", "test")
SPLIT_IDS = {"train": 0, "test": 1}
DEFAULT_SAMPLES_PER_SHARD = 10_000
_SHUFFLE = 10  # dataset_rng purpose of the train write order

Sample = tuple[np.ndarray, np.ndarray, dict[str, Any]]  # (inputs, labels, meta)
Job = TypeVar("Job")
Result = TypeVar("Result")


class DataPrepError(ValueError):
    """Bad input to a builder; the message is one actionable line naming the file or option."""


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by (seed, *keys) alone: PCG64 seeded by SeedSequence([seed, *keys])."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *keys])))


def item_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for item `index` of `split`. Stream 0 makes the item; other streams (e.g.
    augmentation copy k) are independent of it, so adding augmentations never changes the base items."""
    return keyed_rng(seed, SPLIT_IDS[split], index, *([stream] if stream else []))


def dataset_rng(seed: int, purpose: int) -> np.random.Generator:
    """A generator for dataset-level choices (subsampling, split assignment), apart from item streams."""
    return keyed_rng(seed, 1000 + purpose)


_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: splitmix64's increment


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64 that scatters every input bit over the output)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_hash(seed: int, purpose: int, indices: np.ndarray) -> np.ndarray:
    """A uniform float64 in [0, 1) per index, determined by (seed, purpose, index) alone.

    For per-item decisions over streams too long for a generator per item (keyed_rng costs ~15 us): one
    vectorised splitmix64 pass, so a chunk of a million indices takes milliseconds, and the value of an
    index does not depend on how the stream was chunked.
    """
    key = _mix64(np.array([(seed * _GOLDEN + purpose) % 2**64], dtype=np.uint64))
    x = _mix64(key + (np.asarray(indices, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def write_order(seed: int, split: str, count: int) -> np.ndarray:
    """The order in which a split's `count` samples (numbered item-major) are written.

    The train split is written in a seeded random order: the streaming loader shuffles only locally
    (shard order plus windows of samples, see docs/data.md), so a puzzle's augmented copies must not sit
    next to each other on disk. The test split keeps index order.
    """
    if split == "train":
        return dataset_rng(seed, _SHUFFLE).permutation(count)
    return np.arange(count)


def pick_rows(
    seed: int, train_rows: int, test_rows: int | None, test_fraction: float, counts: dict[str, int | None]
) -> dict[str, np.ndarray]:
    """Row indices per split for a file import, each kept in file order.

    Test rows come from the test file when there is one (test_rows not None), else a seeded
    `test_fraction` of the train file's rows is held out. Then `counts[split]` rows (None = all) are
    drawn without replacement, seeded.
    """
    if test_rows is not None:
        rows = {"train": np.arange(train_rows), "test": np.arange(test_rows)}
    else:
        order = dataset_rng(seed, 0).permutation(train_rows)
        n_test = int(round(test_fraction * train_rows))
        rows = {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}
    for split, count in counts.items():
        if count is None:
            continue
        if count > len(rows[split]):
            raise DataPrepError(f"--{split} {count}: only {len(rows[split])} rows are available")
        drawn = dataset_rng(seed, 1 + SPLIT_IDS[split]).choice(rows[split], size=count, replace=False)
        rows[split] = np.sort(drawn)
    return rows


def progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _run_chunk(fn: Callable[[Job], Result], chunk: Sequence[Job]) -> list[Result]:
    return [fn(job) for job in chunk]


def generate_splits(
    job: Callable[[Job], Result], spec: Any, args: Any, name: str, splits: Sequence[str]
) -> dict[str, list[Result]]:
    """Runs `job((spec, split, index))` for every index of every split (counts from --train/--test,
    default 1000/200), in order, on --workers processes."""
    counts = {
        "train": 1000 if args.train is None else args.train,
        "test": 200 if args.test is None else args.test,
    }
    return {
        split: list(
            ordered_map(
                job,
                [(spec, split, i) for i in range(counts[split])],
                args.workers,
                f"{name} {split}",
                args.quiet,
            )
        )
        for split in splits
    }


def ordered_map(
    fn: Callable[[Job], Result], jobs: Sequence[Job], workers: int, desc: str = "", quiet: bool = True
) -> Iterator[Result]:
    """Yields fn(job) for each job in order, computed by `workers` processes (in-process when 1).

    At most a few chunks per worker are in flight, so memory stays bounded when the consumer (the
    shard writer) is slower than the workers. `fn` must be a module-level function. Workers are forked
    where the OS allows (no re-import, as torch's DataLoader does), else spawned.
    """
    bar = progress(len(jobs), desc, quiet)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        size = max(1, min(64, len(jobs) // (workers * 16)))
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(chunks))) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_run_chunk, (fn, chunk)))
                if len(pending) >= 4 * workers:
                    yield from _drain(pending.popleft().get(), bar)
            while pending:
                yield from _drain(pending.popleft().get(), bar)
    finally:
        bar.close()


def bounded_map(
    fn: Callable[[Job], Result],
    jobs: Iterable[Job],
    workers: int,
    *,
    ahead: int = 2,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Result]:
    """Yields fn(job) for each job of a (possibly endless) iterable, in order, computed by `workers`
    processes (in-process when 1, after calling `initializer(*initargs)` here).

    Pool.imap would drain `jobs` as fast as it can into its task queue, so a stream read from a large file
    would end up in memory; here at most `ahead * workers` jobs are taken from `jobs` and not yet yielded.
    Workers are forked where the OS allows, as in ordered_map.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer, initargs) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= ahead * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _drain(results: list[Result], bar: tqdm) -> Iterator[Result]:
    for result in results:
        yield result
        bar.update()


def output_files(out_dir: Path, names: Iterable[str], overwrite: bool) -> dict[str, Path]:
    """The paths of a corpus writer's files in --out (created if missing), refusing to replace files
    already there unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out {out_dir}: exists and is not a directory")
    paths = {name: out_dir / name for name in names}
    existing = [path for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise DataPrepError(
            f"--out {out_dir}: already holds {existing[0].name}; pass --overwrite to replace it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return paths


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses to mix a new build with an old one; with `overwrite`, deletes the old build's files only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out {out_dir}: exists and is not a directory")
    old = [out_dir / "manifest.json"] if (out_dir / "manifest.json").exists() else []
    for split in SPLITS:
        old += sorted((out_dir / split).glob(SHARD_PATTERN.replace("%06d", "*")))
    if old and not overwrite:
        raise DataPrepError(f"--out {out_dir}: already holds a dataset; pass --overwrite to replace it")
    for path in old:
        path.unlink()


class DatasetWriter:
    """Writes the train and test splits of one dataset and then its manifest.

    A sample is (inputs, labels, meta): int token arrays of length seq_len, labels in [0, vocab) or
    -100, and a JSON dict holding at least puzzle_id and group_id. Samples are checked here so that a
    builder bug cannot write a dataset that disagrees with its manifest.
    """

    def __init__(
        self, out_dir: str | Path, vocab_size: int, seq_len: int, samples_per_shard: int, overwrite: bool
    ) -> None:
        self.out_dir = Path(out_dir)
        prepare_out_dir(self.out_dir, overwrite)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.writers = {s: ShardWriter(self.out_dir / s, samples_per_shard) for s in SPLITS}
        self.groups: dict[str, set[int]] = {s: set() for s in SPLITS}

    def write(self, split: str, inputs: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> None:
        inputs, labels = np.asarray(inputs), np.asarray(labels)
        if inputs.shape != (self.seq_len,) or labels.shape != (self.seq_len,):
            raise DataPrepError(f"sample shapes {inputs.shape}/{labels.shape}, expected ({self.seq_len},)")
        if inputs.min() < 0 or inputs.max() >= self.vocab_size:
            raise DataPrepError(f"input token outside [0, {self.vocab_size}) in sample {meta}")
        if ((labels < 0) & (labels != -100)).any() or labels.max() >= self.vocab_size:
            raise DataPrepError(f"label outside [0, {self.vocab_size}) and not -100 in sample {meta}")
        self.groups[split].add(int(meta["group_id"]))
        self.writers[split].write(
            {"inputs": inputs.astype(np.int16), "labels": labels.astype(np.int16), "meta": meta}
        )

    def finish(
        self,
        *,
        task: str,
        builder_version: str,
        seed: int,
        command: str,
        num_puzzle_identifiers: int,
        extra: dict[str, Any],
    ) -> Path:
        """Closes the shards and writes manifest.json last, so a half-built directory has no manifest."""
        shards: dict[str, list[ShardInfo]] = {s: w.close() for s, w in self.writers.items()}
        return write_manifest(
            self.out_dir,
            task=task,
            builder_version=builder_version,
            seed=seed,
            command=command,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            num_puzzle_identifiers=num_puzzle_identifiers,
            splits=shards,
            num_groups={s: len(g) for s, g in self.groups.items()},
            extra=extra,
        )


def write_split(
    writer: DatasetWriter, split: str, samples: Iterable[Sample], total: int, quiet: bool
) -> None:
    bar = progress(total, f"writing {split}", quiet)
    for inputs, labels, meta in samples:
        writer.write(split, inputs, labels, meta)
        bar.update()
    bar.close()


# augment(split, index, copy, inputs, labels) -> copy number `copy` (>= 1) of item `index` of `split`
Augment = Callable[[str, int, int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def copies_in_write_order(
    seed: int, split: str, items: Sequence[Sample], copies: int, augment: Augment
) -> Iterator[Sample]:
    """Every item and its `copies - 1` augmented copies (same meta, plus "aug": the copy number), in
    write_order over the item-major numbering."""
    for position in write_order(seed, split, len(items) * copies).tolist():
        index, copy = divmod(position, copies)
        inputs, labels, meta = items[index]
        if copy:
            inputs, labels = augment(split, index, copy, inputs, labels)
        yield inputs, labels, {**meta, "aug": copy}


def write_dataset(
    args: argparse.Namespace,
    command: str,
    items: dict[str, list[Sample]],
    train_copies: int,
    augment: Augment,
    *,
    task: str,
    builder_version: str,
    vocab_size: int,
    seq_len: int,
    extra: dict[str, Any],
) -> Path:
    """Writes each split's items into --out (train ones with `train_copies - 1` augmented copies each,
    copies_in_write_order), then the manifest of a one-identifier dataset."""
    writer = DatasetWriter(args.out, vocab_size, seq_len, args.samples_per_shard, args.overwrite)
    for split in SPLITS:
        copies = train_copies if split == "train" else 1
        samples = copies_in_write_order(args.seed, split, items[split], copies, augment)
        write_split(writer, split, samples, len(items[split]) * copies, args.quiet)
    return writer.finish(
        task=task,
        builder_version=builder_version,
        seed=args.seed,
        command=command,
        num_puzzle_identifiers=1,
        extra=extra,
    )


# ---- CSV import shared by the builders -------------------------------------------------------------

CSV_HEADER = ("source", "question", "answer", "rating")


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty row of a `source,question,answer,rating` CSV."""
    if not path.is_file():
        raise DataPrepError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
            raise DataPrepError(f"{path}:1: header must be {','.join(CSV_HEADER)}, got {header}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(CSV_HEADER):
                raise DataPrepError(f"{path}:{reader.line_num}: expected 4 fields, got {len(row)}")
            yield reader.line_num, row


Table = TypeVar("Table", bound=Sized)


def read_csv_splits(
    args: argparse.Namespace, read: Callable[[Path], Table]
) -> dict[str, tuple[Table, list[int]]]:
    """Per split, the table read from --from-csv (or --test-csv) and the rows of it to use (pick_rows)."""
    tables = {"train": read(args.from_csv)}
    tables["test"] = tables["train"] if args.test_csv is None else read(args.test_csv)
    picks = pick_rows(
        args.seed,
        len(tables["train"]),
        None if args.test_csv is None else len(tables["test"]),
        args.test_fraction,
        {"train": args.train, "test": args.test},
    )
    return {split: (tables[split], picks[split].tolist()) for split in SPLITS}


# ---- argparse helpers shared by the builders -------------------------------------------------------


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def add_csv_arguments(parser: argparse.ArgumentParser, noun: str, alphabet: str) -> None:
    """--from-csv, --test-csv and --test-fraction, in a group titled with the CSV's header and alphabet."""
    c = parser.add_argument_group(f"CSV import (header {','.join(CSV_HEADER)}; {alphabet})")
    c.add_argument("--from-csv", type=Path, help=f"import {noun} instead of generating them")
    c.add_argument("--test-csv", type=Path, help="test split CSV (default: split off --test-fraction)")
    c.add_argument("--test-fraction", type=fraction, default=0.1, help="test share without --test-csv")


def add_split_counts(parser: argparse.ArgumentParser, noun: str) -> None:
    parser.add_argument("--train", type=non_negative_int, help=f"train {noun} (default 1000; CSV: all rows)")
    parser.add_argument("--test", type=non_negative_int, help=f"test {noun} (default 200; CSV: all rows)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output dataset directory")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    parser.add_argument(
        "--samples-per-shard", type=positive_int, default=DEFAULT_SAMPLES_PER_SHARD, help="samples per tar"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def read_samples(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """All samples of one split as {"key", "inputs", "labels", "meta"}, after checking shard checksums.

    Meant for inspection and tests on small datasets; training streams shards with hrm_mega.data.
    """
    data_dir = Path(data_dir)
    verify_shards(data_dir, split)
    samples: dict[str, dict[str, Any]] = {}
    for path in split_shards(data_dir, split):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field, ext = member.name.split(".")
                payload = tar.extractfile(member).read()  # type: ignore[union-attr]
                value = (
                    np.load(io.BytesIO(payload), allow_pickle=False) if ext == "npy" else json.loads(payload)
                )
                samples.setdefault(key, {"key": key})[field] = value
    return [samples[k] for k in sorted(samples)]
