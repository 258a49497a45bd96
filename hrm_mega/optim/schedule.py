"""Learning-rate schedule: linear warmup, then cosine decay to a floor (HRM's and TRM's schedule).

Steps count optimizer updates from 1, as the official trainers do (they advance `train_state.step`
before computing the LR), so the first update already has a non-zero LR:

    step < warmup_steps:             lr = base_lr * step / warmup_steps
    warmup_steps <= step <= total:   cosine from base_lr (at warmup_steps) down to base_lr * min_ratio
                                     (reached at total_steps, the run's last update)
    step > total_steps:              lr = base_lr * min_ratio

warmup_steps >= total_steps is allowed, as in HRM: the whole run is then warmup.
min_ratio = 1 gives warmup followed by a constant LR (the HRM/TRM puzzle recipes).
The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer update number `step` (1 = the first update of a run)."""
    _check(base_lr, warmup_steps, total_steps, min_ratio)
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _check(base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if not base_lr >= 0.0:
        raise ValueError(f"lr schedule: base_lr must be >= 0, got {base_lr}")
    if warmup_steps < 0:
        raise ValueError(f"lr schedule: warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"lr schedule: total_steps must be >= 1, got {total_steps}")
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
