"""The depth-controlled reasoning tasks of `prep reasoning`: answers checked by independent solvers,
depth ranges per split, and determinism."""

from __future__ import annotations

import json
import re

from hrm_mega.prep.cli import main


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def resolve(prompt: str) -> tuple[str, int]:
    """(value, hops) of the queried variable, by following the assignments."""
    body, query = re.fullmatch(r"chain (.*) : (\w)=", prompt).groups()
    table = dict(a.split("=") for a in body.split())
    name, hops = query, 0
    while not table[name].isdigit():
        name, hops = table[name], hops + 1
    return table[name], hops


def test_every_task_answers_right_at_its_splits_depths(tmp_path) -> None:
    depths = {"chain": ((1, 4), (6, 8)), "addition": ((1, 5), (7, 8)), "parity": ((2, 12), (16, 24))}
    for task, (easy, hard) in depths.items():
        out = tmp_path / task
        assert main(["reasoning", "--task", task, "--out", str(out), "--train", "300", "--val", "50", "--hard", "100"]) == 0  # fmt: skip
        for split in ("train", "val", "hard"):
            rows = read(out / f"{split}.jsonl")
            lo, hi = hard if split == "hard" else easy
            seen = {r["difficulty"] for r in rows}
            assert seen <= set(range(lo, hi + 1)) and (split == "val" or seen == set(range(lo, hi + 1))), (
                task,
                split,
            )
            for r in rows:
                if task == "chain":
                    value, hops = resolve(r["prompt"])
                    assert (value, hops) == (r["answer"], r["difficulty"]), r
                elif task == "addition":
                    a, b = map(int, re.fullmatch(r"add (\d+)\+(\d+)=", r["prompt"]).groups())
                    assert int(r["answer"]) == a + b and len(str(a)) == len(str(b)) == r["difficulty"]
                else:
                    bits = r["prompt"].removeprefix("parity ").removesuffix(" =").split()
                    assert r["answer"] == str(sum(map(int, bits)) % 2) and len(bits) == r["difficulty"]
        assert read(out / "train.jsonl") != read(out / "val.jsonl")[:50]
    again = tmp_path / "again"
    assert main(["reasoning", "--task", "chain", "--out", str(again), "--train", "100", "--val", "5", "--hard", "5"]) == 0  # fmt: skip
    assert read(again / "train.jsonl") == read(tmp_path / "chain/train.jsonl")[:100]  # a prefix, same bytes
    assert main(["reasoning", "--task", "chain", "--out", str(again)]) == 2  # exists: --overwrite


def test_relay_defines_every_variable_before_it_is_read(tmp_path) -> None:
    out = tmp_path / "relay"
    assert main(["reasoning", "--task", "relay", "--out", str(out), "--train", "300", "--val", "300", "--hard", "200"]) == 0  # fmt: skip
    for split, (lo, hi) in {"train": (1, 3), "val": (1, 6), "hard": (4, 6)}.items():
        rows = read(out / f"{split}.jsonl")
        assert {r["difficulty"] for r in rows} == set(range(lo, hi + 1)), split
        for r in rows:
            body, query = re.fullmatch(r"relay (.*) : (\w)=", r["prompt"]).groups()
            defined: set[str] = set()
            for assignment in body.split():
                name, source = assignment.split("=")
                assert name not in defined and (source.isdigit() or source in defined), r
                defined.add(name)
            roots = [a.split("=")[1] for a in body.split() if a.split("=")[1].isdigit()]
            assert len(roots) == len(set(roots)) >= 2, r  # distinct digits: a distractor's never matches
            value, hops = resolve(r["prompt"].replace("relay ", "chain ", 1))
            assert (value, hops) == (r["answer"], r["difficulty"]), r


def test_trace_hidden_targets_are_every_names_value_in_definition_order(tmp_path) -> None:
    out = tmp_path / "trace"
    assert main(["reasoning", "--task", "trace", "--out", str(out), "--train", "300", "--val", "300", "--hard", "200"]) == 0  # fmt: skip
    for split, (lo, hi) in {"train": (0, 3), "val": (1, 6), "hard": (4, 6)}.items():
        rows = read(out / f"{split}.jsonl")
        assert {r["difficulty"] for r in rows} == set(range(lo, hi + 1)), split
        for r in rows:
            body, query = re.fullmatch(r"trace ((?:\w\w\?)+):(\w)=", r["prompt"]).groups()
            values: dict[str, str] = {}  # resolved independently, in reading order
            depth: dict[str, int] = {}
            for name, source in re.findall(r"(\w)(\w)\?", body):
                assert name not in values and (source.isdigit() or source in values), r
                values[name] = source if source.isdigit() else values[source]
                depth[name] = 0 if source.isdigit() else depth[source] + 1
            assert r["hidden"] == list(values.values()), r  # one target per placeholder, in order
            assert (values[query], depth[query]) == (r["answer"], r["difficulty"]), r
            # due cycles: one lookup per cycle, the answer one past the queried name
            assert r["due"] == [d + 1 for d in depth.values()] + [depth[query] + 2], r
            roots = [s for _, s in re.findall(r"(\w)(\w)\?", body) if s.isdigit()]
            assert len(roots) == len(set(roots)) >= 2, r
