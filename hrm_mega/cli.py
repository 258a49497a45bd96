"""The `hrm-mega` command: a thin front for the entry points. Lists only commands that work."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from hrm_mega import __version__
from hrm_mega.config import Command, ConfigError, load_config, resolve_layout
from hrm_mega.entry.common import add_config_args, world_size
from hrm_mega.resources import recipe


def cmd_info(args: argparse.Namespace) -> int:
    from hrm_mega.models.summary import describe

    config = load_config(args.config, args.overrides)
    resolve_layout(config, args.world_size)  # the layout of the estimate; batch and data need not fit it
    seq_len = args.seq_len or _dataset_seq_len(config.data.path) or 4096
    print(describe(config, world_size=args.world_size, seq_len=seq_len))
    return 0


def _dataset_seq_len(path: str) -> int | None:
    """The seq_len in data.path's manifest.json, when it has one."""
    from hrm_mega.config.checks import read_manifest_json

    seq_len = (read_manifest_json(path) or {}).get("seq_len") if path else None
    return seq_len if isinstance(seq_len, int) else None


def cmd_config(args: argparse.Namespace) -> int:
    from hrm_mega.config.run import recipe_names

    if args.list:
        print("\n".join(recipe_names()))
        return 0
    if args.config is None:
        raise ConfigError("give a recipe (a YAML file or a shipped recipe's name), or --list")
    print(load_config(args.config, args.overrides, world_size=args.world_size).to_yaml(), end="")
    return 0


def cmd_import_hrm(args: argparse.Namespace) -> int:
    from hrm_mega.convert.hrm_official import import_hrm

    config = load_config(args.config, args.overrides)
    out = import_hrm(args.checkpoint, args.out, config)
    print(f"wrote {out}")
    return 0


def _run_entry_point(module: str, argv: list[str], nproc: int) -> int:
    """Runs hrm_mega.entry.<module> in this process, or under torchrun on this machine when nproc > 1."""
    if nproc > 1:
        import subprocess

        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", f"hrm_mega.entry.{module}", *argv]  # fmt: skip
        return subprocess.call(cmd, env=env)
    import importlib

    return importlib.import_module(f"hrm_mega.entry.{module}").main(argv)


