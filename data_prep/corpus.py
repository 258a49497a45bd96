"""A small synthetic text corpus for the LM demo and tests: arithmetic and simple algorithmic tasks.

Each document is one task instance on one line, for example

    4821+37=4858          503-278=225          23*47=1081
    reverse: abc -> cba   copy: xkq -> xkq     sort: 3 1 2 -> 1 2 3
    count a: abcab -> 2   parity: 1 0 1 1 -> 1

written to DIR/train.txt and DIR/test.txt (UTF-8, one document per line), the input format of
`python -m data_prep text`. Every document draws its task uniformly from TASKS.

Determinism: split s draws from one `random.Random` seeded by (seed, s), one document after another, so
the same seed gives the same bytes and `--docs 100` is a prefix of `--docs 200`. The splits come from
different streams; short tasks (a 2-bit parity) can occur in both, which is fine for a demo corpus.

    python -m data_prep corpus --out data/corpus --docs 20000 --seed 0
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.common import SPLITS, DataPrepError, non_negative_int


def _number(rng: random.Random, max_digits: int) -> int:
    """A number of 1..max_digits digits, the digit count uniform (so small numbers are common too)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _letters(rng: random.Random, shortest: int, longest: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(shortest, longest)))


def _add(rng: random.Random) -> str:
    a, b = _number(rng, 4), _number(rng, 4)
    return f"{a}+{b}={a + b}"


def _sub(rng: random.Random) -> str:
    a, b = _number(rng, 4), _number(rng, 4)
    return f"{a}-{b}={a - b}"


def _mul(rng: random.Random) -> str:
    a, b = _number(rng, 3), _number(rng, 2)
    return f"{a}*{b}={a * b}"


def _reverse(rng: random.Random) -> str:
    text = _letters(rng, 2, 8)
    return f"reverse: {text} -> {text[::-1]}"


def _copy(rng: random.Random) -> str:
    text = _letters(rng, 2, 8)
    return f"copy: {text} -> {text}"


def _sort(rng: random.Random) -> str:
    values = [rng.randint(0, 9) for _ in range(rng.randint(2, 7))]
    return f"sort: {' '.join(map(str, values))} -> {' '.join(map(str, sorted(values)))}"


def _count(rng: random.Random) -> str:
    text, letter = _letters(rng, 3, 12, "abc"), rng.choice("abc")
    return f"count {letter}: {text} -> {text.count(letter)}"


def _parity(rng: random.Random) -> str:
    bits = [rng.randint(0, 1) for _ in range(rng.randint(2, 8))]
    return f"parity: {' '.join(map(str, bits))} -> {sum(bits) % 2}"


TASKS: dict[str, Callable[[random.Random], str]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "reverse": _reverse,
    "copy": _copy,
    "sort": _sort,
    "count": _count,
    "parity": _parity,
}


def generate_documents(seed: int, split: str, count: int) -> list[str]:
    """`count` documents of `split`, each a task drawn uniformly from TASKS."""
    # str seeds are hashed with sha512 by random.Random: stable across runs and Python versions
    rng = random.Random(f"hrm-mega corpus/{seed}/{split}")
    names = list(TASKS)
    return [TASKS[rng.choice(names)](rng) for _ in range(count)]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "corpus", help="write a synthetic text corpus (arithmetic, reverse, sort, ...) as train/test .txt"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train.txt, test.txt)")
    p.add_argument("--docs", type=non_negative_int, default=20_000, help="train documents (default 20000)")
    p.add_argument("--test-docs", type=non_negative_int, help="test documents (default: --docs / 10)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace train.txt/test.txt already in --out")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    counts = {"train": args.docs, "test": args.docs // 10 if args.test_docs is None else args.test_docs}
    if args.out.exists() and not args.out.is_dir():
        raise DataPrepError(f"--out {args.out}: exists and is not a directory")
    paths = {split: args.out / f"{split}.txt" for split in SPLITS}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        raise DataPrepError(
            f"--out {args.out}: already holds {existing[0].name}; pass --overwrite to replace it"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        documents = generate_documents(args.seed, split, counts[split])
        paths[split].write_text("".join(doc + "\n" for doc in documents), encoding="utf-8")
    return args.out
