"""Do HRMGemma's cycles buy reasoning? Exact accuracy against test-time cycles, against a plain Gemma.

For each task of `hrm-mega prep reasoning` (chain, addition, parity: hrm_mega/prep/reasoning.py, whose
definitions were fixed before the first run), the bench builds the data (train, a held-out validation
split of the same depths, a harder split that needs more steps), trains two tiny models of the same
parameter count on the same data for the same wall-clock time, and scores answers exactly (greedy
decoding's exact match, `answer_exact` of hrm_mega.training.tasks.lm.evaluate_lm):

    hrmgemma  configs/lm/hrmgemma_tiny.yaml with H cycles drawn from [1, MAX] per step
    gemma     the same model with N = T = 1 (a plain Gemma 3 stack; its extra cycle parameters idle)

Equal time is measured once (`--calibrate`: seconds per step of each, alternated) and fixed as the step
counts in STEPS below, so a rerun is deterministic on the same machine. HRMGemma is evaluated at every
cycle count from 1 to 2 x MAX; its best count is chosen on the validation split and reported on the
harder one. Writes WORK/results.json and WORK/cycles_scaling.png, and prints the table.

    python bench/cycles_scaling.py [--tasks chain,addition,parity] [--work runs/cycles-bench]
    python bench/cycles_scaling.py --calibrate     # seconds per step -> equal-time step counts
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/lm/hrmgemma_tiny.yaml"
TASKS = ("chain", "addition", "parity")
MAX_CYCLES = 4  # HRMGemma trains with H cycles drawn from [1, MAX_CYCLES]
SEQ_LEN = 128
VOCAB = 320
BUDGET_S = 600  # wall-clock training budget per model
# Equal-time step counts. NOT YET CALIBRATED: placeholders until `--calibrate` has been run on an idle
# machine and its counts written here (issue #20); no result of this bench is recorded yet.
STEPS = {"hrmgemma": 1000, "gemma": 1800}
COMMON = [
    "train.global_batch=16", "data.partitions=4", "train.cycles_range=[]", "train.checkpoint_interval=0",
    "train.eval_interval=0", "log.wandb=disabled", "log.log_interval=100", "log.progress_bar=false",
    f"model.vocab_size={VOCAB}", "optim.warmup_steps=50", "optim.lr=1e-3",
]  # fmt: skip
MODELS = {
    "hrmgemma": [f"model.h_cycles={MAX_CYCLES}", f"train.cycles_range=[1,{MAX_CYCLES}]"],
    "gemma": ["model.h_cycles=1", "model.l_cycles=1"],
}


def prep(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "hrm_mega.prep", *argv, "--quiet"], check=True, cwd=ROOT)


def build_data(task: str, work: Path) -> dict[str, Path]:
    """JSONL -> one tokenizer -> the train dataset (test split: val) and the hard dataset."""
    src, out = work / task / "jsonl", {"train": work / task / "train", "hard": work / task / "hard"}
    if (out["hard"] / "manifest.json").is_file():
        return out
    prep("reasoning", "--task", task, "--out", str(src), "--overwrite")
    qa = ["--prompt-field", "prompt", "--answer-field", "answer"]
    tokenizer = work / task / "tokenizer.model"
    prep("tokenizer", "--input", str(src / "train.jsonl"), *qa, "--vocab-size", str(VOCAB),
         "--atomic-symbols", "=", "--out", str(tokenizer))  # fmt: skip
    for name, train, test in (("train", "train", "val"), ("hard", "hard", "hard")):
        prep("text", "--input", str(src / f"{train}.jsonl"), "--test-input", str(src / f"{test}.jsonl"), *qa,
             "--tokenizer", str(tokenizer), "--seq-len", str(SEQ_LEN), "--out", str(out[name]),
             "--samples-per-shard", "256", "--overwrite")  # fmt: skip
    return out


def train(task: str, model: str, data: Path, run: Path, steps: int) -> float:
    """Trains one model in a subprocess; returns its wall-clock seconds."""
    sets = [*COMMON, *MODELS[model], f"data.path={data}", f"log.out_dir={run}", f"train.steps={steps}"]
    cmd = [sys.executable, "-m", "hrm_mega.entry.pretrain", str(RECIPE), *[f"--set={s}" for s in sets]]
    start = time.perf_counter()
    subprocess.run([*cmd, "--resume", "none"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def exact_by_cycles(run: Path, data: Path, cycles: list[int]) -> dict[int, float]:
    """answer_exact on data's test split at each H cycle count (one process, the EMA weights if any)."""
    from dataclasses import replace

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.training.engine import World
    from hrm_mega.training.tasks.lm import evaluate_lm

    latest = (run / "checkpoints/latest").read_text().strip()
    model, config = load_model(run / "checkpoints" / latest)
    config = replace(config, data=replace(config.data, path=str(data), sources=[]))
    world = World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device="cpu")
    return {c: evaluate_lm(model, config, world, cycles=c)["answer_exact"] for c in cycles}


