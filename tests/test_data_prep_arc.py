"""ARC import: encoding, puzzle ids, augmentation (dedupe, inversion), translation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hrm_mega.data.augment import (
    DIHEDRAL_INVERSE,
    arc_augment_grid,
    arc_canvas_to_grid,
    arc_grid_to_canvas,
    arc_unaugment_grid,
    dihedral_transform,
    inverse_dihedral_transform,
    invert_colour_permutation,
    random_colour_permutation,
)
from hrm_mega.data.shards import read_manifest
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples


def _pair(rng: np.random.Generator, h: int, w: int) -> dict:
    grid = rng.integers(0, 10, (h, w))
    return {"input": grid.tolist(), "output": np.rot90(grid).tolist()}


def write_tasks(root, rng_seed: int = 0) -> dict[str, dict]:
    """Two training tasks, one evaluation task; returns name -> task JSON."""
    rng = np.random.default_rng(rng_seed)
    tasks = {
        "training/aaa": {"train": [_pair(rng, 3, 5), _pair(rng, 2, 2)], "test": [_pair(rng, 4, 1)]},
        "training/sub/bbb": {"train": [_pair(rng, 30, 30)], "test": [_pair(rng, 1, 7)]},
        "evaluation/ccc": {"train": [_pair(rng, 5, 5), _pair(rng, 6, 2)], "test": [_pair(rng, 3, 3)]},
    }
    for name, task in tasks.items():
        path = root / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(task))
    return {name.split("/")[-1]: task for name, task in tasks.items()}


def build(tmp_path, name: str, *args: str):
    out = tmp_path / name
    argv = ["arc", "--out", str(out), "--quiet", "--from-json", str(tmp_path / "training")]
    assert main([*argv, "--eval-json", str(tmp_path / "evaluation"), *args]) == 0
    return out, read_manifest(out)


def test_encoding_ids_and_inversion(tmp_path):
    tasks = write_tasks(tmp_path)
    out, manifest = build(tmp_path, "a", "--num-aug", "3")
    assert manifest["vocab_size"] == 12 and manifest["seq_len"] == 900
    assert manifest["num_puzzle_identifiers"] == 1 + 3 * 4  # blank + (task, aug) pairs
    train, test = read_samples(out, "train"), read_samples(out, "test")
    # aaa: 3 pairs, bbb: 2 pairs, ccc: 2 train pairs (test pair goes to test); x4 variants each.
    assert len(train) == 4 * (3 + 2 + 2) and len(test) == 4 * 1
    assert manifest["splits"]["train"]["num_groups"] == 3 and manifest["splits"]["test"]["num_groups"] == 1
    ids: dict[tuple[str, int], int] = {}
    for s in train + test:
        m = s["meta"]
        assert ids.setdefault((m["task"], m["aug"]), m["puzzle_id"]) == m["puzzle_id"]
        kind, k = m["pair"].split("/")
        original = tasks[m["task"]][kind][int(k)]
        for field, key in (("inputs", "input"), ("labels", "output")):
            canvas = s[field].copy()
            if field == "labels":
                assert (canvas == -100).sum() > 0 or np.array(original[key]).shape == (30, 30)
                assert not (canvas == 0).any()  # PAD is -100 in labels
                canvas[canvas == -100] = 0
            grid = arc_canvas_to_grid(canvas, tuple(m["offset"]))
            assert grid is not None
            back = arc_unaugment_grid(grid, m["dihedral"], np.array(m["colour_perm"]))
            assert np.array_equal(back, np.array(original[key]))
    assert sorted(ids.values()) == list(range(1, 13))
    assert {m for (m, _a) in ids} == {"aaa", "bbb", "ccc"}
    assert {s["meta"]["task"] for s in test} == {"ccc"}
    assert {s["meta"]["group_id"] for s in test} == {2}
    # Test-split puzzles share ids with the same task's demonstrations in train.
    assert {s["meta"]["puzzle_id"] for s in test} <= {s["meta"]["puzzle_id"] for s in train}
    assert all(s["meta"]["aug"] > 0 or s["meta"]["dihedral"] == 0 for s in train)


def test_canvas_layout_has_eos_border():
    grid = np.array([[0, 1, 2], [3, 4, 5]])
    canvas = arc_grid_to_canvas(grid, (4, 7)).reshape(30, 30)
    assert np.array_equal(canvas[4:6, 7:10], grid + 2)
    assert (canvas[6, 7:10] == 1).all() and (canvas[4:6, 10] == 1).all()
    assert canvas.sum() == (grid + 2).sum() + 5  # nothing else but PAD
    full = arc_grid_to_canvas(np.zeros((30, 30), dtype=int))
    assert (full == 2).all()  # no room for EOS
    assert np.array_equal(arc_canvas_to_grid(full), np.zeros((30, 30)))
    assert arc_canvas_to_grid(np.zeros(900, dtype=int)) is None


def test_dihedral_and_colour_helpers():
    grid = np.arange(6).reshape(2, 3)
    images = [dihedral_transform(grid, t) for t in range(8)]
    assert len({(g.shape, g.tobytes()) for g in images}) == 8  # all distinct
    for t in range(8):
        assert np.array_equal(inverse_dihedral_transform(images[t], t), grid)
        assert np.array_equal(dihedral_transform(images[t], DIHEDRAL_INVERSE[t]), grid)
    assert np.array_equal(images[1], np.rot90(grid)) and np.array_equal(images[6], grid.T)
    perm = random_colour_permutation(np.random.default_rng(1))
    assert perm[0] == 0 and sorted(perm) == list(range(10))
    assert np.array_equal(invert_colour_permutation(perm)[perm], np.arange(10))
    colours = np.random.default_rng(2).integers(0, 10, (4, 5))
    assert np.array_equal(arc_unaugment_grid(arc_augment_grid(colours, 7, perm), 7, perm), colours)


def test_symmetric_tasks_are_deduplicated(tmp_path):
    (tmp_path / "training").mkdir()
    # All-background 2x2 grids: every colour permutation and dihedral transform gives the same task.
    blank = {"train": [{"input": [[0, 0], [0, 0]], "output": [[0, 0], [0, 0]]}], "test": []}
    (tmp_path / "training" / "blank.json").write_text(json.dumps(blank))
    # One colour, 1x2 grid: only the transforms that turn it upright differ (2 contents x 9 colours).
    line = {"train": [{"input": [[3, 3]], "output": [[3, 3]]}], "test": []}
    (tmp_path / "training" / "line.json").write_text(json.dumps(line))
    out = tmp_path / "d"
    assert (
        main(
            [
                "arc",
                "--out",
                str(out),
                "--quiet",
                "--from-json",
                str(tmp_path / "training"),
                "--num-aug",
                "40",
            ]
        )
        == 0
    )
    samples = read_samples(out, "train")
    per_task = {t: [s for s in samples if s["meta"]["task"] == t] for t in ("blank", "line")}
    assert len(per_task["blank"]) == 1
    assert 2 <= len(per_task["line"]) <= 18
    contents = {s["inputs"].tobytes() for s in per_task["line"]}
    assert len(contents) == len(per_task["line"])  # no repeats
    assert read_manifest(out)["extra"]["tasks_with_fewer_variants"] == 2


def test_translate_and_determinism(tmp_path):
    write_tasks(tmp_path)
    _, plain = build(tmp_path, "p", "--num-aug", "2")
    out, moved = build(tmp_path, "t", "--num-aug", "2", "--translate", "--workers", "2")
    _, moved2 = build(tmp_path, "t2", "--num-aug", "2", "--translate", "--workers", "1")
    _, other = build(tmp_path, "o", "--num-aug", "2", "--translate", "--seed", "5")

    def hashes(m):
        return [x["sha256"] for s in ("train", "test") for x in m["splits"][s]["shards"]]

    assert hashes(moved) == hashes(moved2)
    assert hashes(moved) != hashes(plain) and hashes(moved) != hashes(other)
    train = read_samples(out, "train")
    tasks_in_order = [s["meta"]["task"] for s in train]
    assert tasks_in_order != sorted(tasks_in_order)  # written shuffled, not task by task
    offsets = [tuple(s["meta"]["offset"]) for s in train]
    assert any(o != (0, 0) for o in offsets)
    assert all(o == (0, 0) for s in read_samples(out, "test") for o in [tuple(s["meta"]["offset"])])
    for s in train:  # input and output share the offset, and both fit
        grid = arc_canvas_to_grid(s["inputs"], tuple(s["meta"]["offset"]))
        assert grid is not None


@pytest.mark.parametrize(
    "task, message",
    [
        (
            {"train": [{"input": [[1] * 31], "output": [[1]]}], "test": []},
            "train[0].input is 1x31, larger than 30x30",
        ),
        ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}, "ragged"),
        ({"train": [{"input": [[1, 12]], "output": [[1]]}], "test": []}, "not a colour 0-9"),
        ({"train": [], "test": [{"input": [[1]]}]}, "test[0] needs 'input' and 'output'"),
        ({"train": []}, "'train' and 'test' lists"),
    ],
)
def test_bad_task_file_is_one_line_naming_it(tmp_path, capsys, task, message):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.json").write_text(json.dumps(task))
    assert main(["arc", "--out", str(tmp_path / "o"), "--from-json", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.json" in err and message in err and "\n" not in err


def test_missing_folder_and_duplicate_names(tmp_path, capsys):
    assert main(["arc", "--out", str(tmp_path / "o"), "--from-json", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "same.json").write_text(json.dumps({"train": [], "test": []}))
    assert (
        main(["arc", "--out", str(tmp_path / "o"), "--from-json", str(tmp_path / "x"), str(tmp_path / "y")])
        == 2
    )
    assert "appears twice" in capsys.readouterr().err
