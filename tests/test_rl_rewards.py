"""RL rewards: sudoku, maze and text rewards on valid and invalid samples, the registry, shaping."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch

from hrm_mega.prep.common import item_rng
from hrm_mega.prep.corpus import generate_documents
from hrm_mega.prep.maze import Spec as MazeSpec
from hrm_mega.prep.maze import generate as generate_maze
from hrm_mega.prep.sudoku_solver import generate as generate_sudoku
from hrm_mega.rl import rewards
from hrm_mega.rl.rewards import (
    RewardError,
    answer_exact_match,
    combine_rewards,
    compute_fraction,
    get_reward,
    register_reward,
    reward_names,
    shape_for_compute,
)

# --------------------------------------------------------------------------------------------------
# Sudoku (tokens: 0 PAD, 1 blank, 2-10 digits 1-9)
# --------------------------------------------------------------------------------------------------


def pattern_solution() -> torch.Tensor:
    """A valid grid: digit(r, c) = (3 * (r % 3) + r // 3 + c) % 9 + 1, as tokens [81]."""
    digits = [(3 * (r % 3) + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9)]
    return torch.tensor(digits) + 1


def puzzle_of(solution: torch.Tensor, givens: list[int]) -> torch.Tensor:
    inputs = torch.ones_like(solution)  # blanks
    inputs[givens] = solution[givens]
    return inputs


def test_sudoku_valid_solutions() -> None:
    solution = pattern_solution()
    inputs = puzzle_of(solution, [0, 10, 20, 40, 80])
    generated = generate_sudoku(item_rng(0, "test", 0), 30, 36)  # a real puzzle from the shard builder
    gen_inputs, gen_solution = torch.tensor(generated.puzzle) + 1, torch.tensor(generated.solution) + 1
    tokens = torch.stack((solution, gen_solution))
    score = get_reward("sudoku_valid")(tokens=tokens, inputs=torch.stack((inputs, gen_inputs)))
    assert score.tolist() == [1.0, 1.0]


def test_sudoku_invalid_grids() -> None:
    solution = pattern_solution()
    inputs = puzzle_of(solution, [0, 10, 20, 40, 80])
    swapped_in_row = solution.clone()  # rows stay valid, two columns (and boxes) break
    swapped_in_row[[1, 2]] = swapped_in_row[[2, 1]]
    blank_left = solution.clone()
    blank_left[5] = 1
    padding = solution.clone()
    padding[7] = 0
    relabelled = solution.clone()  # a valid grid (digits 1 and 2 swapped everywhere) that breaks a given
    relabelled = torch.where(solution == 2, 3, torch.where(solution == 3, 2, solution))
    clashing_inputs = puzzle_of(solution, [int((solution == 2).nonzero()[0])])
    tokens = torch.stack((swapped_in_row, blank_left, padding, relabelled, relabelled))
    inputs_b = torch.stack((inputs, inputs, inputs, clashing_inputs, puzzle_of(solution, [])))
    score = rewards.sudoku_valid(tokens=tokens, inputs=inputs_b)
    assert score.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # the relabelled grid is fine without that given


def test_sudoku_shape_error() -> None:
    with pytest.raises(RewardError, match=r"sudoku_valid: tokens \(2, 80\)"):
        rewards.sudoku_valid(
            tokens=torch.ones(2, 80, dtype=torch.long), inputs=torch.ones(2, 80, dtype=torch.long)
        )


# --------------------------------------------------------------------------------------------------
# Maze (tokens: 1 '#', 2 ' ', 3 'S', 4 'G', 5 'o')
# --------------------------------------------------------------------------------------------------

CHARS = {"#": 1, ".": 2, "S": 3, "G": 4, "o": 5}


def grid(*rows: str) -> torch.Tensor:
    return torch.tensor([CHARS[ch] for row in rows for ch in row])


# Two routes from S to G: left (3 marked cells, 4 moves, the shortest) and right (7 cells, 8 moves).
MAZE = grid("S....", ".###.", "..G..", "#####", "#####")
LEFT = grid("S....", "o###.", "ooG..", "#####", "#####")
RIGHT = grid("Soooo", ".###o", "..Goo", "#####", "#####")


def maze_scores(*tokens: torch.Tensor, maze: torch.Tensor = MAZE) -> tuple[list[float], list[float]]:
    t = torch.stack(tokens)
    inputs = maze.expand_as(t)
    return rewards.maze_valid(tokens=t, inputs=inputs).tolist(), rewards.maze_path_length(
        tokens=t, inputs=inputs
    ).tolist()


def test_maze_valid_paths_and_length() -> None:
    valid, length = maze_scores(LEFT, RIGHT)
    assert valid == [1.0, 1.0]
    assert length == [1.0, 0.5]  # shortest 4 moves / 8 moves


def test_maze_invalid_paths() -> None:
    through_wall = grid("S....", "oo##.", ".oG..", "#####", "#####")
    stray_cell = grid("S..o.", "o###.", "ooG..", "#####", "#####")
    gap = grid("S....", "o###.", ".oG..", "#####", "#####")
    touching_itself = grid("So...", "o###.", "ooG..", "#####", "#####")  # S has two marked neighbours
    moved_start = grid("o....", "o###.", "ooG..", "#####", "#####")
    no_path = MAZE
    padded = LEFT.clone()
    padded[-1] = 0
    valid, length = maze_scores(through_wall, stray_cell, gap, touching_itself, moved_start, no_path, padded)
    assert valid == [0.0] * 7 and length == [0.0] * 7


def test_maze_separate_loop_is_invalid() -> None:
    """Every marked cell of a 2x2 block has two marked neighbours, but it is not on the S-G path."""
    maze = grid("S#..#", ".#..#", "G####", "#####", "#####")
    path = grid("S#..#", "o#..#", "G####", "#####", "#####")
    with_loop = grid("S#oo#", "o#oo#", "G####", "#####", "#####")
    valid, length = maze_scores(path, with_loop, maze=maze)
    assert valid == [1.0, 0.0] and length == [1.0, 0.0]


def test_maze_rewards_on_generated_mazes() -> None:
    """Labels of the shard builder's mazes are shortest paths; their inputs mark no path."""
    spec = MazeSpec(seed=0, size=9, loop_fraction=0.2, min_path_len=6, max_attempts=100, aug=False)
    mazes = [generate_maze(spec, item_rng(0, "test", i)) for i in range(4)]
    inputs = torch.tensor(np.stack([m[0] for m in mazes]))
    labels = torch.tensor(np.stack([m[1] for m in mazes]))
    assert rewards.maze_path_length(tokens=labels, inputs=inputs).tolist() == [1.0] * 4
    assert rewards.maze_valid(tokens=inputs, inputs=inputs).tolist() == [0.0] * 4
    for (_, _, path_len), t, i in zip(mazes, labels, inputs):
        assert rewards.maze_path(t, i) == (True, path_len, path_len)


def test_maze_input_errors() -> None:
    two_starts = grid("S...S", ".###.", "..G..", "#####", "#####")
    with pytest.raises(RewardError, match="exactly one S and one G, found 2 and 1"):
        rewards.maze_valid(tokens=two_starts[None], inputs=two_starts[None])
    with pytest.raises(RewardError, match="one square grid"):
        rewards.maze_valid(
            tokens=torch.ones(1, 24, dtype=torch.long), inputs=torch.ones(1, 24, dtype=torch.long)
        )


# --------------------------------------------------------------------------------------------------
# Text: arithmetic exact match and the answer format
# --------------------------------------------------------------------------------------------------


def test_exact_match_on_corpus_documents() -> None:
    """The corpus writes `a+b=c`: the prompt is up to '=', the answer after it, and every one matches."""
    docs = [d for d in generate_documents(0, "train", 400) if "=" in d]
    assert len(docs) > 50 and any("-" in d.split("=")[1] for d in docs)  # negative results occur too
    prompts = [d[: d.index("=") + 1] for d in docs]
    answers = [d[d.index("=") + 1 :] for d in docs]
    reward = get_reward("arithmetic_exact_match")
    assert reward(prompts=prompts, completions=answers).tolist() == [1.0] * len(docs)
    off_by_one = [str(int(a) + 1) for a in answers]
    assert reward(prompts=prompts, completions=off_by_one).tolist() == [0.0] * len(docs)


def test_exact_match_cases() -> None:
    prompts = ["4821+37=", "503-728=", "23*47=", "23*47=", "23*47=", "<s>12+3=", "1+1="]
    completions = ["4858", "-225", "1081\nmore text", "01081", "1081 ", " 15", "3"]
    score = rewards.arithmetic_exact_match(prompts=prompts, completions=completions)
    assert score.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_exact_match_with_given_answers_and_errors() -> None:
    score = rewards.arithmetic_exact_match(prompts=["reverse: ab ->"], completions=[" ba"], answers=["ba"])
    assert score.tolist() == [1.0]
    with pytest.raises(RewardError, match="prompt 0 'reverse: ab ->' is not an arithmetic question"):
        rewards.arithmetic_exact_match(prompts=["reverse: ab ->"], completions=["ba"])
    with pytest.raises(RewardError, match="2 prompts, 1 completions"):
        rewards.arithmetic_exact_match(prompts=["1+1=", "2+2="], completions=["2"])


def test_answer_format() -> None:
    completions = ["123", " -5 \n", "12a", "", "1 2", "7\n8"]
    assert rewards.answer_format(completions=completions).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    finished = torch.tensor([True, False, True, True, True, True])  # the second ran out of tokens
    assert rewards.answer_format(completions=completions, finished=finished).tolist() == [1, 0, 0, 0, 0, 0]


# --------------------------------------------------------------------------------------------------
# Registry and combination
# --------------------------------------------------------------------------------------------------


def test_builtin_names() -> None:
    expected = {"sudoku_valid", "maze_valid", "maze_path_length", "arithmetic_exact_match", "answer_format",
                "answer_exact_match"}  # fmt: skip
    assert expected <= set(reward_names())


def test_unknown_reward_lists_the_known_ones() -> None:
    with pytest.raises(RewardError) as info:
        get_reward("sudoku")
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown reward 'sudoku'; known rewards: ")
    assert "sudoku_valid" in message and "arithmetic_exact_match" in message


def test_register_and_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewards, "_REWARDS", dict(rewards._REWARDS))  # keep the registration local

    @register_reward("length_bonus")
    def length_bonus(*, completions: list[str], **_: object) -> torch.Tensor:
        return torch.tensor([float(len(c)) for c in completions])

    assert get_reward("length_bonus") is length_bonus
    with pytest.raises(RewardError, match="'length_bonus' is already registered"):
        register_reward("length_bonus")(length_bonus)
    total, parts = combine_rewards(
        {"arithmetic_exact_match": 1.0, "length_bonus": 0.5},
        prompts=["1+1=", "2+2="],
        completions=["2", "5x"],
    )
    assert parts["length_bonus"].tolist() == [1.0, 2.0]
    assert total.tolist() == [1.0 + 0.5, 0.0 + 1.0]
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        combine_rewards({"nope": 1.0}, completions=["1"])


