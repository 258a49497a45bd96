"""Exact 9x9 sudoku solver and unique-solution puzzle generator (pure python).

A grid is a flat sequence of 81 ints: 0 for a blank, 1-9 for a digit, row-major. The solver keeps one
9-bit mask of used digits per unit (9 rows, 9 columns, 9 boxes), fills naked and hidden singles until
nothing changes, then branches on the cell with the fewest candidates (MRV). Search effort, counted as
the number of guesses needed to exhaust the search tree, rates a puzzle's difficulty: 0 means singles
alone solve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALL = 0x1FF  # the 9 digit bits
_ROW = [i // 9 for i in range(81)]
_COL = [9 + i % 9 for i in range(81)]  # unit index of the cell's column
_BOX = [18 + (i // 27) * 3 + (i % 9) // 3 for i in range(81)]  # unit index of the cell's box
UNITS = [[u * 9 + k for k in range(9)] for u in range(9)]
UNITS += [[k * 9 + u for k in range(9)] for u in range(9)]
UNITS += [[(u // 3) * 27 + (u % 3) * 3 + (k // 3) * 9 + k % 3 for k in range(9)] for u in range(9)]
_POPCOUNT = [bin(m).count("1") for m in range(512)]
_DIGITS = [[d + 1 for d in range(9) if m >> d & 1] for m in range(512)]  # mask -> digits, ascending


class _Search:
    """One depth-first search over a grid; counts solutions up to `limit` and the guesses made."""

    def __init__(self, grid: Sequence[int], limit: int, rng: np.random.Generator | None = None) -> None:
        if len(grid) != 81:
            raise ValueError(f"sudoku grid has {len(grid)} cells, expected 81")
        self.cells = [int(v) for v in grid]
        self.used = [0] * 27
        self.limit = limit
        self.rng = rng  # when set, branches try digits in random order (random full grids)
        self.count = 0
        self.guesses = 0
        self.solution: list[int] | None = None
        self.consistent = True
        used = self.used
        for i, v in enumerate(self.cells):
            if v == 0:
                continue
            if not 1 <= v <= 9:
                raise ValueError(f"sudoku cell {i} holds {v}, expected 0-9")
            bit = 1 << (v - 1)
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (used[r] | used[c] | used[b]) & bit:
                self.consistent = False  # two equal givens in one unit: no solution
            used[r] |= bit
            used[c] |= bit
            used[b] |= bit

    def run(self) -> int:
        if self.consistent:
            self._search([i for i in range(81) if self.cells[i] == 0])
        return self.count

    def _search(self, empty: list[int]) -> None:
        cells, used = self.cells, self.used
        placed: list[int] = []

        def place(i: int, bit: int) -> None:
            cells[i] = _DIGITS[bit][0]
            used[_ROW[i]] |= bit
            used[_COL[i]] |= bit
            used[_BOX[i]] |= bit
            placed.append(i)

        best, best_mask, dead = -1, 0, False
        while True:
            # Naked singles, and the most constrained cell for branching.
            best, best_n, progress = -1, 10, False
            cand = [0] * 81
            still_empty = []
            for i in empty:
                if cells[i]:
                    continue
                m = ALL & ~(used[_ROW[i]] | used[_COL[i]] | used[_BOX[i]])
                n = _POPCOUNT[m]
                if n == 0:
                    dead = True
                    break
                if n == 1:
                    place(i, m)
                    progress = True
                else:
                    cand[i] = m
                    still_empty.append(i)
                    if n < best_n:
                        best, best_n, best_mask = i, n, m
            if dead:
                break
            empty = still_empty
            if not empty:
                break
            if progress:
                continue
            # Hidden singles: a digit with a single possible cell in some unit.
            for u, unit in enumerate(UNITS):
                if used[u] == ALL:
                    continue  # unit complete
                once = twice = 0
                for i in unit:
                    m = cand[i]
                    twice |= once & m
                    once |= m
                if (once | used[u]) != ALL:
                    dead = True  # some digit has no place left in this unit
                    break
                hidden = once & ~twice & ~used[u]
                while hidden:
                    bit = hidden & -hidden
                    hidden ^= bit
                    for i in unit:
                        if cand[i] & bit:
                            # Masks may be stale after earlier placements this pass: re-check.
                            if not cells[i] and not (used[_ROW[i]] | used[_COL[i]] | used[_BOX[i]]) & bit:
                                place(i, bit)
                            progress = True
                            break
            if dead or not progress:
                break

        if not dead:
            if best < 0 or not empty:
                self.count += 1
                if self.solution is None:
                    self.solution = list(cells)
            else:
                digits = _DIGITS[best_mask]
                if self.rng is not None:
                    digits = [digits[k] for k in self.rng.permutation(len(digits))]
                for d in digits:
                    self.guesses += 1
                    bit = 1 << (d - 1)
                    cells[best] = d
                    used[_ROW[best]] |= bit
                    used[_COL[best]] |= bit
                    used[_BOX[best]] |= bit
                    self._search(empty)
                    cells[best] = 0
                    used[_ROW[best]] ^= bit
                    used[_COL[best]] ^= bit
                    used[_BOX[best]] ^= bit
                    if self.count >= self.limit:
                        break
        for i in placed:
            bit = 1 << (cells[i] - 1)
            cells[i] = 0
            used[_ROW[i]] ^= bit
            used[_COL[i]] ^= bit
            used[_BOX[i]] ^= bit


def count_solutions(grid: Sequence[int], limit: int = 2) -> int:
    """Number of solutions of `grid`, counting stops at `limit` (2 answers "is it unique?")."""
    return _Search(grid, limit).run()


def solve(grid: Sequence[int]) -> list[int] | None:
    """One solution of `grid` (the first found), or None if it has none."""
    search = _Search(grid, 1)
    search.run()
    return search.solution


def rate(grid: Sequence[int]) -> int:
    """Search effort: guesses needed to find every solution (up to 2). 0 = solvable by singles alone."""
    search = _Search(grid, 2)
    search.run()
    return search.guesses


def is_solution(grid: Sequence[int]) -> bool:
    """True when `grid` is a complete, valid sudoku."""
    return len(grid) == 81 and all(sorted(grid[i] for i in unit) == list(range(1, 10)) for unit in UNITS)


def random_solution(rng: np.random.Generator) -> list[int]:
    """A random complete grid: the solver run on an empty grid, trying digits in random order."""
    search = _Search([0] * 81, 1, rng)
    search.run()
    assert search.solution is not None
    return search.solution


def _has_other_solution(puzzle: list[int], cell: int, digit: int) -> bool:
    """Whether the puzzle (blank at `cell`) has a solution with something other than `digit` there."""
    search = _Search(puzzle, 1)
    used, units = search.used, (_ROW[cell], _COL[cell], _BOX[cell])
    others = ALL & ~(used[units[0]] | used[units[1]] | used[units[2]]) & ~(1 << (digit - 1))
    empty = [i for i in range(81) if puzzle[i] == 0 and i != cell]
    for other in _DIGITS[others]:
        bit = 1 << (other - 1)
        search.cells[cell] = other
        for u in units:
            used[u] |= bit
        search._search(empty)
        for u in units:
            used[u] ^= bit
        if search.count:
            return True
    return False


@dataclass(frozen=True)
class Puzzle:
    puzzle: list[int]
    solution: list[int]
    givens: int
    rating: int
    attempts: int


class GenerationError(ValueError):
    """No puzzle met the requested givens/rating within the attempt budget."""


def generate(
    rng: np.random.Generator,
    min_givens: int,
    max_givens: int,
    min_rating: int = 0,
    max_attempts: int = 1000,
) -> Puzzle:
    """A puzzle with a unique solution and min_givens <= givens <= max_givens, rating >= min_rating.

    Starts from a random full grid and blanks cells in random order, keeping a blank only if the solution
    stays unique, until the drawn target count of givens is reached. When the removal gets stuck above
    max_givens, or the rating is too low, starts again with a new grid (all draws come from `rng`).
    """
    for attempt in range(1, max_attempts + 1):
        solution = random_solution(rng)
        target = int(rng.integers(min_givens, max_givens + 1))
        puzzle = list(solution)
        givens = 81
        for cell in rng.permutation(81).tolist():
            if givens == target:
                break
            digit = puzzle[cell]
            puzzle[cell] = 0
            if _has_other_solution(puzzle, cell, digit):
                puzzle[cell] = digit
            else:
                givens -= 1
        if givens > max_givens:
            continue
        rating = rate(puzzle)
        if rating < min_rating:
            continue
        return Puzzle(puzzle, solution, givens, rating, attempt)
    raise GenerationError(
        f"no sudoku with {min_givens}-{max_givens} givens and rating >= {min_rating} after "
        f"{max_attempts} attempts; raise --max-givens or lower --min-rating"
    )
