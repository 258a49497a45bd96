"""Pretraining entry point; started by torchrun, the deepspeed launcher, srun, or `hrm-mega train`.

torchrun --nproc-per-node 2 -m hrm_mega.entry.pretrain configs/puzzle/hrm_sudoku_tiny.yaml \
    --set train.steps=100
"""

from __future__ import annotations

import argparse
import sys

from hrm_mega.config import load_config
from hrm_mega.entry.common import add_config_args, add_resume_arg, run_main, train_and_report, world_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm_mega.entry.pretrain", description="pretraining on DeepSpeed (ACT puzzles or LM)"
    )
    add_config_args(p)
    add_resume_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, world_size=world_size(), command="train")
    return train_and_report(config, args.resume)


def main(argv: list[str] | None = None) -> int:
    return run_main("train", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
