"""Maze shards: generated mazes with a unique shortest S->G path, or an import of HRM-style maze CSVs.

Token layout (HRM's): 0 PAD, then the characters `# SGo` as 1-5 (wall, open, start, goal, path);
seq_len size*size (900 for the default 30x30), vocab 6, one puzzle identifier (puzzle_id 0). Inputs show
the maze with S and G; labels also mark the cells strictly between S and G on the shortest path with 'o'.

Generation: a randomized depth-first search carves a perfect maze (one route between any two cells) on
the lattice of even coordinates; then a `--loop-fraction` of the remaining inner walls is knocked out so
there are several routes. S is drawn among open cells and G among the cells whose shortest path from S
is unique and at least `--min-path-len` moves long (redrawing S, then the maze, when there is none).

The train split is written in a seeded random order (common.write_order); test keeps index order.

    python -m hrm_mega.prep maze --out data/maze --train 1000 --test 200 --min-path-len 110 --aug
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.augment import dihedral_transform
from hrm_mega.prep.common import (
    SPLITS,
    DataPrepError,
    Sample,
    add_common_arguments,
    add_csv_arguments,
    add_split_counts,
    csv_rows,
    fraction,
    generate_splits,
    item_rng,
    non_negative_int,
    positive_int,
    read_csv_splits,
    write_dataset,
)

TASK = "maze"
BUILDER_VERSION = "1"
CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5  # token ids: 1 + index in CHARSET
VOCAB_SIZE = len(CHARSET) + 1
_S_TRIES = 20  # start cells tried per maze before carving a new maze


@dataclass(frozen=True)
class Spec:
    seed: int
    size: int
    loop_fraction: float
    min_path_len: int
    max_attempts: int
    aug: bool


class GenerationError(ValueError):
    """No maze met the path-length filter within the attempt budget."""


def carve(size: int, loop_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[size, size] bool grid, True = wall: a DFS maze on even coordinates plus random extra openings."""
    wall = np.ones((size, size), dtype=bool)
    n = (size + 1) // 2  # lattice cells per side, at coordinates 0, 2, 4, ...
    visited = np.zeros((n, n), dtype=bool)
    start = (int(rng.integers(n)), int(rng.integers(n)))
    visited[start] = True
    wall[2 * start[0], 2 * start[1]] = False
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr, c + dc]
        ]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        visited[nr, nc] = True
        wall[2 * nr, 2 * nc] = False
        wall[r + nr, c + nc] = False  # the wall cell between the two lattice cells
        stack.append((nr, nc))
    # Inner walls that separate two lattice cells (odd coordinate in exactly one axis) can be opened.
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    between = wall & ((rr % 2) != (cc % 2))
    between &= np.where(rr % 2 == 1, rr + 1 < size, cc + 1 < size)
    candidates = np.flatnonzero(between)
    opened = candidates[rng.random(len(candidates)) < loop_fraction]
    wall.reshape(-1)[opened] = False
    return wall


