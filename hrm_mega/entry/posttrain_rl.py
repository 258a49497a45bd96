"""RL post-training entry point (GRPO / PPO); started by torchrun, the deepspeed launcher, srun, or
`hrm-mega rl`. Same engine, layouts, checkpoints and logging as hrm_mega/entry/pretrain.py.

torchrun --nproc-per-node 2 -m hrm_mega.entry.posttrain_rl configs/rl/grpo_sudoku_tiny.yaml \
    --init runs/demo/checkpoints/step-00000500 --set train.steps=50
"""

from __future__ import annotations

import argparse
import sys

from hrm_mega.config import load_config
from hrm_mega.entry.common import add_config_args, add_resume_arg, run_main, train_and_report, world_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm_mega.entry.posttrain_rl", description="RL post-training (GRPO, PPO)"
    )
    add_config_args(p)
    p.add_argument(
        "--init", default=None,
        help="the pretrained model: a checkpoint (step-*/), a model directory or a consolidated .safetensors "
        "(sets train.init_from; default: the recipe's)",
    )  # fmt: skip
    add_resume_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"train.init_from={args.init}"] if args.init else [])]
    config = load_config(args.config, overrides, world_size=world_size(), command="rl")
    return train_and_report(config, args.resume, rl=True)


def main(argv: list[str] | None = None) -> int:
    return run_main("rl", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
