"""Puzzle augmentations, shared by the shard builders (hrm_mega.prep) and the on-the-fly loader path.

Every function is a pure function of its arrays and an explicit numpy Generator: no global RNG state.
Token layouts are the HRM ones (docs/data_format.md):
  sudoku  seq 81,  0 PAD, 1 blank, 2-10 digits 1-9
  maze    seq n*n, 0 PAD, 1 '#', 2 ' ', 3 'S', 4 'G', 5 'o'
  ARC     seq 900 (30x30 canvas), 0 PAD, 1 EOS, 2-11 colours 0-9
Labels may hold -100 ("no loss"); augmentations leave it in place.
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = -100

# ---- sudoku -----------------------------------------------------------------------------------------


def sudoku_transform(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random validity-preserving sudoku symmetry, as (source cell of each cell [81], token map [11]).

    Shuffles bands, rows within each band, stacks and columns within each stack, optionally transposes,
    and relabels the digits. `new[..., i] = token_map[old[..., source[i]]]`.
    """
    digit_perm = rng.permutation(9)
    transpose = bool(rng.integers(2))
    rows = np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])
    cols = np.concatenate([3 * stack + rng.permutation(3) for stack in rng.permutation(3)])
    r, c = np.divmod(np.arange(81), 9)
    # Cell (r, c) of the new grid comes from (rows[r], cols[c]) of the (optionally transposed) old grid.
    source = cols[c] * 9 + rows[r] if transpose else rows[r] * 9 + cols[c]
    token_map = np.concatenate([[0, 1], 2 + digit_perm])  # PAD and blank stay
    return source, token_map


def _map_tokens(x: np.ndarray, token_map: np.ndarray) -> np.ndarray:
    keep = x < 0  # -100 labels
    return np.where(keep, x, token_map[np.where(keep, 0, x)]).astype(x.dtype)


def sudoku_augment(
    inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Applies one random sudoku symmetry to inputs and labels (last dim 81, token layout); new arrays."""
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.shape[-1] != 81 or labels.shape[-1] != 81:
        raise ValueError(f"sudoku_augment wants arrays of 81 tokens, got {inputs.shape} and {labels.shape}")
    source, token_map = sudoku_transform(rng)
    return _map_tokens(inputs[..., source], token_map), _map_tokens(labels[..., source], token_map)


# ---- dihedral group (ARC, maze) ----------------------------------------------------------------------

# Numbering follows HRM's dataset/common.py, so that ids in HRM datasets and in ours agree:
# 0 identity, 1 rot90, 2 rot180, 3 rot270 (counter-clockwise), 4 flip left-right, 5 flip up-down,
# 6 transpose, 7 anti-transpose.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    """One of the 8 symmetries of the square applied to the last two axes of `grid` (a copy)."""
    if not 0 <= tid < 8:
        raise ValueError(f"dihedral transform id {tid} is not in 0-7")
    grid = np.asarray(grid)
    axes = (-2, -1)
    if tid < 4:
        out = np.rot90(grid, k=tid, axes=axes)
    elif tid == 4:
        out = np.flip(grid, axis=-1)
    elif tid == 5:
        out = np.flip(grid, axis=-2)
    elif tid == 6:
        out = np.swapaxes(grid, -2, -1)
    else:  # anti-transpose = rot90 then flip left-right
        out = np.flip(np.rot90(grid, k=1, axes=axes), axis=-1)
    return np.ascontiguousarray(out)


def inverse_dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    return dihedral_transform(grid, DIHEDRAL_INVERSE[tid])


# ---- ARC colours and canvas ----------------------------------------------------------------------------

ARC_CANVAS = 30
ARC_PAD, ARC_EOS, ARC_COLOUR0 = 0, 1, 2


def random_colour_permutation(rng: np.random.Generator) -> np.ndarray:
    """perm[c] is the new colour of colour c; colour 0 (background) stays 0."""
    return np.concatenate([[0], 1 + rng.permutation(9)]).astype(np.int64)


def invert_colour_permutation(perm: np.ndarray) -> np.ndarray:
    return np.argsort(np.asarray(perm))


def arc_augment_grid(grid: np.ndarray, tid: int, colour_perm: np.ndarray) -> np.ndarray:
    """Recolours then transforms one ARC grid of colours 0-9."""
    return dihedral_transform(np.asarray(colour_perm)[np.asarray(grid)], tid)


def arc_unaugment_grid(grid: np.ndarray, tid: int, colour_perm: np.ndarray) -> np.ndarray:
    """Inverse of arc_augment_grid: maps a prediction on an augmented task back to the original task."""
    return invert_colour_permutation(colour_perm)[inverse_dihedral_transform(np.asarray(grid), tid)]


def arc_grid_to_canvas(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Flat [900] tokens: colours+2 at `offset`, an EOS row below and an EOS column right of the grid."""
    grid = np.asarray(grid)
    h, w = grid.shape
    r0, c0 = offset
    if r0 + h > ARC_CANVAS or c0 + w > ARC_CANVAS:
        raise ValueError(f"grid {h}x{w} at offset {offset} does not fit a {ARC_CANVAS}x{ARC_CANVAS} canvas")
    canvas = np.full((ARC_CANVAS, ARC_CANVAS), ARC_PAD, dtype=np.int16)
    canvas[r0 : r0 + h, c0 : c0 + w] = grid + ARC_COLOUR0
    if r0 + h < ARC_CANVAS:
        canvas[r0 + h, c0 : c0 + w] = ARC_EOS
    if c0 + w < ARC_CANVAS:
        canvas[r0 : r0 + h, c0 + w] = ARC_EOS
    return canvas.reshape(-1)


def arc_canvas_to_grid(tokens: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """Reads the grid back from a canvas (e.g. a prediction): colour cells from `offset` up to the EOS
    border. Returns None when the canvas holds no well-formed rectangle of colours there."""
    canvas = np.asarray(tokens).reshape(ARC_CANVAS, ARC_CANVAS)
    r0, c0 = offset
    is_colour = canvas >= ARC_COLOUR0
    h = int(np.argmin(np.append(is_colour[r0:, c0], False)))
    w = int(np.argmin(np.append(is_colour[r0, c0:], False)))
    if h == 0 or w == 0 or not is_colour[r0 : r0 + h, c0 : c0 + w].all():
        return None
    return (canvas[r0 : r0 + h, c0 : c0 + w] - ARC_COLOUR0).astype(np.int64)
