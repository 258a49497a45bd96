"""Prompts for RL on a language model: arithmetic questions generated from a seed, or users' JSONL files.

ArithmeticPrompts: a question is `a+b=`, `a-b=` or `a*b=` in the format of the demo corpus (data_prep/corpus.py): each
operand has 1..max_digits digits with the digit count uniform, so small numbers are common; products
use operands of up to max_digits - 1 and max_digits - 2 digits (3 x 2 for the corpus's 4), and the
answer is the exact integer (hrm_mega.rl.rewards.arithmetic_answer checks it). Every question is a
function of (seed, split, index) alone, so every rank and a resumed run see the same ones. The `test`
questions form the held-out set; a `train` question that happens to be in it is drawn again. With a
`pool` of N > 0, training cycles through the first N train questions instead of drawing new ones every
step (a fixed prompt set, as an RL dataset would be).

JsonlPrompts: (prompt, answer) records of the user's file, walked in seeded epochs (see the class).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.rl.rewards import arithmetic_answer

STATE_FORMAT = "hrm-mega/rl-arithmetic/1"
JSONL_STATE_FORMAT = "hrm-mega/rl-jsonl/1"
Question = tuple[str, str, dict[str, Any]]  # (prompt, reference answer, the record's other fields)


class ArithmeticPrompts:
    """Train questions by (step, index) and a fixed held-out eval set. Duck-types the bits of SampleStream
    the Trainer uses (progress, state_dict, load_state_dict, close): it has no position to save, since
    the questions of a step follow from the step."""

    def __init__(
        self, seed: int, ops: list[str], max_digits: int, eval_count: int, per_step: int, pool: int = 0
    ) -> None:
        self.seed, self.ops, self.max_digits, self.per_step = seed, list(ops), max_digits, per_step
        self.pool = pool
        self.eval_set = [self.question("test", i) for i in range(eval_count)]
        self._held_out = {prompt for prompt, _ in self.eval_set}
        self.handed_out = 0

    def question(self, split: str, index: int, attempt: int = 0) -> tuple[str, str]:
        """(prompt, answer), e.g. ("503-278=", "225")."""
        rng = random.Random(f"hrm-mega rl-arithmetic/{self.seed}/{split}/{index}/{attempt}")
        op = rng.choice(self.ops)
        digits = (
            (self.max_digits, self.max_digits) if op != "*" else (self.max_digits - 1, self.max_digits - 2)
        )
        a, b = (_number(rng, max(d, 1)) for d in digits)
        prompt = f"{a}{op}{b}="
        answer = arithmetic_answer(prompt)
        assert answer is not None
        return prompt, answer

    def train_questions(self, step: int, start: int, count: int) -> list[tuple[str, str]]:
        """Questions start .. start+count-1 of training step `step` (none of them held out)."""
        out = []
        for i in range(start, start + count):
            index, attempt = step * self.per_step + i, 0
            index = index % self.pool if self.pool else index
            q = self.question("train", index)
            while q[0] in self._held_out:
                attempt += 1
                q = self.question("train", index, attempt)
            out.append(q)
        self.handed_out += count
        return out

    @property
    def progress(self) -> dict[str, float | int]:
        return {"epoch": 0.0, "samples": self.handed_out}  # generated questions have no epochs

    def state_dict(self) -> dict[str, Any]:
        # partition_state keeps SampleStream.merge_state_dicts working when a run resumes at another DP size
        return {"format": STATE_FORMAT, "seed": self.seed, "ops": self.ops, "max_digits": self.max_digits,
                "pool": self.pool, "partition_state": {}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("format", "seed", "ops", "max_digits", "pool"):
            if (
                state.get(key, 0 if key == "pool" else None) != mine[key]
            ):  # no "pool": saved before it existed
                raise ValueError(
                    f"prompt state: {key}={state.get(key)!r} but this run has {key}={mine[key]!r}; "
                    "resume with the same train.seed and rl.arithmetic_* settings"
                )

    @staticmethod
    def merge_state_dicts(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state from every data-parallel rank's (a resume at another dp): they are all alike, since
        the questions of a step follow from the step."""
        return states[0]

    def close(self) -> None:
        return None


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


class JsonlPrompts:
    """Questions from a JSONL file of {prompt_field, answer_field, ...} records (other fields reach the
    rewards as `metadata`), for example `hrm-mega prep puzzle-text` or `prep corpus --format jsonl`
    output. Training walks the file in epochs, each in an order shuffled by (seed, epoch): question i of
    step s is number s * per_step + i of that sequence, a function of (seed, step, i) alone, so every
    rank and a resumed run see the same ones, as with ArithmeticPrompts. The held-out set is the first
    `eval_count` records of the eval file. The file's content is fingerprinted into the state, so a
    resume refuses a changed file."""

    def __init__(
        self, path: str, eval_path: str, *, seed: int, per_step: int, eval_count: int,
        prompt_field: str = "prompt", answer_field: str = "answer",
    ) -> None:  # fmt: skip
        self.seed, self.per_step = seed, per_step
        self.records = read_questions(path, prompt_field, answer_field, "rl.prompt_file")
        self.eval_set = read_questions(eval_path, prompt_field, answer_field, "rl.eval_prompt_file")[
            :eval_count
        ]
        self.digest = _fingerprint(self.records)
        self.handed_out = 0

    def train_questions(self, step: int, start: int, count: int) -> list[Question]:
        out = []
        for i in range(start, start + count):
            epoch, position = divmod(step * self.per_step + i, len(self.records))
            order = np.random.default_rng([self.seed, 0x726C, epoch]).permutation(len(self.records))  # "rl"
            out.append(self.records[int(order[position])])
        self.handed_out += count
        return out

    @property
    def progress(self) -> dict[str, float | int]:
        return {"epoch": self.handed_out / len(self.records), "samples": self.handed_out}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": JSONL_STATE_FORMAT,
            "seed": self.seed,
            "records": self.digest,
            "partition_state": {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("format", "seed", "records"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"prompt state: {key} differs from this run's ({state.get(key)!r} vs {mine[key]!r}); "
                    "resume with the same train.seed and rl.prompt_file"
                )

    @staticmethod
    def merge_state_dicts(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state from every data-parallel rank's (a resume at another dp): they are all alike, since
        the questions of a step follow from the step."""
        return states[0]

    def close(self) -> None:
        return None


def read_questions(path: str, prompt_field: str, answer_field: str, option: str) -> list[Question]:
    """(prompt, answer, other fields) of every record; errors name the option, file and line."""
    questions = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{option}={path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in (prompt_field, answer_field)
            ):
                raise ValueError(
                    f"{option}={path}:{lineno}: expected an object with string fields {prompt_field!r} "
                    f"and {answer_field!r} (rl.prompt_field, rl.answer_field)"
                )
            rest = {k: v for k, v in record.items() if k not in (prompt_field, answer_field)}
            questions.append((record[prompt_field], record[answer_field], rest))
    if not questions:
        raise ValueError(f"{option}={path}: holds no records")
    return questions


def _fingerprint(records: list[Question]) -> str:
    digest = hashlib.sha256()
    for prompt, answer, _ in records:
        digest.update(json.dumps([prompt, answer]).encode())
    return digest.hexdigest()[:16]
