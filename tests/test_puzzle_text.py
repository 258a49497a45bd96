"""Puzzles and the arithmetic corpus as prompt/answer text (`prep puzzle-text`, `prep corpus --format
jsonl`): every record reads back to the puzzle it came from, in the documented notation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_data_prep_arc import write_tasks

from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples

MAZE_DIGITS = {1: "1", 2: "0", 3: "2", 4: "3", 5: "4"}  # ids of `# SGo` -> the text notation


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def grid(text: str) -> list[list[int]]:
    return [[int(c) for c in row] for row in text.split("\n")]


def test_sudoku_records_read_back_to_the_puzzles(tiny_sudoku, tmp_path):
    out = tmp_path / "text"
    assert main(["puzzle-text", "--puzzles", str(tiny_sudoku), "--out", str(out), "--quiet"]) == 0
    for split in ("train", "test"):
        records, samples = jsonl(out / f"{split}.jsonl"), read_samples(tiny_sudoku, split)
        assert [r["sample_id"] for r in records] == [int(s["key"]) for s in samples]
        for r, s in zip(records, samples):
            assert r["prompt"].startswith("sudoku:\n") and r["prompt"].endswith("\n")
            puzzle = np.array(grid(r["prompt"].removeprefix("sudoku:\n").rstrip("\n")))
            assert puzzle.shape == (9, 9)
            assert np.array_equal(puzzle.reshape(-1), np.where(s["inputs"] == 1, 0, s["inputs"] - 1))
            assert np.array_equal(np.array(grid(r["answer"])).reshape(-1), s["labels"] - 1)
            assert r["difficulty"] == int((s["inputs"] == 1).sum()) and r["task"] == "sudoku"
    # sorted by difficulty: the same records, easy first
    ordered = tmp_path / "sorted"
    assert main(["puzzle-text", "--puzzles", str(tiny_sudoku), "--out", str(ordered), "--sort", "difficulty", "--quiet"]) == 0  # fmt: skip
    plain, easy_first = jsonl(out / "train.jsonl"), jsonl(ordered / "train.jsonl")
    assert sorted(map(json.dumps, plain)) == sorted(map(json.dumps, easy_first))
    assert [r["difficulty"] for r in easy_first] == sorted(r["difficulty"] for r in plain)
    assert main(["puzzle-text", "--puzzles", str(tiny_sudoku), "--out", str(out), "--quiet"]) == 2  # exists
    blanks = tmp_path / "blanks"
    assert main(["puzzle-text", "--puzzles", str(tiny_sudoku), "--out", str(blanks), "--answer", "blanks", "--quiet"]) == 0  # fmt: skip
    for r, s in zip(jsonl(blanks / "test.jsonl"), read_samples(tiny_sudoku, "test")):
        assert r["answer"] == "".join(str(int(d) - 1) for d in s["labels"][s["inputs"] == 1])


def test_maze_records_mark_the_path(tmp_path):
    mazes = tmp_path / "maze"
    assert main(["maze", "--out", str(mazes), "--size", "11", "--train", "3", "--test", "2", "--quiet"]) == 0
    assert main(["puzzle-text", "--puzzles", str(mazes), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    for r, s in zip(jsonl(tmp_path / "t/train.jsonl"), read_samples(mazes, "train")):
        expected = ["".join(MAZE_DIGITS[int(v)] for v in row) for row in s["labels"].reshape(11, 11)]
        assert r["answer"] == "\n".join(expected)
        assert r["difficulty"] == int((s["labels"] == 5).sum()) > 0


def test_arc_prompts_show_other_pairs_of_the_same_puzzle(tmp_path, capsys):
    tasks = write_tasks(tmp_path)
    arc = tmp_path / "arc"
    argv = ["arc", "--out", str(arc), "--quiet", "--from-json", str(tmp_path / "training")]
    assert main([*argv, "--eval-json", str(tmp_path / "evaluation")]) == 0
    assert (
        main(["puzzle-text", "--puzzles", str(arc), "--out", str(tmp_path / "t"), "--demos", "3", "--quiet"])
        == 0
    )
    (test,) = jsonl(tmp_path / "t/test.jsonl")  # ccc's test pair, after ccc's two train pairs
    demos = [("\n".join("".join(map(str, row)) for row in p["input"]), "\n".join("".join(map(str, row)) for row in p["output"])) for p in tasks["ccc"]["train"]]  # fmt: skip
    shown = "".join(f"input:\n{i}\noutput:\n{o}\n" for i, o in demos)
    query = tasks["ccc"]["test"][0]
    assert (
        test["prompt"]
        == "arc:\n"
        + shown
        + "input:\n"
        + "\n".join("".join(map(str, r)) for r in query["input"])
        + "\noutput:\n"
    )
    assert grid(test["answer"]) == query["output"]
    for r in jsonl(tmp_path / "t/train.jsonl"):  # a train pair never shows itself
        query_input = r["prompt"].rsplit("input:\n", 1)[1].removesuffix("\noutput:\n")
        assert f"input:\n{query_input}\noutput:\n{r['answer']}\n" not in r["prompt"]
    assert main(["puzzle-text", "--puzzles", str(tmp_path / "nope"), "--out", str(tmp_path / "u")]) == 2
    assert "--puzzles" in capsys.readouterr().err


def test_corpus_jsonl_holds_the_txt_documents_as_prompt_and_answer(tmp_path):
    assert main(["corpus", "--out", str(tmp_path / "a"), "--docs", "50"]) == 0
    assert main(["corpus", "--out", str(tmp_path / "a"), "--docs", "50", "--format", "jsonl"]) == 0
    for split in ("train", "test"):
        records = jsonl(tmp_path / f"a/{split}.jsonl")
        lines = (tmp_path / f"a/{split}.txt").read_text().splitlines()
        assert [r["prompt"] + r["answer"] for r in records] == lines
    for r in records:
        assert r["prompt"].endswith(("=", "->")) and r["answer"]
        if r["task"] in ("add", "sub", "mul"):
            a, b = (
                int(x)
                for x in r["prompt"][:-1].replace("+", " ").replace("*", " ").replace("-", " ", 1).split()
            )
            assert int(r["answer"]) == {"add": a + b, "sub": a - b, "mul": a * b}[r["task"]]
