"""What every entry script shares: config arguments and turning user errors into one-line messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe, e.g. configs/puzzle/hrm_sudoku_tiny.yaml")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )  # fmt: skip


def world_size() -> int:
    """The number of ranks the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_main(command: str, body: Callable[[], int]) -> int:
    """Runs `body`; user errors (all ValueError subclasses in hrm-mega) print one line and exit 2."""
    try:
        return body()
    except ValueError as e:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"hrm-mega {command}{where}: error: {e}", file=sys.stderr, flush=True)
        return 2


def train_and_report(trainer: Any) -> int:
    """Runs a built trainer to its last step; rank 0 prints the final step and results as one JSON line."""
    results = trainer.train()
    if trainer.world.rank == 0:
        print(json.dumps({"step": trainer.step, **results}), flush=True)
    return 0
