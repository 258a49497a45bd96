"""A small synthetic text corpus for the LM demo and tests: arithmetic and simple algorithmic tasks.

Each document is one task instance on one line, for example

    4821+37=4858          503-278=225          23*47=1081
    reverse: abc -> cba   copy: xkq -> xkq     sort: 3 1 2 -> 1 2 3
    count a: abcab -> 2   parity: 1 0 1 1 -> 1

written to DIR/train.txt and DIR/test.txt (UTF-8, one document per line), the input format of
`python -m hrm_mega.prep text`. With `--format jsonl`, DIR/train.jsonl and DIR/test.jsonl hold the same
instances as {"prompt": "4821+37=", "answer": "4858", "task": "add", "difficulty": 4} (the document is
prompt + answer), for `prep text --prompt-field prompt --answer-field answer`: answer-only loss and
exact-match evaluation. Every document draws its task uniformly from TASKS, or from the subset
`--tasks` names; `--max-digits` bounds the arithmetic operands (default 4).

Determinism: split s draws from one `random.Random` seeded by (seed, s), one document after another, so
the same seed gives the same bytes and `--docs 100` is a prefix of `--docs 200`. The splits come from
different streams; short tasks (a 2-bit parity) can occur in both, which is fine for a demo corpus.

    python -m hrm_mega.prep corpus --out data/corpus --docs 20000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hrm_mega.prep.common import SPLITS, DataPrepError, non_negative_int, output_files


def _number(rng: random.Random, max_digits: int) -> int:
    """A number of 1..max_digits digits, the digit count uniform (so small numbers are common too)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _letters(rng: random.Random, shortest: int, longest: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(shortest, longest)))


Task = tuple[str, str, int]  # (prompt, answer, difficulty); the document is prompt + answer


def _digits(*numbers: int) -> int:
    return max(len(str(abs(n))) for n in numbers)


def _add(rng: random.Random, digits: int) -> Task:
    a, b = _number(rng, digits), _number(rng, digits)
    return f"{a}+{b}=", f"{a + b}", _digits(a, b)


def _sub(rng: random.Random, digits: int) -> Task:
    a, b = _number(rng, digits), _number(rng, digits)
    return f"{a}-{b}=", f"{a - b}", _digits(a, b)


def _mul(rng: random.Random, digits: int) -> Task:
    a, b = _number(rng, max(digits - 1, 1)), _number(rng, max(digits - 2, 1))  # 3 x 2 digits at 4
    return f"{a}*{b}=", f"{a * b}", _digits(a, b)


def _reverse(rng: random.Random, _: int) -> Task:
    text = _letters(rng, 2, 8)
    return f"reverse: {text} ->", f" {text[::-1]}", len(text)


def _copy(rng: random.Random, _: int) -> Task:
    text = _letters(rng, 2, 8)
    return f"copy: {text} ->", f" {text}", len(text)


def _sort(rng: random.Random, _: int) -> Task:
    values = [rng.randint(0, 9) for _ in range(rng.randint(2, 7))]
    return f"sort: {' '.join(map(str, values))} ->", f" {' '.join(map(str, sorted(values)))}", len(values)


def _count(rng: random.Random, _: int) -> Task:
    text, letter = _letters(rng, 3, 12, "abc"), rng.choice("abc")
    return f"count {letter}: {text} ->", f" {text.count(letter)}", len(text)


def _parity(rng: random.Random, _: int) -> Task:
    bits = [rng.randint(0, 1) for _ in range(rng.randint(2, 8))]
    return f"parity: {' '.join(map(str, bits))} ->", f" {sum(bits) % 2}", len(bits)


# name -> task(rng, max_digits); max_digits bounds the arithmetic operands
TASKS: dict[str, Callable[[random.Random, int], Task]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "reverse": _reverse,
    "copy": _copy,
    "sort": _sort,
    "count": _count,
    "parity": _parity,
}


def generate_records(
    seed: int, split: str, count: int, tasks: list[str] | None = None, max_digits: int = 4
) -> list[dict[str, Any]]:
    """`count` task instances of `split` as {"prompt", "answer", "task", "difficulty"}, each task drawn
    uniformly from `tasks` (default: all of TASKS), with arithmetic operands of 1..max_digits digits
    (products: max_digits - 1 by max_digits - 2). Difficulty: operand digits, or the input's length."""
    # str seeds are hashed with sha512 by random.Random: stable across runs and Python versions
    rng = random.Random(f"hrm-mega corpus/{seed}/{split}")
    names = list(TASKS) if tasks is None else list(tasks)
    records = []
    for _ in range(count):
        name = rng.choice(names)
        prompt, answer, difficulty = TASKS[name](rng, max_digits)
        records.append({"prompt": prompt, "answer": answer, "task": name, "difficulty": difficulty})
    return records


def generate_documents(
    seed: int, split: str, count: int, tasks: list[str] | None = None, max_digits: int = 4
) -> list[str]:
    """generate_records' instances as text documents (prompt + answer)."""
    return [r["prompt"] + r["answer"] for r in generate_records(seed, split, count, tasks, max_digits)]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "corpus", help="write a synthetic text corpus (arithmetic, reverse, sort, ...) as train/test .txt"
    )
    p.add_argument("--format", choices=("txt", "jsonl"), default="txt",
                   help="txt: one document per line; jsonl: prompt/answer records (default txt)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train.txt, test.txt)")
    p.add_argument("--docs", type=non_negative_int, default=20_000, help="train documents (default 20000)")
    p.add_argument("--test-docs", type=non_negative_int, help="test documents (default: --docs / 10)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    p.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)} (default: all)"
    )
    p.add_argument(
        "--max-digits", type=non_negative_int, default=4,
        help="digits of the arithmetic operands, 1..N (products: N-1 by N-2; default 4)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace train.txt/test.txt already in --out")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    counts = {"train": args.docs, "test": args.docs // 10 if args.test_docs is None else args.test_docs}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DataPrepError(
            f"--tasks {args.tasks!r}: expected a comma-separated subset of {', '.join(TASKS)}"
        )
    if args.max_digits < 1:
        raise DataPrepError(f"--max-digits {args.max_digits}: must be >= 1")
    files = output_files(args.out, [f"{split}.{args.format}" for split in SPLITS], args.overwrite)
    paths = dict(zip(SPLITS, files.values()))
    for split in SPLITS:
        records = generate_records(args.seed, split, counts[split], tasks, args.max_digits)
        lines = (json.dumps(r) if args.format == "jsonl" else r["prompt"] + r["answer"] for r in records)
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return args.out
