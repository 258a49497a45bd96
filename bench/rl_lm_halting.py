"""Does GRPO with a compute cost teach HRMGemma to halt earlier without losing answers? (issue #21)

Starts from the trace checkpoint of bench/cycles_scaling.py (`--tasks trace --models hrmgemma`; 93.0%
exact on its harder split at 10 H cycles against 2.2% at one) and post-trains it with
configs/rl/grpo_trace_halting.yaml: the exact-match reward, per-token halting drawn from the halting
head around rl.halt_threshold (an action of the policy, replayed by the policy forward) and
rl.compute_cost_lambda charging the H cycles per token.

Prompts: `prep reasoning --task trace --seed 1` harder-split questions (4-6 hops; the checkpoint
trained on 0-3), none of which is in the checkpoint's data; the first HELD_OUT are never trained on and
score both models, the rest are the RL prompts. Scoring is cycles_scaling's: BOS + prompt + answer + EOS
through `HRMGemma.infer`, right when the argmax at every answer position is the next answer token (what
greedy decoding produces), cycles averaged over the positions that predict the answer and EOS. Both
models are scored at max_cycles = MAX_CYCLES with no halting (the checkpoint's best) and with the
threshold rule at rl.halt_threshold (the greedy choice of the policy RL trains). Accuracy changes are
paired over the same questions: mean difference +- 1.96 standard errors.

    python bench/rl_lm_halting.py --init RUN/checkpoints/step-00003000 --data DATA/trace [--work W]

DATA/trace is cycles_scaling's data directory of the task (tokenizer.model, train/, jsonl/). Writes
WORK/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from cycles_scaling import encode, score  # noqa: E402

RECIPE = ROOT / "configs/rl/grpo_trace_halting.yaml"
SEED = 1  # the questions' seed (the checkpoint's data used 0)
QUESTIONS = 8000  # generated; the first HELD_OUT score the models, the rest are RL prompts
HELD_OUT = 2000
MAX_CYCLES = 10


def build_prompts(data: Path, work: Path) -> tuple[Path, Path]:
    """The held-out and the RL prompt files, checked to share no prompt with each other or with the
    checkpoint's own splits."""
    src = work / "jsonl"
    subprocess.run(
        [sys.executable, "-m", "hrm_mega.prep", "reasoning", "--task", "trace", "--out", str(src),
         "--train", "0", "--val", "0", "--hard", str(QUESTIONS), f"--seed={SEED}", "--overwrite", "--quiet"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    lines = (src / "hard.jsonl").read_text().splitlines()
    seen = {
        json.loads(x)["prompt"]
        for f in ("train", "val", "hard")
        for x in (data / "jsonl" / f"{f}.jsonl").open()
    }
    prompts = [json.loads(x)["prompt"] for x in lines]
    if len(set(prompts)) != len(prompts) or seen & set(prompts):
        raise SystemExit("the generated questions repeat each other or the checkpoint's data; change SEED")
    held_out, train = work / "held_out.jsonl", work / "train.jsonl"
    held_out.write_text("\n".join(lines[:HELD_OUT]) + "\n")
    train.write_text("\n".join(lines[HELD_OUT:]) + "\n")
    return held_out, train


def rl_run(init: Path, data: Path, prompts: Path, held_out: Path, run: Path, extra: list[str]) -> Path:
    """hrm-mega rl with the recipe; returns the final checkpoint."""
    sets = [f"data.path={data / 'train'}", f"rl.prompt_file={prompts}", f"rl.eval_prompt_file={held_out}",
            f"log.out_dir={run}", "log.wandb=disabled", "log.progress_bar=false", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "hrm_mega.cli", "rl", str(RECIPE), "--init", str(init)]
    cmd += [f"--set={s}" for s in sets]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with (run.parent / f"{run.name}.log").open("w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()


def evaluate(checkpoint: Path, rows: list[dict], threshold: float) -> dict:
    """Scores at MAX_CYCLES without halting and with the threshold rule, with each question's result."""
    import torch

    from hrm_mega.checkpoint.consolidate import load_model

    torch.set_num_threads(1)
    model, _ = load_model(checkpoint)
    model.eval()
    return {
        "fixed": score(model, rows, MAX_CYCLES, None, details=True),
        "halting": score(model, rows, MAX_CYCLES, threshold, details=True),
    }


def paired(before: dict, after: dict) -> dict:
    """after - before: the accuracy change in points with its paired 95% interval, and the cycles cut."""
    a, b = after["questions"], before["questions"]
    d = [float(x[0]) - float(y[0]) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {
        "questions": n,
        "exact_change": 100 * mean,
        "ci95": [100 * (mean - half), 100 * (mean + half)],
        "cycles_before": before["answer_cycles"],
        "cycles_after": after["answer_cycles"],
        "cycles_cut": 1 - after["answer_cycles"] / before["answer_cycles"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="the trace checkpoint (step dir)")
    parser.add_argument("--data", type=Path, required=True, help="cycles_scaling's trace data directory")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/rl-lm-halting")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for the RL run")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from hrm_mega.config import read_config

    threshold = read_config(RECIPE, args.set).rl.halt_threshold
    held_out, train = build_prompts(args.data, work)
    rows = encode(held_out, args.data / "tokenizer.model")
    t0 = time.time()
    before = evaluate(args.init, rows, threshold)
    final = rl_run(args.init, args.data, train, held_out, work / "run", args.set)
    after = evaluate(final, rows, threshold)
    results = {
        "init": str(args.init), "checkpoint": str(final), "threshold": threshold, "overrides": args.set,
        "seconds": time.time() - t0,
        "scores": {"before": before, "after": after},
        # the bar: after RL (its greedy halting) against the checkpoint at its maximum cycles
        "vs_max_cycles": paired(before["fixed"], after["halting"]),
        # RL's own part: the same threshold rule before and after
        "vs_same_rule": paired(before["halting"], after["halting"]),
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=1))
    for name, s in (("checkpoint", before), ("after RL", after)):
        for rule in ("fixed", "halting"):
            r = s[rule]
            label = f"{MAX_CYCLES} cycles" if rule == "fixed" else f"halting at p >= {threshold}"
            print(f"{name:>10}  {label:<24} exact {100 * r['exact']:5.1f}%  "
                  f"cycles per answer token {r['answer_cycles']:.2f}  by hops {r['answer_cycles_by_difficulty']}")  # fmt: skip
    for key in ("vs_max_cycles", "vs_same_rule"):
        p = results[key]
        print(f"{key}: exact {p['exact_change']:+.2f} points (95% CI {p['ci95'][0]:+.2f} .. {p['ci95'][1]:+.2f}, "
              f"{p['questions']} questions), cycles {p['cycles_before']:.2f} -> {p['cycles_after']:.2f} "
              f"({100 * p['cycles_cut']:.1f}% fewer)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
