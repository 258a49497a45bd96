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
import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.augment import sudoku_augment
from hrm_mega.prep.common import (
    SPLITS,
    DataPrepError,
    DatasetWriter,
    Sample,
    add_common_arguments,
    fraction,
    generate_splits,
    item_rng,
    non_negative_int,
    pick_rows,
    positive_int,
    write_order,
    write_split,
)
from hrm_mega.prep.sudoku_solver import GenerationError, generate

TASK = "sudoku"
BUILDER_VERSION = "1"
VOCAB_SIZE = 11
SEQ_LEN = 81
MIN_POSSIBLE_GIVENS = 17  # no sudoku with fewer givens has a unique solution
CSV_HEADER = ("source", "question", "answer", "rating")


@dataclass(frozen=True)
class Spec:
    """What a worker needs to make one puzzle."""

    seed: int
    num_aug: int
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


def samples_in_write_order(spec: Spec, split: str, puzzles: list[Sample]) -> Iterator[Sample]:
    """Every puzzle plus, in the train split, `num_aug` augmented copies (same group_id), in write order.

    Copy `aug` of puzzle `i` draws from its own generator (seed, split, i, aug), so it does not depend
    on the order in which samples are written.
    """
    copies = 1 + (spec.num_aug if split == "train" else 0)
    for position in write_order(spec.seed, split, len(puzzles) * copies).tolist():
        index, aug = divmod(position, copies)
        inputs, labels, meta = puzzles[index]
        if aug:
            inputs, labels = sudoku_augment(inputs, labels, item_rng(spec.seed, split, index, stream=aug))
        yield inputs, labels, {**meta, "aug": aug}


# ---- CSV import -----------------------------------------------------------------------------------------


@dataclass
class CsvPuzzles:
    questions: np.ndarray  # [N, 81] uint8 digits, 0 blank
    answers: np.ndarray  # [N, 81] uint8 digits
    sources: list[str]
    ratings: list[int | float | None]


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
    if not path.is_file():
        raise DataPrepError(f"{path}: no such file")
    questions, answers, sources, ratings, lines = [], [], [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
            raise DataPrepError(f"{path}:1: header must be {','.join(CSV_HEADER)}, got {header}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(CSV_HEADER):
                raise DataPrepError(f"{path}:{reader.line_num}: expected 4 fields, got {len(row)}")
            source, question, answer, rating_text = row
            try:
                rating = _number(rating_text) if rating_text.strip() else None
            except ValueError:
                raise DataPrepError(
                    f"{path}:{reader.line_num}: rating {rating_text!r} is not a number"
                ) from None
            if min_rating is not None and (rating is None or rating < min_rating):
                continue
            questions.append(question)
            answers.append(answer)
            sources.append(source)
            ratings.append(rating)
            lines.append(reader.line_num)
    q = _grids(questions, lines, path, "question", blank_ok=True)
    a = _grids(answers, lines, path, "answer", blank_ok=False)
    _check_solutions(q, a, lines, path)
    return CsvPuzzles(q, a, sources, ratings)


# ---- the builder --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sudoku", help="9x9 sudoku (generated, or from a sudoku-extreme CSV)")
    add_common_arguments(p)
    p.add_argument("--train", type=non_negative_int, help="train puzzles (default 1000; CSV: all rows)")
    p.add_argument("--test", type=non_negative_int, help="test puzzles (default 200; CSV: all rows)")
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
    c = p.add_argument_group("CSV import (header source,question,answer,rating; '.' or '0' blank)")
    c.add_argument("--from-csv", type=Path, help="import puzzles instead of generating them")
    c.add_argument("--test-csv", type=Path, help="test split CSV (default: split off --test-fraction)")
    c.add_argument("--test-fraction", type=fraction, default=0.1, help="test share without --test-csv")
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
    tables = {"train": read_csv(args.from_csv, args.min_rating)}
    tables["test"] = tables["train"] if args.test_csv is None else read_csv(args.test_csv, args.min_rating)
    picks = pick_rows(
        args.seed,
        len(tables["train"].sources),
        None if args.test_csv is None else len(tables["test"].sources),
        args.test_fraction,
        {"train": args.train, "test": args.test},
    )
    puzzles: dict[str, list[Sample]] = {}
    for split in SPLITS:
        table, rows = tables[split], picks[split].tolist()
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
        spec = Spec(args.seed, args.num_aug, lo, hi, args.min_rating or 0, args.max_attempts)
        puzzles = generate_splits(generate_job, spec, args, "sudoku", SPLITS)
        extra: dict[str, Any] = {
            "source": "generated",
            "min_givens": lo,
            "max_givens": hi,
            "min_rating": spec.min_rating,
            "rating": "solver guesses to exhaust the search (hrm_mega.prep.sudoku_solver.rate)",
        }
    else:
        spec = Spec(args.seed, args.num_aug)
        puzzles, extra = _csv_puzzles(args)
    extra.update(num_aug=args.num_aug, stats={split: _stats(puzzles[split]) for split in SPLITS})

    writer = DatasetWriter(args.out, VOCAB_SIZE, SEQ_LEN, args.samples_per_shard, args.overwrite)
    for split in SPLITS:
        total = len(puzzles[split]) * (1 + (args.num_aug if split == "train" else 0))
        write_split(writer, split, samples_in_write_order(spec, split, puzzles[split]), total, args.quiet)
    return writer.finish(
        task=TASK,
        builder_version=BUILDER_VERSION,
        seed=args.seed,
        command=command,
        num_puzzle_identifiers=1,
        extra=extra,
    )