def check_before_start(args: argparse.Namespace, command: Command, overrides: list[str]) -> None:
    """Validates the config as the ranks will (at their world size), here, so that a bad config costs one
    line before torchrun, DeepSpeed or megatron-core start (and is not reported once per rank)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be >= 1")
    world = args.nproc if args.nproc > 1 else world_size()
    load_config(args.config, overrides, world_size=world, command=command)


def cmd_train(args: argparse.Namespace) -> int:
    check_before_start(args, "train", args.overrides)
    argv = [args.config, *[f"--set={o}" for o in args.overrides], "--resume", args.resume]
    return _run_entry_point("pretrain", argv, args.nproc)


def cmd_rl(args: argparse.Namespace) -> int:
    check_before_start(
        args, "rl", [*args.overrides, *([f"train.init_from={args.init}"] if args.init else [])]
    )
    argv = [args.config, *[f"--set={o}" for o in args.overrides], "--resume", args.resume]
    argv += ["--init", args.init] if args.init else []
    return _run_entry_point("posttrain_rl", argv, args.nproc)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from hrm_mega.checkpoint.consolidate import consolidate_checkpoint, save_consolidated

    state, config = consolidate_checkpoint(args.checkpoint, use_ema=not args.no_ema)
    out = save_consolidated(state, config, args.out)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} values)")
    return 0


# Commands whose arguments belong to an entry script: everything after the command name is handed to its
# main(argv), so `hrm-mega eval --help` shows that script's own help.
PASS_THROUGH: dict[str, tuple[str, str]] = {
    "prep": (
        "hrm_mega.prep.cli",
        "build a dataset: hrm-mega prep {sudoku,maze,arc,hrm-npy,corpus,puzzle-text,reasoning,tokenizer,text,"
        "images,grid-images} ... (--help)",
    ),
    "eval": (
        "hrm_mega.entry.evaluate",
        "evaluate a checkpoint: hrm-mega eval CKPT --data DIR [--mode fixed|adaptive]",
    ),
    "generate": (
        "hrm_mega.entry.generate",
        "sample text from an HRMGemma checkpoint: hrm-mega generate CKPT --prompt TEXT",
    ),
    "serve": (
        "hrm_mega.entry.serve",
        "serve an HRMGemma over an OpenAI-compatible HTTP API (continuous batching): hrm-mega serve CKPT",
    ),
    "export-hf": (
        "hrm_mega.entry.export_hf",
        "write a Hugging Face model directory: hrm-mega export-hf CKPT OUT",
    ),
    "quantize": (
        "hrm_mega.entry.quantize",
        "weight-only int8/int4 (torchao): hrm-mega quantize CKPT OUT --scheme int8|int4 [--format hrm-mega|hf]",
    ),
    "launch": (
        "hrm_mega.entry.launch",
        "plan and start a run on torchrun, the deepspeed launcher or Slurm: hrm-mega launch ... CONFIG",
    ),
    "plot": (
        "hrm_mega.entry.plot",
        "draw a run's loss, lr, grad norm, accuracy and segments: hrm-mega plot RUN_DIR [--out FILE.png]",
    ),
    "import-hf": (
        "hrm_mega.entry.import_hf",
        "read a Gemma 3 text checkpoint into HRMGemma: hrm-mega import-hf HF_DIR OUT",
    ),
}


def run_pass_through(command: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(PASS_THROUGH[command][0])
    if command == "prep":
        return module.main(argv, prog="hrm-mega prep")
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hrm-mega", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hrm-mega {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "config", help="print a recipe's resolved config (after --set), validated; --list names the recipes"
    )
    p.add_argument("config", nargs="?", help="YAML file or shipped recipe name, e.g. hrm_sudoku_tiny")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )  # fmt: skip
    p.add_argument("--world-size", type=int, default=None, help="also check the layout for this many ranks")
    p.add_argument("--list", action="store_true", help="list the recipes shipped with hrm-mega")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("info", help="print parameter counts, FLOPs and memory estimate of a recipe")
    add_config_args(p)
    p.add_argument("--world-size", type=int, default=1, help="number of ranks for the memory estimate")
    p.add_argument(
        "--seq-len", type=int, default=0,
        help="HRMGemma: tokens per row for the memory estimate (default: data.path's, else 4096)",
    )  # fmt: skip
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="pretrain a model (DeepSpeed); --nproc N runs N ranks through torchrun")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun when > 1)")
    p.add_argument("--resume", default="auto", help="auto | none | PATH (default: auto)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "rl", help="RL post-training (GRPO, PPO) from a pretrained model: hrm-mega rl CONFIG --init CKPT"
    )
    add_config_args(p)
    p.add_argument("--init", default=None, help="pretrained checkpoint, model directory or .safetensors")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun when > 1)")
    p.add_argument("--resume", default="auto", help="auto | none | PATH (default: auto)")
    p.set_defaults(func=cmd_rl)

    for name, (_, usage) in PASS_THROUGH.items():
        p = sub.add_parser(name, help=usage, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"see hrm-mega {name} --help")

    p = sub.add_parser(
        "consolidate", help="merge a (ZeRO-sharded) checkpoint into one fp32 .safetensors file"
    )
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step-00001000")
    p.add_argument("out", help="output .safetensors file (the config travels in its metadata)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept an EMA")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser(
        "import-hrm", help="convert an official HRM checkpoint into an hrm-mega model directory"
    )
    p.add_argument("checkpoint", help="file saved by the official HRM pretrain.py")
    p.add_argument("out", help="output directory (model.safetensors + config.yaml)")
    p.add_argument(
        "--config",
        default=str(recipe("puzzle/hrm_sudoku.yaml")),
        help="recipe the checkpoint matches (default: the shipped configs/puzzle/hrm_sudoku.yaml)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_import_hrm)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:
        return run_pass_through(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Every user-facing error class in hrm-mega derives from ValueError and carries a one-line message.
        print(f"hrm-mega {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
