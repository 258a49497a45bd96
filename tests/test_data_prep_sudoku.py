"""Sudoku builder: uniqueness (checked by an independent brute force), determinism, augmentation, CSV."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hrm_mega.data.augment import sudoku_augment
from hrm_mega.data.shards import read_manifest, verify_shards
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples
from hrm_mega.prep.sudoku_solver import count_solutions, generate, is_solution, rate, solve

# ---- an independent checker: set-based recursive backtracking, no bitmasks, no propagation ----------


def _allowed(grid: list[int], cell: int) -> set[int]:
    r, c = divmod(cell, 9)
    br, bc = r - r % 3, c - c % 3
    taken = {grid[r * 9 + k] for k in range(9)} | {grid[k * 9 + c] for k in range(9)}
    taken |= {grid[(br + i) * 9 + bc + j] for i in range(3) for j in range(3)}
    return set(range(1, 10)) - taken


def brute_solutions(grid: list[int], limit: int = 2) -> list[list[int]]:
    """Up to `limit` solutions, branching on the blank with the fewest allowed digits."""
    grid = list(grid)
    found: list[list[int]] = []

    def recurse() -> None:
        blanks = [i for i in range(81) if grid[i] == 0]
        if not blanks:
            found.append(list(grid))
            return
        options = {i: _allowed(grid, i) for i in blanks}
        cell = min(blanks, key=lambda i: len(options[i]))
        for digit in sorted(options[cell]):
            grid[cell] = digit
            recurse()
            grid[cell] = 0
            if len(found) >= limit:
                return

    recurse()
    return found


def digits(tokens: np.ndarray) -> list[int]:
    """Token layout -> digits: 1 (blank) -> 0, 2-10 -> 1-9."""
    return [int(t) - 1 for t in tokens]


def build(tmp_path, name: str, *args: str) -> tuple:
    out = tmp_path / name
    assert main(["sudoku", "--out", str(out), "--quiet", *args]) == 0
    return out, read_manifest(out)


def shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {s: [x["sha256"] for x in v["shards"]] for s, v in manifest["splits"].items()}


CANONICAL = [(r * 3 + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9)]  # a valid solved grid


# ---- solver -----------------------------------------------------------------------------------------


def test_solver_agrees_with_brute_force_on_random_blanks():
    rng = np.random.default_rng(0)
    assert is_solution(CANONICAL)
    for trial in range(12):
        grid = list(CANONICAL)
        for cell in rng.choice(81, size=int(rng.integers(30, 60)), replace=False):
            grid[cell] = 0
        brute = brute_solutions(grid)
        assert count_solutions(grid) == len(brute), trial
        solution = solve(grid)
        assert is_solution(solution) and all(g in (0, d) for g, d in zip(grid, solution))
        if len(brute) == 1:
            assert solution == brute[0]
    assert count_solutions([0] * 81) == 2
    assert count_solutions([0] * 81, limit=5) == 5
    clash = [0] * 81
    clash[0] = clash[1] = 5  # two 5s in one row
    assert count_solutions(clash) == 0 and solve(clash) is None


def test_rating_counts_search_effort():
    one_blank = list(CANONICAL)
    one_blank[40] = 0
    assert rate(one_blank) == 0  # singles suffice
    hard = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
    grid = [0 if ch == "." else int(ch) for ch in hard]
    assert count_solutions(grid) == 1
    assert rate(grid) > 10


# ---- generated datasets ------------------------------------------------------------------------------


def test_generated_puzzles_are_unique_and_labelled(tmp_path):
    out, manifest = build(
        tmp_path, "s", "--train", "24", "--test", "6", "--min-givens", "24", "--max-givens", "30"
    )
    assert (
        manifest["vocab_size"] == 11 and manifest["seq_len"] == 81 and manifest["num_puzzle_identifiers"] == 1
    )
    for split, count in (("train", 24), ("test", 6)):
        samples = read_samples(out, split)
        assert len(samples) == count
        groups = [s["meta"]["group_id"] for s in samples]
        assert sorted(groups) == list(range(count))
        assert groups != list(range(count)) if split == "train" else groups == list(range(count))  # shuffled
        for k, s in enumerate(samples):
            puzzle, solution = digits(s["inputs"]), digits(s["labels"])
            assert s["inputs"].dtype == np.int16 and s["labels"].shape == (81,)
            assert s["meta"]["puzzle_id"] == 0
            assert set(s["labels"].tolist()) <= set(range(2, 11))
            givens = sum(d > 0 for d in puzzle)
            assert 24 <= givens <= 30 and s["meta"]["givens"] == givens
            assert all(p in (0, q) for p, q in zip(puzzle, solution))  # label respects the givens
            assert s["meta"]["rating"] == rate(puzzle)
            if k < 8:  # the brute force is slower; a sample suffices
                assert brute_solutions(puzzle) == [solution]


def test_min_rating_builds_harder_puzzles(tmp_path):
    out, manifest = build(tmp_path, "hard", "--train", "4", "--test", "0", "--min-rating", "3")
    ratings = [s["meta"]["rating"] for s in read_samples(out, "train")]
    assert len(ratings) == 4 and min(ratings) >= 3
    assert manifest["extra"]["min_rating"] == 3


def test_same_seed_same_bytes_whatever_workers_and_other_seed_differs(tmp_path):
    args = ("--train", "12", "--test", "4", "--samples-per-shard", "5", "--num-aug", "1")
    _, one = build(tmp_path, "w1", *args, "--workers", "1")
    _, two = build(tmp_path, "w2", *args, "--workers", "2")
    _, other = build(tmp_path, "seed1", *args, "--workers", "2", "--seed", "1")
    assert len(one["splits"]["train"]["shards"]) == 5  # 24 samples, 5 per shard
    assert shard_hashes(one) == shard_hashes(two)
    assert all(a != b for a, b in zip(shard_hashes(one)["train"], shard_hashes(other)["train"]))


def test_manifest_fields(tmp_path):
    out, manifest = build(
        tmp_path, "m", "--train", "5", "--test", "3", "--seed", "7", "--samples-per-shard", "2"
    )
    assert manifest["format"] == "hrm-mega/1" and manifest["task"] == "sudoku"
    assert manifest["seed"] == 7 and manifest["builder_version"] == "1"
    assert manifest["command"] == (
        f"python -m hrm_mega.prep sudoku --out {out} --quiet --train 5 --test 3 --seed 7 --samples-per-shard 2"
    )
    assert manifest["pad_id"] == 0 and manifest["ignore_label_id"] == -100
    for split, count in (("train", 5), ("test", 3)):
        info = manifest["splits"][split]
        assert info["num_samples"] == count and info["num_groups"] == count
        assert [s["num_samples"] for s in info["shards"]] == [2] * (count // 2) + [1] * (count % 2)
        for shard in info["shards"]:
            data = (out / split / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        verify_shards(out, split)
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_existing_output_needs_overwrite(tmp_path, capsys):
    build(tmp_path, "o", "--train", "2", "--test", "1")
    assert main(["sudoku", "--out", str(tmp_path / "o"), "--quiet", "--train", "1", "--test", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _, manifest = build(tmp_path, "o", "--train", "1", "--test", "1", "--overwrite")
    assert manifest["splits"]["train"]["num_samples"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--givens", "12"], "at least 17"),
        (["--min-givens", "30", "--max-givens", "25"], "--max-givens 25"),
        (["--givens", "25", "--min-givens", "24"], "--givens"),
        (["--test-csv", "x.csv"], "--test-csv: needs --from-csv"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_arguments_give_one_line(tmp_path, capsys, args, message):
    assert main(["sudoku", "--out", str(tmp_path / "bad"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ---- augmentation ------------------------------------------------------------------------------------


def test_sudoku_augment_preserves_validity_and_relation():
    p = generate(np.random.default_rng(3), 26, 28)
    inputs = np.asarray(p.puzzle, dtype=np.int16) + 1
    labels = np.asarray(p.solution, dtype=np.int16) + 1
    seen = set()
    for seed in range(20):
        aug_in, aug_lab = sudoku_augment(inputs, labels, np.random.default_rng(seed))
        assert aug_in.dtype == inputs.dtype and aug_in.shape == (81,)
        puzzle, solution = digits(aug_in), digits(aug_lab)
        assert is_solution(solution)
        assert all(q in (0, s) for q, s in zip(puzzle, solution))
        assert sum(q > 0 for q in puzzle) == p.givens
        if seed < 4:
            assert brute_solutions(puzzle) == [solution]
        seen.add(aug_lab.tobytes())
        again = sudoku_augment(inputs, labels, np.random.default_rng(seed))
        assert np.array_equal(again[0], aug_in) and np.array_equal(again[1], aug_lab)  # pure function
    assert len(seen) == 20 and labels.tobytes() not in seen
    assert np.array_equal(inputs, np.asarray(p.puzzle) + 1)  # inputs not modified in place


def test_sudoku_augment_batched_and_ignore_labels():
    p = generate(np.random.default_rng(4), 28, 30)
    labels = np.asarray(p.solution, dtype=np.int64) + 1
    masked = labels.copy()
    masked[:10] = -100
    batch = np.stack([labels, masked])
    aug_a, aug_b = sudoku_augment(batch, batch, np.random.default_rng(0))
    assert np.array_equal(aug_a, aug_b)
    assert is_solution(digits(aug_a[0]))
    assert (aug_a[1] == -100).sum() == 10
    keep = aug_a[1] != -100
    assert np.array_equal(aug_a[1][keep], aug_a[0][keep])  # same transform for every row
    with pytest.raises(ValueError, match="81 tokens"):
        sudoku_augment(labels[:80], labels[:80], np.random.default_rng(0))


def test_num_aug_adds_grouped_shuffled_copies_to_train_only(tmp_path):
    out, manifest = build(tmp_path, "aug", "--train", "4", "--test", "2", "--num-aug", "2")
    train = read_samples(out, "train")
    assert len(train) == 12 and manifest["splits"]["train"]["num_groups"] == 4
    copies = sorted((s["meta"]["group_id"], s["meta"]["aug"]) for s in train)
    assert copies == [(g, a) for g in range(4) for a in range(3)]
    groups = [s["meta"]["group_id"] for s in train]
    assert any(a != b for a, b in zip(groups, sorted(groups)))  # copies are not written side by side
    for s in train:
        assert is_solution(digits(s["labels"]))
        assert all(q in (0, a) for q, a in zip(digits(s["inputs"]), digits(s["labels"])))
    assert len(read_samples(out, "test")) == 2
    # The original puzzles are those of a build without augmentation.
    build(tmp_path, "plain", "--train", "4", "--test", "2")
    plain = {s["meta"]["group_id"]: s["labels"].tolist() for s in read_samples(tmp_path / "plain", "train")}
    originals = {s["meta"]["group_id"]: s["labels"].tolist() for s in train if s["meta"]["aug"] == 0}
    assert originals == plain


# ---- CSV import ----------------------------------------------------------------------------------------


def _csv_rows(n: int) -> list[tuple[str, str, str, int]]:
    rows = []
    for k in range(n):
        p = generate(np.random.default_rng(100 + k), 27, 30)
        blank = "." if k % 2 else "0"  # both blank spellings
        question = "".join(blank if d == 0 else str(d) for d in p.puzzle)
        rows.append((f"src{k}", question, "".join(map(str, p.solution)), k))
    return rows


def _write_csv(path, rows) -> None:
    lines = ["source,question,answer,rating"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_csv_import_with_test_fraction_and_test_csv(tmp_path):
    rows = _csv_rows(6)
    _write_csv(tmp_path / "train.csv", rows)
    out, manifest = build(tmp_path, "c", "--from-csv", str(tmp_path / "train.csv"), "--test-fraction", "0.34")
    train, test = read_samples(out, "train"), read_samples(out, "test")
    assert (len(train), len(test)) == (4, 2)
    by_source = {r[0]: r for r in rows}
    for s in train + test:
        _, question, answer, rating = by_source[s["meta"]["source"]]
        assert "".join(str(d) for d in digits(s["inputs"])) == question.replace(".", "0")
        assert "".join(str(d) for d in digits(s["labels"])) == answer
        assert s["meta"]["rating"] == rating
    assert {s["meta"]["source"] for s in train + test} == set(by_source)

    _write_csv(tmp_path / "test.csv", rows[:2])
    out2, m2 = build(
        tmp_path, "c2", "--from-csv", str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / "test.csv"),
        "--train", "3", "--min-rating", "1", "--num-aug", "1",
    )  # fmt: skip
    train2 = read_samples(out2, "train")
    assert len(train2) == 6 and {s["meta"]["source"] for s in train2} <= {
        "src1",
        "src2",
        "src3",
        "src4",
        "src5",
    }
    assert [s["meta"]["source"] for s in read_samples(out2, "test")] == ["src1"]  # src0 rated 0 < 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: (r[0], r[1][:80], r[2], r[3]), ":3: question has 80 characters, expected 81"),
        (lambda r: (r[0], "x" + r[1][1:], r[2], r[3]), ":3: question"),
        (lambda r: (r[0], r[1], str(int(r[2][0]) % 9 + 1) + r[2][1:], r[3]), ":3: answer is not a valid"),
        (lambda r: (r[0], str(int(r[2][0]) % 9 + 1) + r[1][1:], r[2], r[3]), ":3: answer disagrees"),
        (lambda r: (r[0], r[1], r[2], "hard"), ":3: rating 'hard' is not a number"),
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path, capsys, mutate, message):
    rows = _csv_rows(2)
    rows[1] = mutate(rows[1])
    _write_csv(tmp_path / "bad.csv", rows)
    assert main(["sudoku", "--out", str(tmp_path / "o"), "--from-csv", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"bad.csv{message}" in err and "\n" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    out, manifest = build(tmp_path, "wds", "--train", "4", "--test", "1", "--samples-per-shard", "3")
    urls = [str(out / "train" / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    records = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    mine = read_samples(out, "train")
    assert [r["__key__"] for r in records] == [s["key"] for s in mine] == [f"{k:09d}" for k in range(4)]
    for r, s in zip(records, mine):
        assert np.array_equal(r["inputs.npy"], s["inputs"]) and np.array_equal(r["labels.npy"], s["labels"])
        assert r["meta.json"] == s["meta"]
