"""Import of HRM's .npy dataset directories: ids, groups, ignore labels, and refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hrm_mega.data.shards import read_manifest
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples

SEQ = 81


def write_split(split_dir, sets: dict[str, dict[str, np.ndarray]], num_ids: int, ignore=0) -> None:
    split_dir.mkdir(parents=True)
    meta = {
        "pad_id": 0, "ignore_label_id": ignore, "blank_identifier_id": 0, "vocab_size": 11, "seq_len": SEQ,
        "num_puzzle_identifiers": num_ids, "total_groups": 0, "mean_puzzle_examples": 1.0, "sets": list(sets),
    }  # fmt: skip
    (split_dir / "dataset.json").write_text(json.dumps(meta))
    for name, arrays in sets.items():
        for field, array in arrays.items():
            np.save(split_dir / f"{name}__{field}.npy", array)


def make_set(rng, puzzle_sizes: list[int], group_sizes: list[int], ids: list[int]) -> dict[str, np.ndarray]:
    n = sum(puzzle_sizes)
    labels = rng.integers(2, 11, (n, SEQ)).astype(np.uint8)
    labels[:, :3] = 0  # ignored positions
    return {
        "inputs": rng.integers(1, 11, (n, SEQ)).astype(np.uint8),
        "labels": labels,
        "puzzle_identifiers": np.array(ids, dtype=np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(puzzle_sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
    }


@pytest.fixture
def hrm_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "hrm"
    # train: set "all" with 3 puzzles (2, 1, 2 examples) in groups [2 puzzles, 1 puzzle]; set "more" with 1.
    train_sets = {
        "all": make_set(rng, [2, 1, 2], [2, 1], [1, 2, 3]),
        "more": make_set(rng, [1], [1], [4]),
    }
    write_split(root / "train", train_sets, num_ids=5)
    write_split(root / "test", {"all": make_set(rng, [1, 1], [2], [2, 3])}, num_ids=5)
    return root, train_sets


def test_import_maps_examples_ids_groups_and_ignore(tmp_path, hrm_dir):
    root, train_sets = hrm_dir
    out = tmp_path / "out"
    assert main(["hrm-npy", "--from", str(root), "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["task"] == "sudoku" and manifest["vocab_size"] == 11 and manifest["seq_len"] == SEQ
    assert manifest["num_puzzle_identifiers"] == 5
    assert manifest["splits"]["train"]["num_samples"] == 6 and manifest["splits"]["train"]["num_groups"] == 3
    written = read_samples(out, "train")
    train = sorted(written, key=lambda s: (s["meta"]["set"] != "all", s["meta"]["example"]))
    assert written != train  # the train split is written shuffled
    assert [s["meta"]["example"] for s in train] == [0, 1, 2, 3, 4, 0]
    assert [s["meta"]["puzzle"] for s in train] == [0, 0, 1, 2, 2, 0]
    assert [s["meta"]["puzzle_id"] for s in train] == [1, 1, 2, 3, 3, 4]
    assert [s["meta"]["group_id"] for s in train] == [0, 0, 0, 1, 1, 2]
    assert [s["meta"]["set"] for s in train] == ["all"] * 5 + ["more"]
    expected_inputs = np.concatenate([train_sets["all"]["inputs"], train_sets["more"]["inputs"]])
    expected_labels = np.concatenate([train_sets["all"]["labels"], train_sets["more"]["labels"]]).astype(
        np.int16
    )
    expected_labels[expected_labels == 0] = -100
    assert np.array_equal(np.stack([s["inputs"] for s in train]), expected_inputs)
    assert np.array_equal(np.stack([s["labels"] for s in train]), expected_labels)
    assert (np.stack([s["labels"] for s in train])[:, :3] == -100).all()
    test = read_samples(out, "test")
    assert [s["meta"]["puzzle_id"] for s in test] == [2, 3] and [s["meta"]["group_id"] for s in test] == [
        0,
        0,
    ]


def test_task_override_and_null_ignore(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "h"
    for split in ("train", "test"):
        write_split(root / split, {"all": make_set(rng, [1], [1], [0])}, num_ids=1, ignore=None)
    out = tmp_path / "o"
    assert main(["hrm-npy", "--from", str(root), "--out", str(out), "--quiet", "--task", "mine"]) == 0
    assert read_manifest(out)["task"] == "mine"
    assert (read_samples(out, "train")[0]["labels"][:3] == 0).all()  # no ignore id: 0 stays 0


def _object_array(path):
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _object_array(d / "all__labels.npy"), "all__labels.npy: not a plain numeric .npy"),
        (
            lambda d: np.save(d / "all__puzzle_indices.npy", np.array([0, 3, 2, 5])),
            "offsets must not decrease",
        ),
        (
            lambda d: np.save(d / "all__group_indices.npy", np.array([0, 1])),
            "all__group_indices.npy: must be",
        ),
        (lambda d: np.save(d / "all__inputs.npy", np.zeros((5, 80), np.uint8)), "expected [examples, 81]"),
        (
            lambda d: np.save(d / "all__puzzle_identifiers.npy", np.array([1, 2, 9])),
            "num_puzzle_identifiers=5",
        ),
        (
            lambda d: np.save(d / "all__inputs.npy", np.full((5, 81), 11, np.uint8)),
            "outside [0, vocab_size=11)",
        ),
        (lambda d: (d / "all__labels.npy").unlink(), "all__labels.npy: missing"),
        (lambda d: (d / "dataset.json").write_text("{"), "dataset.json: not valid JSON"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, capsys, hrm_dir, damage, message):
    root, _ = hrm_dir
    damage(root / "train")
    assert main(["hrm-npy", "--from", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_directory(tmp_path, capsys):
    assert main(["hrm-npy", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
