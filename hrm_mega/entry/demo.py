"""`make demo`: build a sudoku shard set, train a tiny HRM on the CPU, evaluate, print a results table.

Every stage is the real one: hrm_mega.prep writes WebDataset shards, hrm_mega.entry.pretrain trains on
DeepSpeed, and the evaluation is the same code as `hrm-mega eval`. Re-running reuses the dataset and starts a fresh
run (pass --resume auto to continue one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from hrm_mega.entry.common import build_dataset, demo_config, run_main
from hrm_mega.resources import recipe

RECIPE = recipe("puzzle/hrm_sudoku_demo.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.demo", description=__doc__)
    p.add_argument("--data", default="data/sudoku-demo", help="dataset directory (built if missing)")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--resume", default="none", help="none (fresh run), auto, or a checkpoint path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def run(args: argparse.Namespace) -> int:
    config = demo_config(RECIPE, args)
    data = Path(args.data)
    t0 = time.perf_counter()
    if not build_dataset(
        data, [["sudoku", "--out", str(data), "--quiet", *DATASET_ARGS]], f"[demo] building {data}: "
    ):
        return 2
    t_data = time.perf_counter() - t0

    if args.resume == "none":
        shutil.rmtree(args.out, ignore_errors=True)
    from hrm_mega.training.tasks.puzzle import evaluate_puzzles
    from hrm_mega.training.trainer import build_trainer

    print(f"[demo] training {RECIPE.name} for {config.train.steps} steps on the CPU", flush=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume=args.resume)
    results = trainer.train()
    t_train = time.perf_counter() - t1

    one_segment = dataclasses.replace(config, model=dataclasses.replace(config.model, halt_max_steps=1))
    baseline = evaluate_puzzles(trainer.model, one_segment, trainer.world, "fixed", ema=trainer.ema)
    rows = [
        ("fixed (all rows run halt_max_steps)", _pick(results, "eval_fixed/")),
        ("adaptive (per-row Q halting)", _pick(results, "eval_adaptive/")),
        ("baseline: a single segment", baseline),
    ]
    print_table(rows, config, t_data, t_train)
    (Path(args.out) / "demo_results.json").write_text(json.dumps({name: m for name, m in rows}, indent=2))
    return 0


# 56 givens (25 blanks per puzzle): hard enough that extra ACT segments pay off, easy enough for a tiny
# model to learn within the time budget (README.md has the measured figures).
DATASET_ARGS = [
    "--train",
    "4000",
    "--test",
    "500",
    "--givens",
    "56",
    "--samples-per-shard",
    "500",
    "--seed",
    "0",
]


def _pick(results: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


def print_table(rows, config, t_data: float, t_train: float) -> None:
    print()
    print(f"Sudoku, {DATASET_ARGS[DATASET_ARGS.index('--givens') + 1]} givens, held-out test split")
    print(f"{'evaluation':<38} {'exact acc':>9} {'token acc':>9} {'segments':>9} {'samples':>8}")
    for name, m in rows:
        print(
            f"{name:<38} {m['exact_accuracy']:>9.1%} {m['token_accuracy']:>9.1%} "
            f"{m['mean_segments']:>9.2f} {m['samples']:>8d}"
        )
    print(
        f"data build {t_data:.0f} s, training {t_train:.0f} s ({config.train.steps} steps, CPU)", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    return run_main("demo", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
