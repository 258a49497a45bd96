"""Rewards for RL post-training: a registry of named reward functions, the built-in ones, and
halting-aware shaping.

A reward function takes keyword arguments only and returns one fp32 reward per sample, [N]. A trainer
calls every configured reward with everything it knows about the samples, and each reward reads what it
needs and ignores the rest (`**_`). The names a trainer passes:

    puzzles   tokens [N, seq_len] (sampled cells), inputs [N, seq_len], labels [N, seq_len], segments [N]
    text      prompts list[str], completions list[str] (decoded, without special tokens),
              finished [N] bool (the completion ended with eos), answers list[str] (when the data has them)

Add a reward with the decorator (its module named in rl.reward_modules):

    @register_reward("my_reward")
    def my_reward(*, completions: list[str], **_: object) -> torch.Tensor: ...

or name any importable function as `module:function` in rl.rewards (`mypkg.rewards:exact: 1.0`), as
TRL's reward_funcs take callables. Each call has a time limit (combine_rewards' `timeout`); a reward that
raises, runs over it or returns the wrong shape stops the run with one line naming it.

Built in (token layouts are HRM's, docs/data_format.md; rewards need no labels):
    sudoku_valid            1 if the grid is a solved sudoku that keeps the puzzle's givens
    maze_valid              1 if the marked cells form a simple path from S to G through open cells
    maze_path_length        shortest / marked path length for a valid path (1 = a shortest path), else 0
    arithmetic_exact_match  1 if the completion's answer is the prompt's `a+b=`, `a-b=` or `a*b=` result
    answer_exact_match      1 if the completion, surrounding whitespace aside, is the reference answer
    answer_format           1 if the completion is a single integer (and ended with eos, when known)

Halting-aware shaping: `shape_for_compute(reward, compute_fraction(used, max), lam)` is
reward - lam * used / max, with `used` the ACT segments of a puzzle sample or the H cycles of a text
sample's tokens (averaged over its tokens and blocks).
"""

from __future__ import annotations

import importlib
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

RewardFn = Callable[..., torch.Tensor]


class RewardError(ValueError):
    """A reward that does not exist, or samples a reward cannot score; the message is one line."""


_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: registers a reward function under `name` (which must be new)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise RewardError(f"a reward named {name!r} is already registered ({_REWARDS[name].__module__})")
        _REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """The reward registered under `name`, or the function a `module:function` name points at."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(
                f"reward {name!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?"
            ) from None
        fn = getattr(module, attribute, None)
        if not callable(fn):
            raise RewardError(f"reward {name!r}: {module_name} has no function {attribute!r}")
        return fn
    if name not in _REWARDS:
        raise RewardError(
            f"unknown reward {name!r}; known rewards: {', '.join(reward_names())} (or name a function as "
            "module:function)"
        )
    return _REWARDS[name]


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def combine_rewards(
    weights: Mapping[str, float], *, timeout: float = 0.0, **samples: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_name weight * reward(**samples) -> (total [N] fp32, each reward [N] by name). Each call may
    take at most `timeout` seconds (0: no limit; enforced from the main thread only, see call_reward)."""
    if not weights:
        raise RewardError(
            "no rewards configured; name at least one (known rewards: " + ", ".join(reward_names()) + ")"
        )
    parts = {name: call_reward(name, timeout, samples) for name in weights}
    total = sum(weights[name] * parts[name] for name in weights)
    return total, parts


class _RewardTimeout(BaseException):  # not an Exception: a reward's own `except Exception` cannot swallow it
    pass


