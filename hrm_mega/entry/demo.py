"""`make demo`: build a sudoku shard set, train a tiny HRM on the CPU, evaluate, print a results table.

Every stage is the real one: hrm_mega.prep writes WebDataset shards, hrm_mega.entry.pretrain trains on
DeepSpeed, and the evaluation is the same code as `hrm-mega eval`. Re-running reuses the dataset and starts a fresh
run (pass --resume auto to continue one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hrm_mega.entry.common import build_dataset, demo_config, run_main
from hrm_mega.entry.plot import plot_run
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
    from hrm_mega.training.trainer import build_trainer

    print(f"[demo] training {RECIPE.name} for {config.train.steps} steps on the CPU", flush=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume=args.resume)
    results = trainer.train()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    table = halting_table(trainer, THRESHOLDS)
    t_eval = time.perf_counter() - t2
    adaptive = _pick(results, "eval_adaptive/")
    rows = [*table, (f"adaptive run, model.halt_threshold={config.model.halt_threshold:g}", adaptive)]
    print_table(rows, config)
    fixed = table[config.model.halt_max_steps - 1][1]
    print(bar_line(fixed, adaptive))
    print(f"data build {t_data:.0f} s, training {t_train:.0f} s ({config.train.steps} steps, CPU, with its "
          f"final evaluation), table {t_eval:.0f} s: {t_data + t_train + t_eval:.0f} s", flush=True)  # fmt: skip
    out = Path(args.out)
    (out / "demo_results.json").write_text(json.dumps({name: m for name, m in rows}, indent=2))
    figure = plot_accuracy_against_segments(table, out / "accuracy_vs_segments.png")
    print(f"figures: {figure}, {plot_run(out, out / 'metrics.png')} (training curves)")
    return 0


# Adaptive rows of the table: halt once sigmoid(q_halt) exceeds the threshold (0: the q_target's rule).
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def halting_table(trainer, thresholds) -> list[tuple[str, dict[str, float]]]:
    """Exact accuracy against segments on the eval split, from one pass of every row through all
    segments (inference.puzzle.run_trajectories): fixed at 1..halt_max_steps, adaptive at `thresholds`."""
    from hrm_mega.distributed import all_reduce
    from hrm_mega.inference.puzzle import metrics_from_sums, run_trajectories
    from hrm_mega.training.evaluation import evaluation

    c = trainer.config
    with evaluation(trainer.model, c, trainer.world, trainer.ema) as batches:
        traj = run_trajectories(trainer.model, c.model, batches)
    rows = [
        (f"fixed, {k} segment{'s' * (k > 1)}", traj.fixed(k)) for k in range(1, c.model.halt_max_steps + 1)
    ]
    rows += [
        (f"adaptive, threshold {t:g}" if t else f"adaptive, the {c.model.q_target} rule", traj.adaptive(t))
        for t in thresholds
    ]
    return [(name, metrics_from_sums(all_reduce(sums))) for name, sums in rows]


def bar_line(fixed: dict[str, float], adaptive: dict[str, float]) -> str:
    """The halting bar: adaptive exact accuracy within 1 point of fixed, at most 60% of its segments."""
    gap = fixed["exact_accuracy"] - adaptive["exact_accuracy"]
    share = adaptive["mean_segments"] / fixed["mean_segments"]
    met = gap <= 0.01 and share <= 0.6
    return (
        f"halting bar ({'met' if met else 'NOT met'}): adaptive is {gap * 100:+.1f} points below fixed "
        f"(at most 1) with {share:.0%} of its segments (at most 60%)"
    )


def plot_accuracy_against_segments(table, path: Path) -> Path:
    """Exact accuracy against mean segments: the fixed depths joined by a line, the adaptive thresholds
    as labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [m for name, m in table if name.startswith("fixed")]
    adaptive = [(name, m) for name, m in table if name.startswith("adaptive")]
    ax.plot(
        [m["mean_segments"] for m in fixed], [100 * m["exact_accuracy"] for m in fixed], "o-", label="fixed"
    )
    ax.plot([m["mean_segments"] for _, m in adaptive], [100 * m["exact_accuracy"] for _, m in adaptive], "s",
            label="adaptive")  # fmt: skip
    points: dict[tuple[float, float], list[str]] = {}  # thresholds that land on the same point share a label
    for name, m in adaptive:
        label = name.split(", ")[1].removeprefix("threshold ").removeprefix("the ")
        points.setdefault((m["mean_segments"], 100 * m["exact_accuracy"]), []).append(label)
    for xy, labels in points.items():
        ax.annotate(", ".join(labels), xy, fontsize=7, textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("mean ACT segments per puzzle (adaptive points: halting thresholds)")
    ax.set_ylabel("exact accuracy (%)")
    ax.set_title("make demo: accuracy against compute (held-out split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def print_table(rows, config) -> None:
    print()
    print(f"Sudoku, {DATASET_ARGS[DATASET_ARGS.index('--givens') + 1]} givens, held-out test split")
    print(f"{'evaluation':<42} {'exact acc':>9} {'token acc':>9} {'segments':>9} {'samples':>8}")
    for name, m in rows:
        print(
            f"{name:<42} {m['exact_accuracy']:>9.1%} {m['token_accuracy']:>9.1%} "
            f"{m['mean_segments']:>9.2f} {m['samples']:>8d}"
        )


def main(argv: list[str] | None = None) -> int:
    return run_main("demo", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
