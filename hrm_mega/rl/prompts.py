"""Arithmetic prompts for RL on a language model, generated on the spot from a seed (nothing to download).

A question is `a+b=`, `a-b=` or `a*b=` in the format of the demo corpus (data_prep/corpus.py): each
operand has 1..max_digits digits with the digit count uniform, so small numbers are common; products
use operands of up to max_digits - 1 and max_digits - 2 digits (3 x 2 for the corpus's 4), and the
answer is the exact integer (hrm_mega.rl.rewards.arithmetic_answer checks it). Every question is a
function of (seed, split, index) alone, so every rank and a resumed run see the same ones. The `test`
questions form the held-out set; a `train` question that happens to be in it is drawn again. With a
`pool` of N > 0, training cycles through the first N train questions instead of drawing new ones every
step (a fixed prompt set, as an RL dataset would be).
"""

from __future__ import annotations

import random
from typing import Any

from hrm_mega.rl.rewards import arithmetic_answer

STATE_FORMAT = "hrm-mega/rl-arithmetic/1"


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

    def close(self) -> None:
        return None


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
