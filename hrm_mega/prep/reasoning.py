"""Reasoning tasks whose depth is a knob, for measuring test-time compute (bench/cycles_scaling.py).

    python -m hrm_mega.prep reasoning --task chain --out data/reasoning/chain --train 20000

writes DIR/train.jsonl, DIR/val.jsonl and DIR/hard.jsonl: prompt/answer records ({"prompt", "answer",
"task", "difficulty"}) for `prep text --prompt-field prompt --answer-field answer`. train and val share
the in-distribution depths (val is held out: its own random stream); hard needs more steps than any
training example. The definitions were fixed before the first bench run:

    chain    variable binding. Assignments `x=7` or `x=y`, in shuffled order, form one chain from a digit
             to the queried variable (its length is the number of hops) and distractor chains of other
             variables; the answer is the digit the query resolves to.
                 chain b=4 q=b w=2 z=q a=w : z=          -> 4        (2 hops: z -> q -> b)
             train/val 1-4 hops, hard 6-8; one or two distractor chains of 1-4 hops.
    addition a+b for operands of equal length, most significant digit first.
                 add 4821+9371=                          -> 14192
             train/val 1-5 digits, hard 7-8 digits.
    parity   the parity of a bit string.
                 parity 1 0 1 1 0 =                      -> 1
             train/val 2-12 bits, hard 16-24 bits.

Added later (2026-12-03, definition committed before its first bench run):

    relay    variable binding in definition order. As chain, but every variable is defined after the one
             it copies (chains interleaved at random, each in its own order) and the chains' digits are
             distinct, so each position can resolve its value from earlier ones, one hop per step of
             computation; the query is the last variable of the main chain.
                 relay a=7 x=2 b=a c=b y=x : c=          -> 7        (2 hops: c -> b -> a)
             train 1-3 hops; hard 4-6; val 1-6 (held out; it spans the trained and the harder depths,
             so a test-time cycle count can be chosen on it); one or two distractor chains of 1-3 hops.

Added later (2026-12-03, second session of the day; definition committed before its first bench run):

    trace    relay's chains with the intermediate values as hidden targets. Each definition is the
             defined name, its source (a digit or an earlier name) and a placeholder `?` whose hidden
             target (the record's "hidden" list, for `prep text --hidden-field hidden`) is the digit the
             defined name resolves to: the model is trained to resolve every name, at every depth, yet
             never sees a resolved value in its input. No spaces: every symbol is one token.
                 trace a7?x2?ba?cb?yx?:c=               -> 7        hidden 7 2 7 7 2 (2 hops: c -> b -> a)
             train 0-3 hops (0: the queried name is its chain's root); val 1-6; hard 4-6; one or two
             distractor chains of 0-3 hops; chains interleaved and digits distinct as in relay.
             Added with deep supervision by due cycle (2026-12-04; the prompts, answers and hidden
             targets unchanged): a "due" list for `prep text --due-field due`, the cycle from which
             each hidden target is trained (its name's depth + 1: one lookup per cycle) and last the
             answer's (the queried name's depth + 2).

Each record is a function of (seed, split, index) alone (random.Random seeded with a string, stable
across Python versions), so the files are byte-identical for the same arguments and `--train 100` is a
prefix of `--train 200`. Difficulty is the number of hops, digits or bits.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hrm_mega.prep.common import non_negative_int, output_files

Task = tuple[str, str, int]  # (prompt, answer, difficulty)
Traced = tuple[str, str, int, list[str], list[int]]  # the same with hidden targets and due cycles (trace)
# A task takes (rng, split); the first three tasks only ask whether the split is "hard".
SPLITS = ("train", "val", "hard")


def chain(rng: random.Random, split: str) -> Task:
    hard = split == "hard"
    hops = rng.randint(6, 8) if hard else rng.randint(1, 4)
    distractors = [rng.randint(1, 4) for _ in range(rng.randint(1, 2))]
    names = rng.sample(string.ascii_lowercase, hops + 1 + sum(d + 1 for d in distractors))
    assignments, target = [], None
    for length in (hops, *distractors):
        run, names = names[: length + 1], names[length + 1 :]
        value = rng.randint(0, 9)
        assignments.append(f"{run[0]}={value}")
        assignments += [f"{run[i]}={run[i - 1]}" for i in range(1, length + 1)]
        if target is None:
            target = (run[-1], str(value))
    rng.shuffle(assignments)
    query, answer = target
    return f"chain {' '.join(assignments)} : {query}=", answer, hops


def addition(rng: random.Random, split: str) -> Task:
    hard = split == "hard"
    digits = rng.randint(7, 8) if hard else rng.randint(1, 5)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)
    return f"add {a}+{b}=", str(a + b), digits


def parity(rng: random.Random, split: str) -> Task:
    hard = split == "hard"
    bits = [rng.randint(0, 1) for _ in range(rng.randint(16, 24) if hard else rng.randint(2, 12))]
    return f"parity {' '.join(map(str, bits))} =", str(sum(bits) % 2), len(bits)


RELAY_HOPS = {"train": (1, 3), "val": (1, 6), "hard": (4, 6)}
TRACE_HOPS = {"train": (0, 3), "val": (1, 6), "hard": (4, 6)}


def interleaved_chains(rng: random.Random, lengths: list[int]) -> tuple[list[tuple[str, str, str]], str]:
    """Chains of lengths[i] hops from distinct digits through distinct names, as definitions (name,
    source, value) in definition order with the chains interleaved at random; and the last name of the
    first chain (the query)."""
    names = rng.sample(string.ascii_lowercase, sum(n + 1 for n in lengths))
    digits = rng.sample(string.digits, len(lengths))
    chains = []  # each chain's definitions in order: root = digit, then each name copies the previous
    for n, digit in zip(lengths, digits):
        run, names = names[: n + 1], names[n + 1 :]
        chains.append([(run[0], digit, digit)] + [(run[i], run[i - 1], digit) for i in range(1, n + 1)])
    query = chains[0][-1][0]
    definitions = []
    while any(chains):  # interleave: the next definition of a random unfinished chain
        definitions.append(rng.choice([c for c in chains if c]).pop(0))
    return definitions, query


def relay(rng: random.Random, split: str) -> Task:
    hops = rng.randint(*RELAY_HOPS[split])
    definitions, query = interleaved_chains(
        rng, [hops] + [rng.randint(1, 3) for _ in range(rng.randint(1, 2))]
    )
    answer = next(value for name, _, value in definitions if name == query)
    return f"relay {' '.join(f'{name}={source}' for name, source, _ in definitions)} : {query}=", answer, hops


def trace(rng: random.Random, split: str) -> Traced:
    hops = rng.randint(*TRACE_HOPS[split])
    definitions, query = interleaved_chains(
        rng, [hops] + [rng.randint(0, 3) for _ in range(rng.randint(1, 2))]
    )
    answer = next(value for name, _, value in definitions if name == query)
    prompt = "trace " + "".join(f"{name}{source}?" for name, source, _ in definitions) + f":{query}="
    depth: dict[str, int] = {}  # hops from a name to its chain's digit
    for name, source, _ in definitions:
        depth[name] = 0 if source.isdigit() else depth[source] + 1
    # Due cycles (prep text --due-field): one lookup per cycle, so a name of depth d is due at cycle
    # d + 1 and the answer, one lookup past the queried name, at depth + 2.
    due = [depth[name] + 1 for name, _, _ in definitions] + [depth[query] + 2]
    return prompt, answer, hops, [value for _, _, value in definitions], due


TASKS: dict[str, Callable[[random.Random, str], Task | Traced]] = {
    "chain": chain,
    "addition": addition,
    "parity": parity,
    "relay": relay,
    "trace": trace,
}


def records(task: str, split: str, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` records of one split; record i is a function of (task, seed, split, i)."""
    out = []
    for i in range(count):
        rng = random.Random(f"hrm-mega reasoning/{task}/{seed}/{split}/{i}")
        prompt, answer, difficulty, *traced = TASKS[task](rng, split)
        record = {"prompt": prompt, "answer": answer, "task": task, "difficulty": difficulty}
        out.append({**record, "hidden": traced[0], "due": traced[1]} if traced else record)
    return out


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reasoning",
        help="write a depth-controlled reasoning task (chain, addition, parity, relay, trace) as JSONL",
    )
    p.add_argument("--task", choices=list(TASKS), required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory (train/val/hard.jsonl)")
    p.add_argument("--train", type=non_negative_int, default=20_000, help="train records (default 20000)")
    p.add_argument("--val", type=non_negative_int, default=1000, help="validation records (default 1000)")
    p.add_argument("--hard", type=non_negative_int, default=1000, help="harder-split records (default 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the files already in --out")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    files = output_files(args.out, [f"{split}.jsonl" for split in SPLITS], args.overwrite)
    for split, path in zip(SPLITS, files.values()):
        rows = records(args.task, split, getattr(args, split), args.seed)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return args.out
