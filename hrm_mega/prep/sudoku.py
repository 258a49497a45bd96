"""Sudoku shards: generated unique-solution puzzles, or an import of sudoku-extreme style CSV files.

Token layout (HRM's): 0 PAD, 1 blank, 2-10 digits 1-9; seq_len 81, vocab 11, one puzzle identifier
(puzzle_id 0). Labels are the full solution. `--num-aug K` adds K augmented copies of each train
puzzle (hrm_mega.data.augment.sudoku_augment), each its own sample with the original's group_id.
The train split is written in a seeded random order (common.write_order); test keeps index order.

    python -m hrm_mega.prep sudoku --out data/sudoku --train 1000 --test 200 --min-givens 22 --max-givens 28
    python -m hrm_mega.prep sudoku --out data/sx --from-csv train.csv --test-csv test.csv --train 1000 \
        --num-aug 1000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.augment import sudoku_augment
from hrm_mega.prep.common import (
    SPLITS,
    DataPrepError,
    Sample,
    add_common_arguments,
    add_csv_arguments,
    add_split_counts,
    csv_rows,
    generate_splits,
    item_rng,
    non_negative_int,
    positive_int,
    read_csv_splits,
    write_dataset,
)
from hrm_mega.prep.sudoku_solver import GenerationError, generate

TASK = "sudoku"
BUILDER_VERSION = "1"
VOCAB_SIZE = 11
SEQ_LEN = 81
MIN_POSSIBLE_GIVENS = 17  # no sudoku with fewer givens has a unique solution


@dataclass(frozen=True)
class Spec:
    """What a worker needs to make one puzzle."""

    seed: int
    min_givens: int = 0
    max_givens: int = 0
    min_rating: int = 0
    max_attempts: int = 0


def generate_job(job: tuple[Spec, str, int]) -> Sample:
    """Generated puzzle `index` of `split` as (inputs, labels, meta)."""
    spec, split, index = job
    try:
        p = generate(
            item_rng(spec.seed, split, index),
            spec.min_givens,
            spec.max_givens,
            spec.min_rating,
            spec.max_attempts,
        )
    except GenerationError as e:
        raise DataPrepError(f"{split} puzzle {index}: {e}") from None
    inputs = np.asarray(p.puzzle, dtype=np.int16) + 1  # blank 0 -> 1, digit d -> d + 1
    labels = np.asarray(p.solution, dtype=np.int16) + 1
    return inputs, labels, {"puzzle_id": 0, "group_id": index, "givens": p.givens, "rating": p.rating}


def augmented_copy(
    seed: int, split: str, index: int, aug: int, inputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Copy `aug` of puzzle `index`: a sudoku_augment drawn from its own generator (seed, split, index,
    aug), so it does not depend on the order in which samples are written."""
    return sudoku_augment(inputs, labels, item_rng(seed, split, index, stream=aug))


# ---- CSV import -----------------------------------------------------------------------------------------


@dataclass
class CsvPuzzles:
    questions: np.ndarray  # [N, 81] uint8 digits, 0 blank
    answers: np.ndarray  # [N, 81] uint8 digits
    sources: list[str]
    ratings: list[int | float | None]

    def __len__(self) -> int:
        return len(self.sources)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _grids(texts: list[str], lines: list[int], path: Path, field: str, blank_ok: bool) -> np.ndarray:
    """Validated [N, 81] digit array from 81-character strings ('.' and '0' blank when blank_ok)."""
    for text, line in zip(texts, lines):
        if len(text) != 81:
            raise DataPrepError(f"{path}:{line}: {field} has {len(text)} characters, expected 81")
    if not texts:
        return np.zeros((0, 81), dtype=np.uint8)
    raw = np.frombuffer("".join(texts).encode("ascii", "replace"), dtype=np.uint8).reshape(-1, 81).copy()
    raw[raw == ord(".")] = ord("0")
    digits = raw.astype(np.int16) - ord("0")
    low = 0 if blank_ok else 1
    bad = ((digits < low) | (digits > 9)).any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        allowed = "digits 1-9, '.' or '0' for blanks" if blank_ok else "digits 1-9"
        raise DataPrepError(f"{path}:{lines[k]}: {field} {texts[k]!r} has a character other than {allowed}")
    return digits.astype(np.uint8)


