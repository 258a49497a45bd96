"""`make demo-rl`: RL post-training end to end on the CPU.

1. Builds an arithmetic-only corpus (a+b, a-b with operands of 1-2 digits, one-digit products) and its
   SentencePiece dataset (reused when it exists).
2. Pretrains the tiny arithmetic HRMGemma, configs/lm/hrmgemma_arith_tiny.yaml (reused when its final
   checkpoint exists).
3. Post-trains it with GRPO and the exact-match reward, configs/rl/grpo_arith_tiny.yaml, and answers
   the held-out questions greedily before and after.

Every stage is the real one (the code of `hrm-mega prep`, `train` and `rl`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hrm_mega.entry.common import build_dataset, run_main
from hrm_mega.entry.plot import plot_run
from hrm_mega.resources import recipe

PRETRAIN = recipe("lm/hrmgemma_arith_tiny.yaml")
RL = recipe("rl/grpo_arith_tiny.yaml")
CORPUS_ARGS = ["--docs", "100000", "--tasks", "add,sub,mul", "--max-digits", "2", "--seed", "0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.rl_demo", description=__doc__)
    p.add_argument("--data", default="data/arith-rl-text", help="text dataset directory (built if missing)")
    p.add_argument("--pretrain-out", default="runs/demo-arith", help="pretraining run (reused if finished)")
    p.add_argument("--out", default="runs/rl_grpo_arith", help="RL run directory (a fresh run each time)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the RL recipe")  # fmt: skip
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a field of the pretraining recipe")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    from hrm_mega.config import load_config

    t0 = time.perf_counter()
    data = Path(args.data)
    corpus = data.parent / f"{data.name}-corpus"
    steps = [
        ["corpus", "--out", str(corpus), *CORPUS_ARGS, "--overwrite"],
        ["text", "--input", str(corpus / "train.txt"), "--test-input", str(corpus / "test.txt"),
         "--vocab-size", "274", "--atomic-symbols", "=", "--seq-len", "128", "--out", str(data), "--samples-per-shard", "256",
         "--seed", "0"],
    ]  # fmt: skip
    if not build_dataset(data, steps, "[demo-rl] "):
        return 2
    paths = [f"data.path={args.data}", f"log.out_dir={args.pretrain_out}"]
    pretrain = load_config(PRETRAIN, [*paths, *args.pretrain_overrides])
    checkpoints = Path(args.pretrain_out) / "checkpoints"
    final = checkpoints / f"step-{pretrain.train.steps:08d}"
    latest = checkpoints / "latest"  # names only complete checkpoints
    if not (latest.is_file() and latest.read_text().strip() == final.name):
        from hrm_mega.training.trainer import build_trainer

        print(f"[demo-rl] pretraining {PRETRAIN.name} for {pretrain.train.steps} steps", flush=True)
        shutil.rmtree(args.pretrain_out, ignore_errors=True)
        build_trainer(pretrain, resume="none").train()
    else:
        print(f"[demo-rl] reusing the pretrained model {final}", flush=True)
    t_pretrain = time.perf_counter() - t0

    from hrm_mega.training.trainer import build_trainer

    overrides = [f"data.path={args.data}", f"train.init_from={final}", f"log.out_dir={args.out}"]
    config = load_config(RL, [*overrides, *args.overrides])
    shutil.rmtree(args.out, ignore_errors=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume="none", rl=True)
    before = trainer.evaluate()
    print(f"[demo-rl] GRPO for {config.train.steps} steps; held-out exact before: "
          f"{before['eval/exact_accuracy']:.1%}", flush=True)  # fmt: skip
    after = trainer.train()
    t_rl = time.perf_counter() - t1
    report = {"before": before, "after": after, "seconds": {"data+pretrain": t_pretrain, "rl": t_rl}}
    (Path(args.out) / "demo_results.json").write_text(json.dumps(report, indent=2))
    print_report(before, after, int(before["eval/questions"]), t_pretrain, t_rl, config.train.steps)
    print(f"training curves: {plot_run(Path(args.out), Path(args.out) / 'metrics.png')}")
    return 0


def print_report(
    before: dict, after: dict, questions: int, t_pretrain: float, t_rl: float, steps: int
) -> None:
    print()
    print(
        f"GRPO (exact-match reward) on the tiny arithmetic HRMGemma: {questions} held-out questions, greedy"
    )
    ops = [k.removeprefix("eval/exact_accuracy_") for k in before if k.startswith("eval/exact_accuracy_")]
    print(
        f"{'model':<22} {'exact':>8} {''.join(f'{op:>7}' for op in ops)} {'format':>8} {'cycles/token':>13}"
    )
    for name, m in (("pretrained", before), (f"after {steps} RL steps", after)):
        per_op = "".join(f"{m[f'eval/exact_accuracy_{op}']:>7.1%}" for op in ops)
        print(
            f"{name:<22} {m['eval/exact_accuracy']:>8.1%} {per_op} {m['eval/answer_format']:>8.1%} "
            f"{m['eval/mean_cycles']:>13.2f}"
        )
    gain = after["eval/exact_accuracy"] - before["eval/exact_accuracy"]
    print(f"change in exact accuracy: {gain * 100:+.1f} points")
    print(f"data + pretraining {t_pretrain:.0f} s, RL {t_rl:.0f} s (CPU)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main("demo-rl", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
