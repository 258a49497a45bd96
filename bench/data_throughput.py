"""Loader throughput: samples/s that SampleStream hands out on sudoku-sized samples (seq_len 81).

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

from hrm_mega.data import SampleStream
from hrm_mega.data.shards import ShardWriter, write_manifest


def build(root: Path, samples: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(root / "train", per_shard)
    for i in range(samples):
        board = rng.integers(1, 10, 81, dtype=np.int16)
        writer.write({"inputs": board, "labels": board, "meta": {"puzzle_id": 0, "group_id": i}})
    write_manifest(root, task="sudoku", builder_version="bench", seed=0, command="bench", vocab_size=11,
                   seq_len=81, num_puzzle_identifiers=1, splits={"train": writer.close()})  # fmt: skip


def rate(stream: SampleStream, halt_fraction: float, seconds: float) -> tuple[float, float]:
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


def generation_rate(tmp: Path, puzzles: int, givens: list[str]) -> float:
    from hrm_mega.prep.cli import main as prep_main

    out = tmp / ("gen-" + "-".join(givens))
    start = time.perf_counter()
    code = prep_main(
        ["sudoku", "--out", str(out), "--train", str(puzzles), "--test", "0", "--quiet", *givens]
    )
    if code != 0:
        raise SystemExit("hrm_mega.prep failed")
    return puzzles / (time.perf_counter() - start)


def training_consumption(steps: int = 5) -> float:
    """Rows per second of full training steps (eager PyTorch, the model and ACT code the trainer runs)."""
    import torch

    from hrm_mega.config import load_config
    from hrm_mega.models.act import initial_state, step_segment
    from hrm_mega.models.puzzle import RecursiveReasoner
    from hrm_mega.optim import AdamATan2

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/puzzle/hrm_sudoku_tiny.yaml")
    c, b = cfg.model, cfg.train.global_batch
    model = RecursiveReasoner(c).init_weights(0)
    opt = AdamATan2(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, 11, (b, 81), generator=g),
        "labels": torch.randint(2, 11, (b, 81), generator=g),
        "puzzle_identifiers": torch.zeros(b, dtype=torch.long),
    }
    state = initial_state(model, batch)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss, _, state, _ = step_segment(model, c, state, training=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return b * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--per-shard", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=384)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--puzzles", type=int, default=400, help="puzzles per generation timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for givens in (["--givens", "50"], ["--min-givens", "22", "--max-givens", "30"]):
            rate_gen = generation_rate(Path(tmp), args.puzzles, givens)
            print(
                f"generation  sudoku {' '.join(givens):<30} {rate_gen:8.1f} puzzles/s (all cores, incl. start-up)"
            )
        consumed = training_consumption()
        print(
            f"training    hrm_sudoku_tiny step                {consumed:8.1f} rows/s (upper bound on samples/s)"
        )
        build(Path(tmp), args.samples, args.per_shard)
        print(f"samples={args.samples} seq_len=81 global_batch={args.batch} partitions={args.partitions} "
              f"shuffle_buffer={args.shuffle_buffer}")  # fmt: skip
        for workers in (0, 2):
            for halt in (1.0, 0.125):
                stream = SampleStream(tmp, seed=0, global_batch=args.batch, partitions=args.partitions,
                                      num_workers=workers, shuffle_buffer=args.shuffle_buffer)  # fmt: skip
                value, cpu = rate(stream, halt, args.seconds)
                stream.close()
                pattern = "full batches" if halt >= 1 else f"refill {halt:.1%} of rows/step"
                print(
                    f"loader      num_workers={workers}  {pattern:<26} {value:8.0f} samples/s  "
                    f"{cpu:6.1f} us CPU/sample in main  ({value / consumed:.0f}x training)"
                )


if __name__ == "__main__":
    main()
