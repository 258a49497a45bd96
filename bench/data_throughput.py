"""Loader throughput: samples/s that PuzzleStream hands out on sudoku-sized samples (seq_len 81).

Builds a synthetic dataset in a temp dir, then times full-batch takes (the first batch of every ACT run)
and ACT-like refills (a random fraction of rows halts each step), with 0 and 2 workers.

    python bench/data_loader_rate.py [--samples 65536] [--batch 384] [--partitions 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from hrm_mega.data import PuzzleStream
from hrm_mega.data.shards import ShardWriter, write_manifest


def build(root: Path, samples: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(root / "train", per_shard)
    for i in range(samples):
        board = rng.integers(1, 10, 81, dtype=np.int16)
        writer.write({"inputs": board, "labels": board, "meta": {"puzzle_id": 0, "group_id": i}})
    write_manifest(root, task="sudoku", builder_version="bench", seed=0, command="bench", vocab_size=11,
                   seq_len=81, num_puzzle_identifiers=1, splits={"train": writer.close()})  # fmt: skip


def rate(stream: PuzzleStream, halt_fraction: float, seconds: float) -> tuple[float, float]:
    """(samples/s handed out, main-process CPU us per sample), after a warm-up that starts the workers
    and fills the first shuffle windows. CPU time is the steadier figure on a shared machine."""
    rng = np.random.default_rng(0)
    stream.first_batch()
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        if halt_fraction >= 1:
            rows = range(stream.local_batch)
        else:
            rows = np.flatnonzero(rng.random(stream.local_batch) < halt_fraction).tolist()
        count += len(stream.take(rows)["rows"])
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--per-shard", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=384)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.samples, args.per_shard)
        print(f"samples={args.samples} seq_len=81 global_batch={args.batch} partitions={args.partitions} "
              f"shuffle_buffer={args.shuffle_buffer}")  # fmt: skip
        for workers in (0, 2):
            for halt in (1.0, 0.125):
                stream = PuzzleStream(tmp, seed=0, global_batch=args.batch, partitions=args.partitions,
                                      num_workers=workers, shuffle_buffer=args.shuffle_buffer)  # fmt: skip
                value, cpu = rate(stream, halt, args.seconds)
                stream.close()
                pattern = "full batches" if halt >= 1 else f"refill {halt:.1%} of rows/step"
                print(
                    f"num_workers={workers}  {pattern:<26} {value:8.0f} samples/s  {cpu:6.1f} us CPU/sample in main"
                )


if __name__ == "__main__":
    main()
