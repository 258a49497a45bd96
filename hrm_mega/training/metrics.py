"""A step's metric sums, and run logging on rank 0: metrics.jsonl (always), wandb (offline unless
configured), TensorBoard (optional), and progress: a bar on a terminal, else a plain line per logged
step (a Slurm job's .out shows the loss)."""

from __future__ import annotations

import json
import math
import secrets
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
    """Rank 0's run log. On a resume, metrics.jsonl keeps only the records up to the resumed step (the
    steps logged after the last checkpoint are run again and logged once), and a W&B run continues
    under the id kept in the run directory."""

    def __init__(
        self, config: Config, run_dir: Path, rank: int, total_steps: int, start_step: int = 0
    ) -> None:
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.total_steps, self.start_step = total_steps, start_step
        self._t0 = time.perf_counter()
        self._wandb = None
        self._tensorboard = None
        self._bar = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(self.path, start_step)
        if config.log.wandb != "disabled":
            self._wandb = _start_wandb(config, run_dir)
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if config.log.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tensorboard.add_scalar(k, v, step)
            self._tensorboard.flush()  # a killed run keeps what it logged up to its checkpoint
        if "loss" not in record:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")
        else:
            print(self.progress_line(record), flush=True)

    def progress_line(self, record: dict[str, Any]) -> str:
        """`step 20/100  loss 1.2345  lr 3.00e-04  grad_norm 0.412  1,234 tokens/s  eta 2m10s`."""
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}", f"loss {_number(record['loss'], '.4f')}"]
        if "lr" in record:
            parts.append(f"lr {_number(record['lr'], '.2e')}")
        if "grad_norm" in record:
            parts.append(f"grad_norm {_number(record['grad_norm'], '.3g')}")
        if record.get("tokens_per_s"):
            parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
        elif record.get("samples_per_s"):
            parts.append(f"{record['samples_per_s']:,.1f} samples/s")
        done = step - self.start_step
        if done > 0:
            per_step = (time.perf_counter() - self._t0) / done
            parts.append(f"eta {_duration(per_step * (self.total_steps - step))}")
        return "  ".join(parts)

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
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def keep_records_up_to(path: Path, step: int) -> None:
    """Drops the records after `step` (logged by the run before a restart, and about to be logged again),
    and a line cut short by a kill mid-write."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (record := _record(line)) is not None and record.get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _number(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) else str(v)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _start_wandb(config: Config, run_dir: Path):
    """A W&B run whose id is kept in the run directory, so that a requeued job continues the same run."""
    try:
        import wandb
    except ImportError:
        return None
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=config.log.wandb_project, mode=config.log.wandb, dir=str(run_dir), id=run_id,
        resume="allow", config=config.to_dict(), name=run_dir.name, reinit="finish_previous",
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
