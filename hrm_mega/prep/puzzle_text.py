"""Puzzles as text: a built sudoku, maze or ARC dataset written as prompt/answer JSONL for the LM.

    python -m hrm_mega.prep puzzle-text --puzzles data/sudoku --out data/sudoku-text-corpus
    python -m hrm_mega.prep text --input data/sudoku-text-corpus/train.jsonl \
        --test-input data/sudoku-text-corpus/test.jsonl --prompt-field prompt --answer-field answer ...

Each sample of the puzzle dataset becomes one JSON line {"prompt", "answer", "task", "difficulty",
"sample_id"} in DIR/train.jsonl and DIR/test.jsonl (the dataset's train and test splits, in their
order; `--sort difficulty` orders each split from easy to hard, ties in a seeded random order). Grids
are written one row per line, one digit per cell, so that a tokenizer that splits digits (the trained
one does) gives every cell a piece of its own:

    sudoku   0 for a blank, 1-9 the digits            difficulty: blanks
    maze     0 open, 1 wall, 2 start, 3 goal, 4 path  difficulty: path cells
    arc      colours 0-9                              difficulty: output cells

A sudoku prompt is "sudoku:\\n" and the grid, its answer the solved grid (or, with `--answer blanks`,
only the digits of its blanks in reading order, e.g. "472": no copying of the givens); a maze's answer
is the grid with the path marked. An ARC pair cannot be solved without its task's demonstrations, so its prompt
shows up to --demos other train pairs of the same puzzle (task and augmentation) first:
"input:\\n<grid>\\noutput:\\n<grid>\\n" each, then "input:\\n<grid>\\noutput:\\n"; the answer is the
output grid. Prompts end with a newline and answers start on the next line, so the prompt/answer
boundary is a token boundary too.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.augment import ARC_CANVAS, ARC_COLOUR0
from hrm_mega.data.reader import iterate_split
from hrm_mega.data.shards import DataFormatError, read_manifest
from hrm_mega.prep.common import SPLITS, DataPrepError, dataset_rng, non_negative_int, output_files

TASKS = ("sudoku", "maze", "arc")
_SORT_TIES = 30  # dataset_rng purpose: the order of equally difficult puzzles under --sort difficulty


def grid_text(grid: np.ndarray) -> str:
    """Rows of digits, one line each."""
    return "\n".join("".join(str(int(v)) for v in row) for row in grid)


def sudoku_record(inputs: np.ndarray, labels: np.ndarray, answer: str = "grid") -> dict[str, Any]:
    """HRM's sudoku ids (1 blank, 2-10 the digits 1-9) as text: 0 for a blank. answer: "grid" (the
    solved grid) or "blanks" (the blanks' digits in reading order)."""
    puzzle, solution = (inputs - 1).reshape(9, 9), (labels - 1).reshape(9, 9)
    blanks = "".join(str(int(d)) for d in solution[puzzle == 0])
    return {
        "prompt": f"sudoku:\n{grid_text(puzzle)}\n",
        "answer": grid_text(solution) if answer == "grid" else blanks,
        "difficulty": int((puzzle == 0).sum()),
    }


def maze_record(inputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """HRM's maze ids (1-5 for `# SGo`: wall, open, start, goal, path) as text: 0 open, 1 wall, 2 start,
    3 goal, 4 path."""
    digit = np.array([-1, 1, 0, 2, 3, 4])  # id -> digit
    size = int(round(len(inputs) ** 0.5))
    maze, solved = digit[inputs].reshape(size, size), digit[labels].reshape(size, size)
    return {
        "prompt": f"maze:\n{grid_text(maze)}\n",
        "answer": grid_text(solved),
        "difficulty": int((solved == 4).sum()),
    }


def arc_grid(canvas: np.ndarray) -> np.ndarray:
    """The grid of an ARC canvas (0 PAD, 1 EOS, colours from ARC_COLOUR0), wherever it was placed."""
    canvas = np.where(canvas < 0, 0, canvas).reshape(ARC_CANVAS, ARC_CANVAS)
    rows, cols = np.nonzero(canvas >= ARC_COLOUR0)
    if len(rows) == 0:
        raise DataFormatError("an ARC canvas without a grid")
    r0, c0 = rows.min(), cols.min()
    h = int(np.argmin(np.append(canvas[r0:, c0] >= ARC_COLOUR0, False)))
    w = int(np.argmin(np.append(canvas[r0, c0:] >= ARC_COLOUR0, False)))
    return canvas[r0 : r0 + h, c0 : c0 + w] - ARC_COLOUR0


def read_split(data_dir: Path, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """(sample_id, inputs, labels, puzzle_id) of every sample of a split, in its order."""
    for batch in iterate_split(data_dir, split, batch_size=256, corrupt_policy="fail"):
        for i in np.flatnonzero(batch["valid"].numpy()).tolist():
            yield (
                int(batch["sample_id"][i]),
                batch["inputs"][i].numpy(),
                batch["labels"][i].numpy(),
                int(batch["puzzle_identifiers"][i]),
            )


def puzzle_records(
    data_dir: Path, task: str, split: str, demos: int, answer: str = "grid"
) -> list[dict[str, Any]]:
    """The records of one split, in its order."""
    if task != "arc":
        render: Callable[[np.ndarray, np.ndarray], dict[str, Any]] = (
            functools.partial(sudoku_record, answer=answer) if task == "sudoku" else maze_record
        )
        return [
            {**render(inputs, labels), "task": task, "sample_id": sid}
            for sid, inputs, labels, _ in read_split(data_dir, split)
        ]
    shown: dict[int, list[tuple[int, str, str]]] = {}  # puzzle -> its first train pairs, as text
    for sid, inputs, labels, puzzle in read_split(data_dir, "train"):
        if len(shown.setdefault(puzzle, [])) <= demos:  # one more: a pair is never its own demonstration
            shown[puzzle].append((sid, grid_text(arc_grid(inputs)), grid_text(arc_grid(labels))))
    records = []
    for sid, inputs, labels, puzzle in read_split(data_dir, split):
        own = sid if split == "train" else -1
        pairs = [(i, o) for s, i, o in shown.get(puzzle, []) if s != own][:demos]
        answer = arc_grid(labels)
        prompt = "".join(f"input:\n{i}\noutput:\n{o}\n" for i, o in pairs)
        records.append(
            {
                "prompt": f"arc:\n{prompt}input:\n{grid_text(arc_grid(inputs))}\noutput:\n",
                "answer": grid_text(answer),
                "difficulty": int(answer.size),
                "task": task,
                "sample_id": sid,
            }
        )
    return records


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "puzzle-text", help="write a sudoku/maze/ARC dataset as prompt/answer JSONL for `prep text`"
    )
    p.add_argument("--puzzles", type=Path, required=True, metavar="DIR", help="a built puzzle dataset")
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train.jsonl, test.jsonl)")
    p.add_argument("--sort", choices=("none", "difficulty"), default="none",
                   help="order each split by difficulty (easy first), or keep the dataset's order")  # fmt: skip
    p.add_argument("--demos", type=non_negative_int, default=3, help="ARC: demonstrations per prompt")
    p.add_argument("--answer", choices=("grid", "blanks"), default="grid",
                   help="sudoku: the solved grid, or only the digits of the blanks (default grid)")  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0, help="ties under --sort difficulty")
    p.add_argument("--overwrite", action="store_true", help="replace train.jsonl/test.jsonl in --out")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    try:
        manifest = read_manifest(args.puzzles)
    except DataFormatError as exn:
        raise DataPrepError(f"--puzzles {args.puzzles}: {exn}") from None
    task = manifest.get("task")
    if task not in TASKS:
        raise DataPrepError(
            f"--puzzles {args.puzzles}: a {task!r} dataset; expected one of {', '.join(TASKS)}"
        )
    if args.answer != "grid" and task != "sudoku":
        raise DataPrepError(f"--answer {args.answer}: applies to sudoku datasets; --puzzles holds {task}")
    files = output_files(args.out, [f"{split}.jsonl" for split in SPLITS], args.overwrite)
    paths = dict(zip(SPLITS, files.values()))
    records = {split: puzzle_records(args.puzzles, task, split, args.demos, args.answer) for split in SPLITS}
    for split, rows in records.items():
        if args.sort == "difficulty":
            ties = dataset_rng(args.seed, _SORT_TIES + SPLITS.index(split)).permutation(len(rows))
            rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (rows[i]["difficulty"], ties[i]))]
        with paths[split].open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return args.out
