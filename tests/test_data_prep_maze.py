"""Maze builder: labels are the unique shortest path (independent BFS here), determinism, aug, CSV."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from hrm_mega.data.augment import dihedral_transform
from hrm_mega.data.shards import read_manifest
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples

WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
CHARS = "?# SGo"  # token -> character


def build(tmp_path, name: str, *args: str):
    out = tmp_path / name
    assert main(["maze", "--out", str(out), "--quiet", *args]) == 0
    return out, read_manifest(out)


def neighbours(cell: tuple[int, int], n: int):
    r, c = cell
    for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        if 0 <= r + dr < n and 0 <= c + dc < n:
            yield r + dr, c + dc


def distances_and_counts(grid: np.ndarray, source: tuple[int, int]) -> tuple[dict, dict]:
    """Plain BFS over non-wall cells of a 2-D grid, with the number of shortest paths to each cell."""
    n = grid.shape[0]
    dist, ways = {source: 0}, {source: 1}
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        for nxt in neighbours(cell, n):
            if grid[nxt] == WALL:
                continue
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                ways[nxt] = 0
                queue.append(nxt)
            if dist[nxt] == dist[cell] + 1:
                ways[nxt] += ways[cell]
    return dist, ways


def check_maze(inputs: np.ndarray, labels: np.ndarray, size: int) -> int:
    """Asserts that labels mark the unique shortest S->G path of inputs; returns its length in moves."""
    grid, lab = inputs.reshape(size, size), labels.reshape(size, size)
    assert set(np.unique(grid)) <= {WALL, OPEN, START, GOAL}
    assert (grid == START).sum() == 1 and (grid == GOAL).sum() == 1
    start = tuple(int(x) for x in np.argwhere(grid == START)[0])
    goal = tuple(int(x) for x in np.argwhere(grid == GOAL)[0])
    changed = lab != grid
    assert (lab[changed] == PATH).all() and (grid[changed] == OPEN).all()  # only open cells become path
    path = {tuple(int(x) for x in p) for p in np.argwhere(lab == PATH)}
    # Walk from S through path cells: each step has exactly one unvisited path/goal neighbour.
    cell, visited, steps = start, {start}, 0
    while cell != goal:
        nxt = [x for x in neighbours(cell, size) if x not in visited and (x in path or x == goal)]
        assert len(nxt) >= 1, "path is broken"
        cell = goal if goal in nxt else nxt[0]
        visited.add(cell)
        steps += 1
    assert visited - {start, goal} == path  # no stray path cells
    dist, ways = distances_and_counts(grid, start)
    assert steps == dist[goal]  # shortest
    assert ways[goal] == 1  # and the only shortest
    return steps


def test_generated_mazes_are_unique_shortest_paths(tmp_path):
    out, manifest = build(tmp_path, "m", "--train", "12", "--test", "4", "--min-path-len", "60")
    assert (
        manifest["vocab_size"] == 6 and manifest["seq_len"] == 900 and manifest["num_puzzle_identifiers"] == 1
    )
    for split, count in (("train", 12), ("test", 4)):
        samples = read_samples(out, split)
        assert len(samples) == count
        assert sorted(s["meta"]["group_id"] for s in samples) == list(range(count))
        for s in samples:
            length = check_maze(s["inputs"], s["labels"], 30)
            assert length >= 60 and s["meta"]["path_len"] == length
            assert s["meta"]["puzzle_id"] == 0
    # Loops exist: somewhere a cell can be reached two ways (not a tree maze).
    grid = read_samples(out, "train")[0]["inputs"].reshape(30, 30)
    open_cells = int((grid != WALL).sum())
    edges = sum(
        grid[r, c] != WALL and grid[nr, nc] != WALL
        for r in range(30)
        for c in range(30)
        for nr, nc in ((r + 1, c), (r, c + 1))
        if nr < 30 and nc < 30
    )
    assert edges > open_cells - 1


def test_small_size_and_aug(tmp_path):
    out, manifest = build(tmp_path, "a", "--size", "11", "--train", "3", "--test", "2", "--aug")
    assert manifest["seq_len"] == 121
    train = read_samples(out, "train")
    assert len(train) == 24
    by_copy = {(s["meta"]["group_id"], s["meta"]["aug"]): s for s in train}
    assert sorted(by_copy) == [(g, t) for g in range(3) for t in range(8)]
    for (group, tid), s in by_copy.items():
        check_maze(s["inputs"], s["labels"], 11)
        base = by_copy[(group, 0)]["labels"].reshape(11, 11)
        assert np.array_equal(s["labels"], dihedral_transform(base, tid).reshape(-1))
    assert len(read_samples(out, "test")) == 2  # no aug in test


def test_same_seed_same_bytes_whatever_workers_and_other_seed_differs(tmp_path):
    args = ("--size", "15", "--train", "10", "--test", "3", "--samples-per-shard", "4")
    _, one = build(tmp_path, "w1", *args, "--workers", "1")
    _, two = build(tmp_path, "w2", *args, "--workers", "2")
    _, other = build(tmp_path, "s1", *args, "--seed", "1")
    hashes = [
        [[x["sha256"] for x in m["splits"][s]["shards"]] for s in ("train", "test")]
        for m in (one, two, other)
    ]
    assert hashes[0] == hashes[1]
    assert all(a != b for a, b in zip(hashes[0][0], hashes[2][0]))


def test_unreachable_min_path_len_is_a_one_line_error(tmp_path, capsys):
    code = main(
        ["maze", "--out", str(tmp_path / "x"), "--size", "5", "--min-path-len", "100", "--max-attempts", "3"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "lower --min-path-len" in err and "\n" not in err


# ---- CSV import ---------------------------------------------------------------------------------------

MAZE_Q = ["S  #", "## #", "   #", " G# "]
MAZE_A = ["Soo#", "##o#", " oo#", " G# "]


def _write(path, rows) -> None:
    path.write_text("source,question,answer,rating\n" + "".join(f"{s},{q},{a},{r}\n" for s, q, a, r in rows))


def test_csv_import(tmp_path):
    q, a = "".join(MAZE_Q), "".join(MAZE_A)
    # A second maze: the first one flipped left-right.
    q2 = "".join(row[::-1] for row in MAZE_Q)
    a2 = "".join(row[::-1] for row in MAZE_A)
    _write(tmp_path / "train.csv", [("x", q, a, 5), ("y", q2, a2, 6)])
    _write(tmp_path / "test.csv", [("z", q, a, 7)])
    out, manifest = build(
        tmp_path,
        "c",
        "--size",
        "4",
        "--from-csv",
        str(tmp_path / "train.csv"),
        "--test-csv",
        str(tmp_path / "test.csv"),
    )
    assert manifest["seq_len"] == 16 and manifest["extra"]["source"] == "csv"
    train = sorted(read_samples(out, "train"), key=lambda s: s["meta"]["group_id"])
    assert [s["meta"]["source"] for s in train] == ["x", "y"]
    assert "".join(CHARS[t] for t in train[0]["inputs"]) == q
    assert "".join(CHARS[t] for t in train[1]["labels"]) == a2
    assert train[0]["meta"]["path_len"] == 6
    check_maze(train[0]["inputs"], train[0]["labels"], 4)
    assert [s["meta"]["rating"] for s in read_samples(out, "test")] == ["7"]


@pytest.mark.parametrize(
    "question, answer, message",
    [
        ("S  #.# #   # G  ", "".join(MAZE_A), "has character(s) ['.']"),
        ("S  ## #   # G  ", "".join(MAZE_A), "question has 15 characters, expected 16"),
        ("".join(MAZE_Q), "S  ## ##   # G  ", "answer differs from question"),
        ("S  ### #   # G  ".replace("G", " "), "".join(MAZE_A), "exactly one 'S' and one 'G'"),
    ],
)
def test_csv_bad_rows(tmp_path, capsys, question, answer, message):
    _write(tmp_path / "m.csv", [("ok", "".join(MAZE_Q), "".join(MAZE_A), 1), ("bad", question, answer, 1)])
    assert (
        main(["maze", "--out", str(tmp_path / "o"), "--size", "4", "--from-csv", str(tmp_path / "m.csv")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "m.csv:3:" in err and message in err and "\n" not in err
