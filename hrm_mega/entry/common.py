"""What every entry script shares: config arguments and turning user errors into one-line messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        help="YAML file or shipped recipe name, e.g. configs/puzzle/hrm_sudoku_tiny.yaml or hrm_sudoku_tiny",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )  # fmt: skip


def world_size() -> int:
    """The number of ranks the launcher started (WORLD_SIZE; under a bare `srun`, its task count; 1
    without a launcher)."""
    from hrm_mega.launch.srun import adopt_srun_environment

    adopt_srun_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume", default="auto",
        help="auto (latest complete checkpoint in the run dir, if any), none, or a checkpoint path",
    )  # fmt: skip


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None,
        help="where the model runs: cpu, cuda or cuda:N (default: the GPU when one is visible, else cpu)",
    )  # fmt: skip


def resolve_device(name: str | None) -> Any:  # torch.device
    """--device: the named device, checked to exist here; by default the GPU when one is visible."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA device is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine shows {count} CUDA device(s), cuda:0..{count - 1}"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"--device {name}: unusable here ({str(e).splitlines()[0]})") from None
    return device


def run_main(command: str, body: Callable[[], int]) -> int:
    """Runs `body`; user errors (all ValueError subclasses in hrm-mega) print one line and exit 2."""
    try:
        return body()
    except ValueError as e:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"hrm-mega {command}{where}: error: {e}", file=sys.stderr, flush=True)
        return 2


def train_and_report(config: Any, resume: str, rl: bool = False) -> int:
    """Builds the trainer and runs it to its last step; rank 0 prints the final step and results as one
    JSON line."""
    from hrm_mega.training.engine import shutdown_distributed
    from hrm_mega.training.trainer import build_trainer

    trainer = build_trainer(config, resume=resume, rl=rl)
    results = trainer.train()
    if trainer.world.rank == 0:
        print(json.dumps({"step": trainer.step, **results}), flush=True)
    shutdown_distributed()
    return 0


def build_dataset(data: Path, builds: list[list[str]], label: str) -> bool:
    """Runs the `hrm_mega.prep` command lines in `builds` unless `data` holds a dataset already (it has a
    manifest); each is printed after `label` first. False when one fails (it has printed why)."""
    from hrm_mega.prep.cli import main as prep_main

    if (data / "manifest.json").is_file():
        return True
    for build in builds:
        print(f"{label}python -m hrm_mega.prep {' '.join(build)}", flush=True)
        if prep_main(build) != 0:
            return False
    return True


def demo_config(recipe: Path, args: argparse.Namespace) -> Any:
    """A demo's recipe with its --data, --out and --set applied."""
    from hrm_mega.config import load_config

    return load_config(recipe, [f"data.path={args.data}", f"log.out_dir={args.out}", *args.overrides])