def call_reward(name: str, timeout: float, samples: dict[str, Any]) -> torch.Tensor:
    """One reward's scores as an fp32 [N] tensor, or a one-line RewardError naming the reward when it
    raises, runs over `timeout` seconds or returns something else. The time limit is a SIGALRM timer,
    which interrupts Python code (and sleeps) but only exists in the main thread; elsewhere the call
    runs without one. A timer someone else had set (a test runner's) is put back with its remaining
    time, and still fires first if it is due first."""
    fn = get_reward(name)
    if not (timeout > 0 and threading.current_thread() is threading.main_thread()):
        return _checked(name, _call(name, fn, samples, timeout), samples)
    start, returned = time.monotonic(), []
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)

    def expired(signum: int, frame: Any) -> None:
        if time.monotonic() - start >= timeout * 0.999:
            if not returned:  # not in the instant between the reward's return and the timer's reset
                raise _RewardTimeout
            return
        if callable(previous):  # the outer timer was due first
            previous(signum, frame)

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        signal.setitimer(signal.ITIMER_REAL, min(timeout, outer_delay) if outer_delay > 0 else timeout)
        scores = _call(name, fn, samples, timeout)
        returned.append(True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
    return _checked(name, scores, samples)


def _call(name: str, fn: RewardFn, samples: dict[str, Any], timeout: float) -> Any:
    try:
        return fn(**samples)
    except _RewardTimeout:
        raise RewardError(f"reward {name!r} took longer than {timeout:g} s (rl.reward_timeout)") from None
    except RewardError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        raise RewardError(
            f"reward {name!r} raised {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
        ) from None


def _checked(name: str, scores: Any, samples: dict[str, Any]) -> torch.Tensor:
    n = _sample_count(samples)
    if isinstance(scores, (list, tuple)) and all(isinstance(v, (int, float)) for v in scores):
        scores = torch.tensor(
            scores, dtype=torch.float32
        )  # a list of floats, as TRL's reward functions return
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RewardError(f"reward {name!r} returned {got}; expected a tensor of one score per sample [{n}]")
    return scores.float()


def _sample_count(samples: dict[str, Any]) -> int:
    for key in ("completions", "tokens"):
        if key in samples:
            return len(samples[key])
    return len(next(iter(samples.values())))


# --------------------------------------------------------------------------------------------------
# Halting-aware shaping
# --------------------------------------------------------------------------------------------------


def compute_fraction(
    used: torch.Tensor, maximum: float | torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The share of the compute budget each sample used, [N] fp32.

    used: ACT segments [N], or H cycles per token [N, T] or [N, T, G] (G blocks); maximum: the budget,
    a number or one per sample [N] (halt_max_steps, max_cycles); mask [N, T]: the real tokens (cycles
    are averaged over them and over the blocks; a sample without tokens used 0).
    """
    u = used.float()
    if u.dim() > 1:
        if u.dim() == 3:
            u = u.mean(dim=2)  # over blocks
        m = torch.ones_like(u, dtype=torch.bool) if mask is None else mask.bool()
        if m.shape != u.shape:
            raise RewardError(f"mask has shape {tuple(m.shape)}; expected {tuple(u.shape)} like the cycles")
        u = torch.where(m, u, 0.0).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    top = torch.as_tensor(maximum, dtype=torch.float32, device=u.device)
    if bool((top <= 0).any()):
        raise RewardError(f"the compute budget (maximum={maximum}) must be > 0")
    return u / top


def shape_for_compute(reward: torch.Tensor, fraction: torch.Tensor, lam: float) -> torch.Tensor:
    """reward - lam * fraction: with lam > 0 a sample that reaches the same reward with less compute
    (fewer ACT segments, fewer H cycles per token) gets more."""
    if lam < 0:
        raise RewardError(f"lam={lam} must be >= 0 (it is a penalty on compute)")
    return reward.float() - lam * fraction.float()


# --------------------------------------------------------------------------------------------------
# Sudoku
# --------------------------------------------------------------------------------------------------

SUDOKU_FIRST_DIGIT = 2  # digits 1-9 are tokens 2-10


def _sudoku_units() -> torch.Tensor:
    """[27, 9] cell indices of the 9 rows, 9 columns and 9 boxes."""
    cells = torch.arange(81).view(9, 9)
    boxes = cells.view(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9)
    return torch.cat((cells, cells.T, boxes))


_UNITS = _sudoku_units()


@register_reward("sudoku_valid")
def sudoku_valid(*, tokens: torch.Tensor, inputs: torch.Tensor, **_: Any) -> torch.Tensor:
    """1 where tokens [N, 81] hold a digit in every cell, each digit once in every row, column and box,
    and every given of inputs [N, 81] (a digit token there) unchanged; else 0."""
    if tokens.shape != inputs.shape or tokens.dim() != 2 or tokens.shape[1] != 81:
        raise RewardError(
            f"sudoku_valid: tokens {tuple(tokens.shape)} and inputs {tuple(inputs.shape)} must both be [N, 81]"
        )
    digits = tokens.long() - SUDOKU_FIRST_DIGIT  # 0..8 for digits
    all_digits = ((digits >= 0) & (digits < 9)).all(dim=1)
    units = digits.clamp(0, 8)[:, _UNITS.to(tokens.device)]  # [N, 27, 9]
    seen = torch.zeros(*units.shape[:2], 9, dtype=torch.bool, device=tokens.device)
    seen.scatter_(2, units, True)
    all_units = seen.all(dim=(1, 2))  # 9 cells showing 9 distinct digits
    given = inputs.long() >= SUDOKU_FIRST_DIGIT
    givens_kept = (~given | (tokens.long() == inputs.long())).all(dim=1)
    return (all_digits & all_units & givens_kept).float()


# --------------------------------------------------------------------------------------------------
# Maze
# --------------------------------------------------------------------------------------------------

MAZE_WALL, MAZE_OPEN, MAZE_START, MAZE_GOAL, MAZE_PATH = 1, 2, 3, 4, 5


def maze_path(tokens: torch.Tensor, inputs: torch.Tensor) -> tuple[bool, int, int]:
    """One maze: (valid, marked path length in moves, shortest path length in moves; -1 if none).

    Valid: walls, S and G are as in inputs; the other open cells are open or marked path ('o'); and the
    marked cells with S and G form one simple path S -> G: S and G each touch exactly one of them, every
    marked cell exactly two, and all are connected. (A walk that touches itself is ambiguous on the grid
    and never shortest, so it is invalid.)
    """
    n = int(round(inputs.numel() ** 0.5))
    if n * n != inputs.numel() or tokens.shape != inputs.shape:
        raise RewardError(
            f"maze: tokens {tuple(tokens.shape)} and inputs {tuple(inputs.shape)} must be one square grid"
        )
    grid, maze = tokens.view(n, n).tolist(), inputs.view(n, n).tolist()
    starts = [(r, c) for r in range(n) for c in range(n) if maze[r][c] == MAZE_START]
    goals = [(r, c) for r in range(n) for c in range(n) if maze[r][c] == MAZE_GOAL]
    if len(starts) != 1 or len(goals) != 1:
        raise RewardError(f"maze: inputs need exactly one S and one G, found {len(starts)} and {len(goals)}")
    start, goal = starts[0], goals[0]
    shortest = _bfs_distance(maze, start, goal)

    def neighbours(r: int, c: int) -> list[tuple[int, int]]:
        return [
            (r + dr, c + dc)
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= r + dr < n and 0 <= c + dc < n
        ]

    for r in range(n):
        for c in range(n):
            want, got = maze[r][c], grid[r][c]
            if got != want and not (want == MAZE_OPEN and got == MAZE_PATH):
                return False, 0, shortest
    on_path = {(r, c) for r in range(n) for c in range(n) if grid[r][c] in (MAZE_PATH, MAZE_START, MAZE_GOAL)}
    for cell in on_path:
        degree = sum(nb in on_path for nb in neighbours(*cell))
        if degree != (1 if cell in (start, goal) else 2):
            return False, 0, shortest
    reached, todo = {start}, [start]  # connected: no separate loop of marked cells
    while todo:
        for nb in neighbours(*todo.pop()):
            if nb in on_path and nb not in reached:
                reached.add(nb)
                todo.append(nb)
    if reached != on_path:
        return False, 0, shortest
    return True, len(on_path) - 1, shortest


def _bfs_distance(maze: list[list[int]], start: tuple[int, int], goal: tuple[int, int]) -> int:
    n = len(maze)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            return dist[goal]
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < n and 0 <= nc < n and maze[nr][nc] != MAZE_WALL and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return -1


def _maze_scores(tokens: torch.Tensor, inputs: torch.Tensor) -> list[tuple[bool, int, int]]:
    if tokens.dim() != 2 or tokens.shape != inputs.shape:
        raise RewardError(
            f"maze: tokens {tuple(tokens.shape)} and inputs {tuple(inputs.shape)} must be [N, n*n]"
        )
    return [maze_path(t, i) for t, i in zip(tokens.cpu(), inputs.cpu())]


@register_reward("maze_valid")
def maze_valid(*, tokens: torch.Tensor, inputs: torch.Tensor, **_: Any) -> torch.Tensor:
    """1 where tokens [N, n*n] mark a valid path from S to G in the maze of inputs (see maze_path); else 0."""
    return torch.tensor([float(valid) for valid, _, _ in _maze_scores(tokens, inputs)], device=tokens.device)


@register_reward("maze_path_length")
def maze_path_length(*, tokens: torch.Tensor, inputs: torch.Tensor, **_: Any) -> torch.Tensor:
    """shortest / length of the marked path where it is valid (1 for a shortest path), else 0."""
    scores = _maze_scores(tokens, inputs)
    return torch.tensor(
        [shortest / length if valid and length > 0 else 0.0 for valid, length, shortest in scores],
        device=tokens.device,
    )


# --------------------------------------------------------------------------------------------------
# Text (hrm_mega/prep/corpus.py: one task per line, e.g. "4821+37=4858"; the prompt ends with "=")
# --------------------------------------------------------------------------------------------------

_ARITHMETIC = re.compile(r"(\d+)([+\-*])(\d+)=\s*$")
_INTEGER = re.compile(r"-?\d+")


def arithmetic_answer(prompt: str) -> str | None:
    """The expected answer of a prompt ending in `a+b=`, `a-b=` or `a*b=` (as the corpus writes it), or
    None when the prompt is no such question."""
    match = _ARITHMETIC.search(prompt)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def completion_answer(completion: str) -> str:
    """A completion's answer: its first line (a corpus document is one line), without surrounding spaces."""
    return completion.split("\n", 1)[0].strip()


@register_reward("arithmetic_exact_match")
def arithmetic_exact_match(
    *, prompts: list[str], completions: list[str], answers: list[str] | None = None, **_: Any
) -> torch.Tensor:
    """1 where the completion's answer equals the expected one exactly (e.g. "-225", no leading zeros);
    expected answers come from `answers` when given, else are computed from the arithmetic prompts."""
    if len(prompts) != len(completions) or (answers is not None and len(answers) != len(completions)):
        raise RewardError(
            f"arithmetic_exact_match: {len(prompts)} prompts, {len(completions)} completions"
            + ("" if answers is None else f" and {len(answers)} answers") + " must match one to one"
        )  # fmt: skip
    scores = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        expected = answers[i].strip() if answers is not None else arithmetic_answer(prompt)
        if expected is None:
            raise RewardError(
                f"arithmetic_exact_match: prompt {i} {prompt[-40:]!r} is not an arithmetic question "
                "ending in a+b=, a-b= or a*b=; pass answers=... for other tasks"
            )
        scores.append(float(completion_answer(completion) == expected))
    return torch.tensor(scores)


@register_reward("answer_exact_match")
def answer_exact_match(*, completions: list[str], answers: list[str], **_: Any) -> torch.Tensor:
    """1 where the completion equals the reference answer, surrounding whitespace aside (multi-line
    answers, such as a puzzle's grid, compare whole)."""
    if len(answers) != len(completions):
        raise RewardError(f"answer_exact_match: {len(completions)} completions but {len(answers)} answers")
    return torch.tensor([float(c.strip() == a.strip()) for c, a in zip(completions, answers)])


@register_reward("answer_format")
def answer_format(*, completions: list[str], finished: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """1 where the completion is one integer and nothing else (spaces and a final newline aside) and,
    when `finished` [N] is given, the generation ended with eos rather than running out of tokens."""
    scores = torch.tensor([float(_INTEGER.fullmatch(c.strip()) is not None) for c in completions])
    if finished is not None:
        if finished.shape != scores.shape:
            raise RewardError(
                f"answer_format: finished has shape {tuple(finished.shape)}; expected {tuple(scores.shape)}"
            )
        scores = scores * finished.cpu().float()
    return scores