def _check_solutions(questions: np.ndarray, answers: np.ndarray, lines: list[int], path: Path) -> None:
    """Every answer must be a valid full grid that agrees with its question's givens (vectorised)."""
    grids = answers.reshape(-1, 9, 9).astype(np.int64)
    boxes = grids.reshape(-1, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    units = np.concatenate([grids, grids.transpose(0, 2, 1), boxes], axis=1)  # [N, 27, 9]
    seen = np.zeros((len(units), 27, 10), dtype=bool)
    np.put_along_axis(seen, units, True, axis=2)
    invalid = ~seen[:, :, 1:].all(axis=(1, 2))
    if invalid.any():
        k = int(np.argmax(invalid))
        raise DataPrepError(f"{path}:{lines[k]}: answer is not a valid solved sudoku")
    clash = ((questions != 0) & (questions != answers)).any(axis=1)
    if clash.any():
        k = int(np.argmax(clash))
        raise DataPrepError(f"{path}:{lines[k]}: answer disagrees with the question's givens")


def read_csv(path: Path, min_rating: int | None = None) -> CsvPuzzles:
    """Reads a `source,question,answer,rating` CSV; rows rated below `min_rating` are dropped."""
    questions, answers, sources, ratings, lines = [], [], [], [], []
    for line, (source, question, answer, rating_text) in csv_rows(path):
        try:
            rating = _number(rating_text) if rating_text.strip() else None
        except ValueError:
            raise DataPrepError(f"{path}:{line}: rating {rating_text!r} is not a number") from None
        if min_rating is not None and (rating is None or rating < min_rating):
            continue
        questions.append(question)
        answers.append(answer)
        sources.append(source)
        ratings.append(rating)
        lines.append(line)
    q = _grids(questions, lines, path, "question", blank_ok=True)
    a = _grids(answers, lines, path, "answer", blank_ok=False)
    _check_solutions(q, a, lines, path)
    return CsvPuzzles(q, a, sources, ratings)


# ---- the builder --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sudoku", help="9x9 sudoku (generated, or from a sudoku-extreme CSV)")
    add_common_arguments(p)
    add_split_counts(p, "puzzles")
    p.add_argument("--num-aug", type=non_negative_int, default=0, help="augmented copies per train puzzle")
    g = p.add_argument_group("generation")
    g.add_argument("--givens", type=positive_int, help="exact number of givens (sets min and max)")
    g.add_argument("--min-givens", type=positive_int, help="fewest givens (default 17)")
    g.add_argument("--max-givens", type=positive_int, help="most givens (default 30)")
    g.add_argument(
        "--min-rating",
        type=non_negative_int,
        help="hardness filter: solver guesses (generated) or the CSV rating column (import)",
    )
    g.add_argument("--max-attempts", type=positive_int, default=1000, help="grids tried per puzzle")
    add_csv_arguments(p, "puzzles", "'.' or '0' blank")
    p.set_defaults(run=run)


def _givens_range(args: argparse.Namespace) -> tuple[int, int]:
    if args.givens is not None:
        if args.min_givens is not None or args.max_givens is not None:
            raise DataPrepError("--givens: give either --givens or --min-givens/--max-givens, not both")
        lo = hi = args.givens
    else:
        lo = 17 if args.min_givens is None else args.min_givens
        hi = 30 if args.max_givens is None else args.max_givens
    if lo < MIN_POSSIBLE_GIVENS:
        raise DataPrepError(f"--min-givens {lo}: a unique sudoku needs at least {MIN_POSSIBLE_GIVENS} givens")
    if hi > 80 or lo > hi:
        raise DataPrepError(f"--max-givens {hi}: must be in [--min-givens {lo}, 80]")
    return lo, hi


def _csv_puzzles(args: argparse.Namespace) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    if any(v is not None for v in (args.givens, args.min_givens, args.max_givens)):
        raise DataPrepError("--givens/--min-givens/--max-givens apply to generated puzzles, not --from-csv")
    puzzles: dict[str, list[Sample]] = {}
    for split, (table, rows) in read_csv_splits(args, lambda path: read_csv(path, args.min_rating)).items():
        inputs = table.questions[rows].astype(np.int16) + 1
        labels = table.answers[rows].astype(np.int16) + 1
        givens = np.count_nonzero(table.questions[rows], axis=1).tolist()
        metas = [
            {
                "puzzle_id": 0,
                "group_id": i,
                "givens": givens[i],
                "rating": table.ratings[r],
                "source": table.sources[r],
            }
            for i, r in enumerate(rows)
        ]
        puzzles[split] = list(zip(inputs, labels, metas))
    extra = {
        "source": "csv",
        "train_csv": str(args.from_csv),
        "test_csv": None if args.test_csv is None else str(args.test_csv),
        "test_fraction": None if args.test_csv is not None else args.test_fraction,
        "min_rating": args.min_rating,
        "rating": "the CSV's rating column",
    }
    return puzzles, extra


def _stats(puzzles: list[Sample]) -> dict[str, Any]:
    givens = [m["givens"] for _, _, m in puzzles]
    ratings = [m["rating"] for _, _, m in puzzles if m["rating"] is not None]
    return {
        "puzzles": len(puzzles),
        "mean_givens": float(np.mean(givens)) if givens else None,
        "mean_rating": float(np.mean(ratings)) if ratings else None,
    }


def run(args: argparse.Namespace, command: str) -> Path:
    if args.from_csv is None:
        if args.test_csv is not None:
            raise DataPrepError("--test-csv: needs --from-csv")
        lo, hi = _givens_range(args)
        spec = Spec(args.seed, lo, hi, args.min_rating or 0, args.max_attempts)
        puzzles = generate_splits(generate_job, spec, args, "sudoku", SPLITS)
        extra: dict[str, Any] = {
            "source": "generated",
            "min_givens": lo,
            "max_givens": hi,
            "min_rating": spec.min_rating,
            "rating": "solver guesses to exhaust the search (hrm_mega.prep.sudoku_solver.rate)",
        }
    else:
        puzzles, extra = _csv_puzzles(args)
    extra.update(num_aug=args.num_aug, stats={split: _stats(puzzles[split]) for split in SPLITS})

    return write_dataset(
        args,
        command,
        puzzles,
        1 + args.num_aug,
        partial(augmented_copy, args.seed),
        task=TASK,
        builder_version=BUILDER_VERSION,
        vocab_size=VOCAB_SIZE,
        seq_len=SEQ_LEN,
        extra=extra,
    )
