"""A step's metric sums, and run logging on rank 0: metrics.jsonl (always), wandb (offline unless
configured), a progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hrm_mega.config import Config


def add_micro_batch(
    sums: dict[str, float], loss: torch.Tensor, terms: dict[str, float], counts: dict[str, float]
) -> None:
    """Adds one micro-batch to its step's sums: `counts` always, the loss `terms` only when its loss is
    finite (a skipped micro-batch adds no NaN to the step's means), and whether it was (sums["finite"])."""
    finite = math.isfinite(float(loss.detach()))
    for k, v in counts.items():
        sums[k] += v
    for k, v in terms.items():
        sums[k] += v if finite else 0.0
    sums["finite"] += float(finite)


class MetricsLogger:
    def __init__(
        self, config: Config, run_dir: Path, rank: int, total_steps: int, start_step: int = 0
    ) -> None:
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.log.wandb != "disabled":
            self._wandb = _start_wandb(config, run_dir)
        if config.log.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step",
                disable=not sys.stderr.isatty(), dynamic_ncols=True,
            )  # fmt: skip

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _start_wandb(config: Config, run_dir: Path):
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(
        project=config.log.wandb_project, mode=config.log.wandb, dir=str(run_dir),
        config=config.to_dict(), name=run_dir.name, reinit="finish_previous",
    )  # fmt: skip


class Throughput:
    """Samples and tokens per second over the interval since the last call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt}
        self.t0, self.samples, self.tokens = now, 0, 0
        return out
