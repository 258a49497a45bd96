"""Keyed randomness: uniform numbers that are a function of (seed, keys...), elementwise, so a draw does
not depend on which other draws a batch holds (RL rollouts of puzzles and of per-token LM halting)."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _as_signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _as_signed(0x9E3779B97F4A7C15)
_MIX1 = _as_signed(0xBF58476D1CE4E5B9)
_MIX2 = _as_signed(0x94D049BB133111EB)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic, logical shifts)."""
    x = x + _GOLDEN
    x = (x ^ _logical_shift(x, 30)) * _MIX1
    x = (x ^ _logical_shift(x, 27)) * _MIX2
    return x ^ _logical_shift(x, 31)


def _logical_shift(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def keyed_uniform(seed: int, *keys: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers that depend only on (seed, keys...), elementwise. Device-agnostic."""
    h = torch.full_like(keys[0], _as_signed(seed & _MASK64), dtype=torch.int64)
    for k in keys:
        h = _splitmix64(h ^ k.to(torch.int64))
    return _logical_shift(h, 11).double() / float(1 << 53)