def calibrate(work: Path, rounds: int = 2, steps: int = 30) -> None:
    """Seconds per step of each model on the chain data, alternated; prints equal-time step counts."""
    data = build_data("chain", work)["train"]
    per_step = {m: [] for m in MODELS}
    for r in range(rounds):
        for model in MODELS:
            seconds = train("chain", model, data, work / f"calibrate-{model}-{r}", steps)
            short = train("chain", model, data, work / f"calibrate-{model}-{r}-0", 1)
            per_step[model].append((seconds - short) / (steps - 1))
    for model, values in per_step.items():
        mean = sum(values) / len(values)
        print(f"{model}: {mean:.3f} s/step -> {int(BUDGET_S / mean)} steps in {BUDGET_S} s", flush=True)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (task, r) in zip(axes[0], results.items()):
        for split, style in (("val", "-"), ("hard", "--")):
            xs = sorted(int(c) for c in r["hrmgemma"][split])
            ax.plot(xs, [100 * r["hrmgemma"][split][str(c)] for c in xs], style, marker="o",
                    label=f"HRMGemma {split}")  # fmt: skip
            ax.axhline(100 * r["gemma"][split]["1"], linestyle=style, color="gray", label=f"Gemma {split}")
        ax.axvline(MAX_CYCLES, color="k", linewidth=0.5)
        ax.set(title=task, xlabel="test-time H cycles", ylabel="exact accuracy (%)", ylim=(-2, 102))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--work", type=Path, default=ROOT / "runs/cycles-bench")
    p.add_argument("--calibrate", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        calibrate(args.work)
        return 0
    results: dict = {}
    for task in args.tasks.split(","):
        data = build_data(task, args.work)
        results[task] = {}
        for model, steps in STEPS.items():
            run = args.work / task / model
            seconds = train(task, model, data["train"], run, steps)
            cycles = list(range(1, 2 * MAX_CYCLES + 1)) if model == "hrmgemma" else [1]
            results[task][model] = {
                "steps": steps, "train_s": seconds,
                "val": {str(c): v for c, v in exact_by_cycles(run, data["train"], cycles).items()},
                "hard": {str(c): v for c, v in exact_by_cycles(run, data["hard"], cycles).items()},
            }  # fmt: skip
            print(f"{task} {model}: {json.dumps(results[task][model])}", flush=True)
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.work / "cycles_scaling.png")
    print(f"\n{'task':<9} {'model':<9} {'steps':>6} {'best c':>6} {'val':>6} {'hard':>6}  hard by cycles")
    for task, r in results.items():
        for model in STEPS:
            val, hard = r[model]["val"], r[model]["hard"]
            best = max(val, key=lambda c: (val[c], -int(c)))
            curve = " ".join(f"{100 * hard[c]:.0f}" for c in sorted(hard, key=int))
            print(f"{task:<9} {model:<9} {r[model]['steps']:>6} {best:>6} {100 * val[best]:>5.1f}% "
                  f"{100 * hard[best]:>5.1f}%  {curve}")  # fmt: skip
    print(f"figure: {args.work / 'cycles_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
