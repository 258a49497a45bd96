"""Throughput of this checkout against another one (e.g. the previous main), alternated in one run.

The machine is shared and noisy, so the two trees take turns: each round runs a bench script once in the
other tree, then once here (the order flips every round), each in its own process with its own tree on
PYTHONPATH. Every timed row of the bench's table (a row label and its ms/step) is paired across the two
trees; the figure per row is the geometric mean over rounds of old ms / new ms (> 1: this checkout is
faster), and the last line is the geometric mean over all rows.

    git worktree add /tmp/old-main <rev>
    python bench/compare_trees.py --old /tmp/old-main --rounds 4 -- \\
        bench/train_throughput.py --recipes hrm_sudoku_tiny --steps 5
    python bench/compare_trees.py --old /tmp/old-main --rounds 4 -- bench/lm_throughput.py --sections train,decode

--same-script runs this checkout's bench script in both trees (each tree's hrm_mega on PYTHONPATH), so
that the harness is identical and only the library code differs (the script must run on both).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_rows(output: str, script: str) -> dict[str, float]:
    """Row label -> ms/step, from the table a bench script prints."""
    rows: dict[str, float] = {}
    for line in output.splitlines():
        words = line.split()
        if script.endswith("train_throughput.py") and len(words) == 8 and words[3] in ("bare", "trainer"):
            rows[" ".join(words[:4])] = float(words[4])  # recipe prec target loop | ms/step
        elif script.endswith("lm_throughput.py") and words and re.fullmatch(r"\d+", words[0]):
            if len(words) == 6 and "%" in words[5]:  # train: N layers/token ms/step tok/s GFLOP MFU
                rows[f"train N={words[0]}"] = float(words[2])
            elif len(words) >= 7 and words[2] in (
                "yes",
                "no",
            ):  # decode: batch cycles cache tokens pre ms/step
                rows[f"decode b={words[0]} N={words[1]} cache={words[2]}"] = float(words[5])
    return rows


def run(tree: Path, command: list[str], threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, *command], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{tree}: {' '.join(command)} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    rows = timed_rows(out.stdout, command[0])
    if not rows:
        sys.exit(f"{tree}: no timed rows in the output of {' '.join(command)}:\n{out.stdout[-2000:]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the other checkout (e.g. a worktree of main)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--same-script", action="store_true", help="run this checkout's bench script in both")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- bench/<script>.py [its arguments]")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.same_script:
        command = [str(ROOT / command[0]), *command[1:]]
    ratios: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        order = [("old", args.old.resolve()), ("new", ROOT)]
        measured = dict(
            (name, run(tree, command, args.threads)) for name, tree in order[:: 1 if r % 2 == 0 else -1]
        )
        for row, new_ms in measured["new"].items():
            if row in measured["old"]:
                ratios[row].append(measured["old"][row] / new_ms)
        print(f"round {r + 1}: " + "  ".join(f"{k}: {v[-1]:.3f}" for k, v in ratios.items()), flush=True)
    print(
        f"\n{' '.join(command)}: new/old throughput (old ms / new ms), geometric mean of {args.rounds} rounds"
    )
    means = {row: math.exp(sum(map(math.log, v)) / len(v)) for row, v in ratios.items()}
    for row, mean in means.items():
        print(f"  {row:<40} {mean:.3f}  (rounds: {' '.join(f'{x:.3f}' for x in ratios[row])})")
    overall = math.exp(sum(map(math.log, means.values())) / len(means))
    print(f"  {'all rows':<40} {overall:.3f}")


if __name__ == "__main__":
    main()