def bfs(wall: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances from `start` (-1 = unreachable) and shortest-path counts capped at 2, over flat cells."""
    size = wall.shape[0]
    free = ~wall.reshape(-1)
    dist = np.full(size * size, -1, dtype=np.int64)
    count = np.zeros(size * size, dtype=np.int64)
    dist[start], count[start] = 0, 1
    queue = deque([start])
    while queue:
        i = queue.popleft()
        r, c = divmod(i, size)
        for j in (i - size if r else -1, i + size if r + 1 < size else -1, i - 1 if c else -1,
                  i + 1 if c + 1 < size else -1):  # fmt: skip
            if j < 0 or not free[j]:
                continue
            if dist[j] < 0:
                dist[j] = dist[i] + 1
                queue.append(j)
            if dist[j] == dist[i] + 1:
                count[j] = min(2, count[j] + count[i])
    return dist, count


def shortest_path(wall: np.ndarray, start: int, goal: int, dist: np.ndarray) -> list[int]:
    """Cells strictly between start and goal on the (unique) shortest path, walking back from goal."""
    size = wall.shape[0]
    path, i = [], goal
    while dist[i] > 1:
        r, c = divmod(i, size)
        neighbours = [i - size if r else -1, i + size if r + 1 < size else -1, i - 1 if c else -1]
        neighbours.append(i + 1 if c + 1 < size else -1)
        i = next(j for j in neighbours if j >= 0 and dist[j] == dist[i] - 1)
        path.append(i)
    return path[::-1]


def generate(spec: Spec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs, labels, path_len) of one maze meeting the spec, all draws from `rng`."""
    for _ in range(spec.max_attempts):
        wall = carve(spec.size, spec.loop_fraction, rng)
        open_cells = np.flatnonzero(~wall.reshape(-1))
        for _ in range(_S_TRIES):
            start = int(open_cells[rng.integers(len(open_cells))])
            dist, count = bfs(wall, start)
            goals = np.flatnonzero((dist >= max(1, spec.min_path_len)) & (count == 1))
            if len(goals) == 0:
                continue
            goal = int(goals[rng.integers(len(goals))])
            inputs = np.where(wall.reshape(-1), WALL, OPEN).astype(np.int16)
            inputs[start], inputs[goal] = START, GOAL
            labels = inputs.copy()
            labels[shortest_path(wall, start, goal, dist)] = PATH
            return inputs, labels, int(dist[goal])
    raise GenerationError(
        f"no {spec.size}x{spec.size} maze with a unique shortest path of >= {spec.min_path_len} moves after "
        f"{spec.max_attempts} mazes; lower --min-path-len or --loop-fraction"
    )


def generate_job(job: tuple[Spec, str, int]) -> Sample:
    """Generated maze `index` of `split` as (inputs, labels, meta)."""
    spec, split, index = job
    try:
        inputs, labels, path_len = generate(spec, item_rng(spec.seed, split, index))
    except GenerationError as e:
        raise DataPrepError(f"{split} maze {index}: {e}") from None
    return inputs, labels, {"puzzle_id": 0, "group_id": index, "path_len": path_len}


def dihedral_copy(
    size: int, split: str, index: int, tid: int, inputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Copy `tid` of a maze: its dihedral image number `tid` (with --aug, the 7 others per train maze)."""
    inputs = dihedral_transform(inputs.reshape(size, size), tid).reshape(-1)
    return inputs, dihedral_transform(labels.reshape(size, size), tid).reshape(-1)


# ---- CSV import ---------------------------------------------------------------------------------------


def _tokens(text: str, path: Path, line: int, field: str, size: int, allowed: str) -> np.ndarray:
    if len(text) != size * size:
        raise DataPrepError(
            f"{path}:{line}: {field} has {len(text)} characters, expected {size * size} (--size {size})"
        )
    bad = set(text) - set(allowed)
    if bad:
        raise DataPrepError(
            f"{path}:{line}: {field} has character(s) {sorted(bad)}, expected only {allowed!r}"
        )
    return np.array([CHARSET.index(ch) + 1 for ch in text], dtype=np.int16)


def read_csv(path: Path, size: int) -> list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Rows of a `source,question,answer,rating` maze CSV as (inputs, labels, meta)."""
    rows = []
    for line, (source, question, answer, rating) in csv_rows(path):
        inputs = _tokens(question, path, line, "question", size, CHARSET[:4])
        labels = _tokens(answer, path, line, "answer", size, CHARSET)
        if (inputs == START).sum() != 1 or (inputs == GOAL).sum() != 1:
            raise DataPrepError(f"{path}:{line}: question needs exactly one 'S' and one 'G'")
        if ((labels != inputs) & ~((labels == PATH) & (inputs == OPEN))).any():
            raise DataPrepError(f"{path}:{line}: answer differs from question other than ' ' -> 'o'")
        meta = {"path_len": int((labels == PATH).sum()) + 1, "rating": rating, "source": source}
        rows.append((inputs, labels, meta))
    return rows


# ---- the builder ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("maze", help="shortest-path mazes (generated, or from an HRM maze CSV)")
    add_common_arguments(p)
    add_split_counts(p, "mazes")
    p.add_argument("--size", type=positive_int, default=30, help="grid side (default 30 -> seq_len 900)")
    p.add_argument("--aug", action="store_true", help="add the 7 other dihedral images of each train maze")
    g = p.add_argument_group("generation")
    g.add_argument("--min-path-len", type=non_negative_int, default=0, help="fewest moves from S to G")
    g.add_argument("--loop-fraction", type=fraction, default=0.05, help="share of inner walls knocked out")
    g.add_argument("--max-attempts", type=positive_int, default=1000, help="mazes tried per sample")
    add_csv_arguments(p, "mazes", "strings over '# SGo'")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    if args.size < 2:
        raise DataPrepError(f"--size {args.size}: a maze needs at least 2x2 cells")
    spec = Spec(args.seed, args.size, args.loop_fraction, args.min_path_len, args.max_attempts, args.aug)
    extra: dict[str, Any] = {"size": args.size, "aug": args.aug}
    if args.from_csv is None:
        if args.test_csv is not None:
            raise DataPrepError("--test-csv: needs --from-csv")
        mazes = generate_splits(generate_job, spec, args, "maze", SPLITS)
        extra.update(source="generated", min_path_len=args.min_path_len, loop_fraction=args.loop_fraction)
    else:
        mazes = {}
        for split, (table, picked) in read_csv_splits(args, lambda path: read_csv(path, args.size)).items():
            rows = [table[r] for r in picked]
            mazes[split] = [(i, l, {"puzzle_id": 0, "group_id": k, **m}) for k, (i, l, m) in enumerate(rows)]
        extra.update(
            source="csv", train_csv=str(args.from_csv), test_csv=args.test_csv and str(args.test_csv)
        )
    extra["stats"] = {
        split: {
            "mazes": len(mazes[split]),
            "mean_path_len": float(np.mean([m["path_len"] for _, _, m in mazes[split]]))
            if mazes[split]
            else None,
        }
        for split in SPLITS
    }

    return write_dataset(
        args,
        command,
        mazes,
        8 if args.aug else 1,
        partial(dihedral_copy, args.size),
        task=TASK,
        builder_version=BUILDER_VERSION,
        vocab_size=VOCAB_SIZE,
        seq_len=args.size * args.size,
        extra=extra,
    )
