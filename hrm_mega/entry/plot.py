"""`hrm-mega plot RUN_DIR [--out FILE.png]`: a run's curves against step, from its metrics.jsonl.

One panel per quantity a run logs: loss, learning rate, gradient norm, accuracy (training and each
evaluation mode), ACT segments or LM cycles, and reward for RL runs. Panels with nothing logged are left
out, so the same command draws puzzle, LM and RL runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from hrm_mega.entry.common import run_main

# (title, which metric names it draws); a metric lands in the first panel that takes it.
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k in ("loss", "ce") or k.endswith("/loss")),
    ("learning rate", lambda k: k == "lr"),
    ("gradient norm", lambda k: k == "grad_norm"),
    ("accuracy", lambda k: k.endswith("exact_accuracy") or k.endswith("token_accuracy")),
    ("ACT segments / cycles", lambda k: k.split("/")[-1] in ("mean_segments", "cycles", "mean_cycles")),
    ("reward", lambda k: k == "reward_mean" or k.startswith("reward/")),
)


class PlotError(ValueError):
    pass


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric of the run as (step, value) pairs, in the order logged."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        what = "holds no metrics.jsonl" if run_dir.is_dir() else "no such file or directory"
        raise PlotError(f"{run_dir}: {what} (give a run directory, i.e. log.out_dir, or its metrics.jsonl)")
    series: dict[str, list[tuple[int, float]]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a running job's line being written
                break
            raise PlotError(f"{path}:{number}: not a JSON record") from None
        step = record.get("step")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_run(run_dir: Path, out: Path) -> Path:
    """Draws the run's panels into `out` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    panels: list[tuple[str, list[str]]] = []
    taken: set[str] = set()
    for title, takes in PANELS:
        keys = sorted(k for k in series if takes(k) and k not in taken)
        taken.update(keys)
        if keys:
            panels.append((title, keys))
    if not panels:
        raise PlotError(f"{run_dir}: metrics.jsonl holds none of loss, lr, grad_norm, accuracy, segments")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, "o-" if len(steps) < 20 else "-", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm-mega plot", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run directory (log.out_dir) or its metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/metrics.png)")
    return p


def run(args: argparse.Namespace) -> int:
    run_dir = args.run if args.run.is_dir() else args.run.parent
    out = plot_run(args.run, args.out or run_dir / "metrics.png")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("plot", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
