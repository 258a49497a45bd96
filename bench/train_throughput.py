"""Training throughput and MFU for the sudoku recipes, and the trainer's overhead over a bare loop.

For each recipe (tiny and paper-scale hrm_sudoku) and precision (fp32, bf16) it times one optimizer step
(= one ACT segment for every row, with HRM's bootstrap look-ahead) in two ways:
  - bare:    the model, step_segment, backward and AdamATan2 in a plain PyTorch loop;
  - trainer: Trainer.train_step() on the puzzle task: DeepSpeed engine, data refill from shards, sparse sign-SGD.
MFU = executed FLOPs per second / measured matmul peak of this machine (same dtype, same threads).
Executed FLOPs count every segment that runs: the no-grad cycles, the differentiated updates (forward +
2x backward) and the look-ahead forward (hrm_mega.models.summary.segment_flops).

    python bench/train_throughput.py [--steps 3] [--paper-batch 32] [--tiny-batch 64] [--threads 2]

The recipes are read from the checkout whose hrm_mega is imported, so bench/compare_trees.py --same-script
can run this one script against another checkout's code (and that checkout's recipes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hrm_mega  # noqa: E402
from hrm_mega.config import load_config  # noqa: E402
from hrm_mega.data.shards import ShardWriter, write_manifest  # noqa: E402
from hrm_mega.models.act import initial_state, step_segment  # noqa: E402
from hrm_mega.models.puzzle import RecursiveReasoner  # noqa: E402
from hrm_mega.models.summary import segment_flops  # noqa: E402
from hrm_mega.optim import AdamATan2  # noqa: E402

RECIPES = Path(hrm_mega.__file__).resolve().parents[1] / "configs" / "puzzle"


def matmul_peak(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of large square matmuls in this process (the denominator of MFU)."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def make_dataset(root: Path, samples: int = 2048) -> Path:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", samples), ("test", 64)):
        writer = ShardWriter(root / split, samples_per_shard=max(1, n // 8))
        for i in range(n):
            labels = rng.integers(2, 11, 81).astype(np.int16)
            inputs = np.where(rng.random(81) < 0.5, 1, labels).astype(np.int16)
            writer.write({"inputs": inputs, "labels": labels, "meta": {"puzzle_id": 0, "group_id": i}})
        splits[split] = writer.close()
    write_manifest(root, task="sudoku", builder_version="bench", seed=0, command="bench", vocab_size=11,
                   seq_len=81, num_puzzle_identifiers=1, splits=splits)  # fmt: skip
    return root


def time_steps(step, steps: int) -> float:
    """The median seconds of `steps` timed steps: robust to the bursts of other tenants of a shared
    machine, which a mean over a few steps is not."""
    for _ in range(2):  # warm-up: allocations, first calls, and (with --compile) the compilations
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bare_loop(config, dtype: torch.dtype, steps: int) -> float:
    c, b = config.model, config.train.global_batch
    model = RecursiveReasoner(c).init_weights(0).to(dtype)
    if config.train.compile:
        model.compile()
    opt = AdamATan2(model.parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, 11, (b, 81), generator=g),
        "labels": torch.randint(2, 11, (b, 81), generator=g),
        "puzzle_identifiers": torch.zeros(b, dtype=torch.long),
    }
    state = initial_state(model, batch)

    def step():
        nonlocal state
        loss, _, state, _ = step_segment(model, c, state, training=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, steps)


def trainer_loop(config, steps: int) -> float:
    from hrm_mega.training.trainer import build_trainer

    trainer = build_trainer(config, resume="none")
    return time_steps(trainer.train_step, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--paper-batch", type=int, default=32)
    p.add_argument("--tiny-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile=true)")
    p.add_argument("--recipes", default="hrm_sudoku_tiny,hrm_sudoku", help="comma-separated recipe names")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {dtypes[name]: matmul_peak(dtypes[name]) for name in args.precisions.split(",")}
    measured = ", ".join(f"{name} {peaks[dtypes[name]] / 1e9:.1f}" for name in args.precisions.split(","))
    print(f"hrm_mega from {RECIPES.parents[1]}; matmul peak ({args.threads} threads), GFLOP/s: {measured}")
    header = f"{'recipe':<12} {'prec':<5} {'target':<9} {'loop':<8} {'ms/step':>9} {'rows/s':>8} {'tok/s':>8} {'MFU':>6}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data")
        batches = {"hrm_sudoku_tiny": args.tiny_batch, "hrm_sudoku": args.paper_batch}
        for recipe in args.recipes.split(","):
            batch = batches[recipe]
            for precision in args.precisions.split(","):
                dtype = dtypes[precision]
                for target in ("bootstrap", "halt_only"):
                    overrides = [
                        f"train.global_batch={batch}", f"data.path={data}", "data.partitions=8",
                        f"log.out_dir={tmp}/run", "log.wandb=disabled", "log.progress_bar=false",
                        f"train.precision={precision}", f"model.q_target={target}", "train.steps=1000",
                        f"train.compile={str(args.compile).lower()}", *args.set,
                    ]  # fmt: skip
                    config = load_config(RECIPES / f"{recipe}.yaml", overrides)
                    flops = segment_flops(config.model).train_per_segment * batch
                    loops = [("bare", lambda c=config, d=dtype: bare_loop(c, d, args.steps))]
                    if not args.skip_trainer:
                        loops.append(("trainer", lambda c=config: trainer_loop(c, args.steps)))
                    times = {}
                    for name, fn in loops:
                        t = times[name] = fn()
                        mfu = flops / t / peaks[dtype]
                        print(f"{recipe:<12} {precision:<5} {target:<9} {name:<8} {t * 1e3:9.0f} "
                              f"{batch / t:8.1f} {batch * 81 / t:8.0f} {mfu:6.1%}", flush=True)  # fmt: skip
                    if "trainer" in times:
                        print(
                            f"  trainer overhead over bare loop: {times['trainer'] / times['bare'] - 1:+.1%}"
                        )


if __name__ == "__main__":
    main()