USER_REWARDS = """
import time
import torch

def exact(*, completions, answers, **_):  # a list of floats, as TRL's reward functions return
    return [float(c.strip() == a) for c, a in zip(completions, answers)]

def boom(*, completions, **_):
    raise KeyError("no field 'difficulty'\\nsecond line")

def slow(*, completions, **_):
    time.sleep(30)
    return torch.zeros(len(completions))

def wrong_shape(*, completions, **_):
    return torch.zeros(len(completions), 2)

NOT_CALLABLE = 3
"""


def test_module_function_rewards_and_their_one_line_errors(tmp_path, monkeypatch) -> None:
    """rl.rewards may name any importable function as module:function; a reward that raises, runs over
    its time limit or returns the wrong shape stops with one line naming it."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg/__init__.py").write_text("")
    (tmp_path / "mypkg/rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = {"prompts": ["1+1=", "2+2="], "completions": [" 2", "5"], "answers": ["2", "4"]}
    total, parts = combine_rewards({"mypkg.rewards:exact": 2.0}, timeout=5, **samples)
    assert parts["mypkg.rewards:exact"].tolist() == [1.0, 0.0] and total.tolist() == [2.0, 0.0]
    cases = {
        "mypkg.rewards:boom": "reward 'mypkg.rewards:boom' raised KeyError: \"no field 'difficulty'",
        "mypkg.rewards:slow": "reward 'mypkg.rewards:slow' took longer than 0.3 s (rl.reward_timeout)",
        "mypkg.rewards:wrong_shape": "reward 'mypkg.rewards:wrong_shape' returned (2, 2); expected a tensor",
        "mypkg.rewards:nope": "reward 'mypkg.rewards:nope': mypkg.rewards has no function 'nope'",
        "mypkg.rewards:NOT_CALLABLE": "has no function 'NOT_CALLABLE'",
        "mypkg.missing:exact": "reward 'mypkg.missing:exact': cannot import 'mypkg.missing'",
    }
    for name, message in cases.items():
        start = time.perf_counter()
        with pytest.raises(RewardError) as info:
            combine_rewards({name: 1.0}, timeout=0.3, **samples)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert time.perf_counter() - start < 5  # the slow one is cut off, not waited for
    handler, timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    combine_rewards({"mypkg.rewards:exact": 1.0}, timeout=0.3, **samples)
    assert signal.getsignal(signal.SIGALRM) is handler  # a runner's own timer (pytest-timeout's) survives
    assert (signal.getitimer(signal.ITIMER_REAL)[0] > 0) == (timer[0] > 0)


def test_answer_exact_match_compares_whole_answers() -> None:
    grid = "123\n456"
    scores = answer_exact_match(completions=[" 123\n456\n", "123\n457", "123"], answers=[grid] * 3)
    assert scores.tolist() == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Halting-aware shaping
# --------------------------------------------------------------------------------------------------


def test_compute_fraction_of_segments() -> None:
    assert compute_fraction(torch.tensor([2, 4, 1]), 4).tolist() == [0.5, 1.0, 0.25]
    per_row = compute_fraction(torch.tensor([2, 2]), torch.tensor([4, 8]))
    assert per_row.tolist() == [0.5, 0.25]


def test_compute_fraction_of_token_cycles() -> None:
    """Row 0: tokens use (1+3)/2 = 2 and (2+2)/2 = 2 cycles over 2 blocks, the third token is padding
    (its 9s are ignored): 2 / max 4 = 0.5. Row 1: one real token at 4 -> 1.0."""
    cycles = torch.tensor([[[1, 3], [2, 2], [9, 9]], [[4, 4], [9, 9], [9, 9]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert compute_fraction(cycles, 4, mask).tolist() == [0.5, 1.0]


def test_shaping() -> None:
    reward = torch.tensor([1.0, 1.0, 0.0])
    fraction = compute_fraction(torch.tensor([1, 4, 2]), 4)
    assert torch.allclose(shape_for_compute(reward, fraction, lam=0.2), torch.tensor([0.95, 0.8, -0.1]))
    assert torch.equal(shape_for_compute(reward, fraction, lam=0.0), reward)
    with pytest.raises(RewardError, match="lam=-0.1 must be >= 0"):
        shape_for_compute(reward, fraction, lam=-0.1)
    with pytest.raises(RewardError, match="must be > 0"):
        compute_fraction(torch.tensor([1]), 0)
