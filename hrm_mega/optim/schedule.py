"""Learning-rate schedule: linear warmup, then cosine decay to a floor, then constant.

    step < warmup_steps:            lr = base_lr * step / warmup_steps        (0 at step 0)
    warmup_steps <= step < total:   cosine from base_lr down to base_lr * min_ratio
    step >= total_steps:            lr = base_lr * min_ratio

min_ratio = 1 gives warmup followed by a constant LR (the HRM/TRM puzzle recipes).
The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate at optimizer step `step` (0-based)."""
    _check(base_lr, warmup_steps, total_steps, min_ratio)
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return base_lr * min_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _check(base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if not base_lr >= 0.0:
        raise ValueError(f"lr schedule: base_lr must be >= 0, got {base_lr}")
    if warmup_steps < 0:
        raise ValueError(f"lr schedule: warmup_steps must be >= 0, got {warmup_steps}")
    # warmup_steps == total_steps would leave no room to decay; ask for an explicit, consistent setting.
    if total_steps <= warmup_steps:
        raise ValueError(f"lr schedule: total_steps ({total_steps}) must be > warmup_steps ({warmup_steps})")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr schedule: min_ratio must be in [0, 1], got {min_ratio}")


@dataclass(frozen=True)
class LRSchedule:
    """The numbers of one schedule; call it with a step to get the LR (see `lr_at`)."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check(self.base_lr, self.warmup_steps, self.total_steps, self.min_ratio)

    def __call__(self, step: int) -> float:
        return lr_at(
            step,
            base_lr=self.base_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            min_ratio=self.min_ratio,
        )
