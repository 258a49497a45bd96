"""Do HRMGemma's cycles buy reasoning? Exact accuracy against test-time cycles, against a plain Gemma.

For each task of `hrm-mega prep reasoning` (chain, addition, parity, relay, trace:
hrm_mega/prep/reasoning.py, each definition fixed before its first run), the bench builds the data (train, a held-out validation
split of the same depths, a harder split that needs more steps), trains two tiny models of the same
parameter count on the same data for the same wall-clock time, and scores the answers exactly:

    hrmgemma  RECIPE (configs/lm/hrmgemma_reason_tiny.yaml): H cycles drawn from [1, MAX] every step
              (trace: TASK_RECIPES, a fixed 5 cycles with deep supervision by due cycle)
    gemma     the same model with N = T = 1 (a plain Gemma 3 stack; its gates and halting heads idle)

Scoring reads the JSONL records themselves: BOS + prompt + answer + EOS, one record per row (right
padding), through `HRMGemma.infer`; an answer is right when the argmax at every answer position is the
next answer token and EOS (what greedy decoding from the prompt produces). HRMGemma is scored at every
H cycle count from 1 to 2 x MAX (MAX: the trained maximum, `trained_max`) with halting off, and with
per-token halting (max_cycles = 2 x MAX, each threshold of THRESHOLDS); its best count and threshold are chosen on the validation split and reported
on the harder one. Cycles are counted per token and block, and averaged separately over the answer
tokens (the positions that predict the answer and EOS) and the prompt tokens.

Equal time is measured once (`--calibrate`: seconds per training step of both models, measured
alternately in one process, HRMGemma's over its cycle range) and fixed as the step counts in STEPS, so
a rerun is deterministic on the same machine. Writes WORK/results.json and WORK/cycles_scaling.png, and
prints the table.

    python bench/cycles_scaling.py [--tasks chain,addition,parity] [--work runs/cycles-bench]
    python bench/cycles_scaling.py --calibrate     # seconds per step -> the gemma/hrmgemma step ratio
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/lm/hrmgemma_reason_tiny.yaml"
TASKS = ("chain", "addition", "parity", "relay", "trace")
MAX_CYCLES = 4  # HRMGemma trains with H cycles drawn from [1, MAX_CYCLES] (the recipe's cycles_range)
TASK_MAX_CYCLES = {"trace": 5}  # trace trains at a fixed 5 (its recipe); scored at 1 .. 2x this
SEQ_LEN = 128
# SentencePiece pieces of each task's tokenizer (256 byte pieces among them; at most the recipe's
# model.vocab_size, 320): the digits-and-symbols texts of addition and parity allow no more than ~280.
VOCAB = {"chain": 320, "addition": 276, "parity": 272, "relay": 299, "trace": 300}
# Pieces the tokenizer keeps whole. relay: every name and digit one piece, the same with or without
# the space before it (with only "=", "▁q" and "q" are different pieces, so a name read back does not
# match its definition token for token; chain, measured first, kept that).
ATOMIC = {
    "relay": [*"abcdefghijklmnopqrstuvwxyz0123456789", "=", ":"],
    "trace": [*"abcdefghijklmnopqrstuvwxyz0123456789", "=", ":", "?"],
}
# Tasks whose records carry hidden targets (prep text --hidden-field; docs/data_format.md) and their due
# cycles (prep text --due-field: the cycle from which deep supervision trains each target).
HIDDEN = {"trace": "hidden"}
DUE = {"trace": "due"}
SEED = 0
RECORDS = {"train": 20000, "val": 500, "hard": 500}
THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 0.9999)
# Equal-time step counts, fixed from `--calibrate` (2026-12-03, this 2-core machine shared with other
# jobs; docs/benchmarks.md): hrmgemma 404.7 ms/step, gemma 195.4 ms/step -> gemma gets 2.07x the steps.
STEPS = {"hrmgemma": 1000, "gemma": 2070}
# Tasks with a recipe of their own (both models; gemma's MODELS overrides still apply). trace (2026-12-04): deep supervision by due cycle, a fixed 5 cycles,
# halt_target correct, 16 rows, lr 2e-3 (configs/lm/hrmgemma_trace_tiny.yaml says why).
TASK_RECIPES = {"trace": ROOT / "configs/lm/hrmgemma_trace_tiny.yaml"}
# trace, `--calibrate --tasks trace` (2026-12-04, one thread, nothing else running): hrmgemma 279.4
# ms/step (5 cycles, 16 rows), gemma 55.5 ms/step -> ratio 0.199; 3000 hrmgemma steps (~14 min) -> 15100.
TASK_STEPS: dict[str, dict[str, int]] = {"trace": {"hrmgemma": 3000, "gemma": 15100}}
COMMON = [
    "train.checkpoint_interval=0", "train.eval_interval=0", "train.eval_max_samples=64",
    "log.wandb=disabled", "log.log_interval=100", "log.progress_bar=false", f"train.seed={SEED}",
]  # fmt: skip
MODELS = {"hrmgemma": [], "gemma": ["model.h_cycles=1", "model.l_cycles=1", "train.cycles_range=[]"]}


def prep(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "hrm_mega.prep", *argv, "--quiet"], check=True, cwd=ROOT)


def build_data(task: str, work: Path) -> dict[str, Path]:
    """JSONL (train/val/hard) -> one tokenizer -> the packed train dataset (its test split: val)."""
    src = work / task / "jsonl"
    out = {"train": work / task / "train", "jsonl": src, "tokenizer": work / task / "tokenizer.model"}
    if (out["train"] / "manifest.json").is_file():
        return out
    sizes = [f"--{split}={n}" for split, n in RECORDS.items()]
    prep("reasoning", "--task", task, "--out", str(src), *sizes, f"--seed={SEED}", "--overwrite")
    qa = ["--prompt-field", "prompt", "--answer-field", "answer"]
    prep("tokenizer", "--input", str(src / "train.jsonl"), *qa, "--vocab-size", str(VOCAB[task]),
         "--atomic-symbols", *ATOMIC.get(task, ["="]), "--out", str(out["tokenizer"]))  # fmt: skip
    hidden = ["--hidden-field", HIDDEN[task]] if task in HIDDEN else []
    hidden += ["--due-field", DUE[task]] if task in DUE else []
    prep("text", "--input", str(src / "train.jsonl"), "--test-input", str(src / "val.jsonl"), *qa, *hidden,
         "--tokenizer", str(out["tokenizer"]), "--seq-len", str(SEQ_LEN), "--out", str(out["train"]),
         "--samples-per-shard", "256", "--overwrite")  # fmt: skip
    return out


def train(task: str, model: str, data: Path, run: Path, steps: int, extra: list[str]) -> float:
    """Trains one model in a subprocess (one thread); returns its wall-clock seconds."""
    sets = [
        *COMMON,
        *MODELS[model],
        *extra,
        f"data.path={data}",
        f"log.out_dir={run}",
        f"train.steps={steps}",
    ]
    recipe = TASK_RECIPES.get(task, RECIPE)
    cmd = [sys.executable, "-m", "hrm_mega.entry.pretrain", str(recipe), *[f"--set={s}" for s in sets]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(run.parent / f"{run.name}.log", "w") as log:
        subprocess.run([*cmd, "--resume", "none"], check=True, cwd=ROOT, stdout=log, stderr=log, env=env)
    return time.perf_counter() - start


def encode(jsonl: Path, tokenizer: Path) -> list[dict]:
    """The records as token ids: BOS + prompt + answer + EOS (prep text's document), with their answer's
    start and the record's difficulty."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    rows = []
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        prompt, answer = sp.encode(r["prompt"]), sp.encode(r["answer"])
        rows.append({"ids": [sp.bos_id(), *prompt, *answer, sp.eos_id()], "start": 1 + len(prompt),
                     "difficulty": r["difficulty"], "pad": sp.pad_id(), "pieces": sp.get_piece_size()})  # fmt: skip
    return rows


def score(
    model, rows: list[dict], max_cycles: int, threshold: float | None, batch: int = 250, details: bool = False
) -> dict:
    """Exact accuracy (overall and by difficulty) and the mean H cycles per answer token (overall and by
    difficulty: where halting spends them) and per prompt token; with `details`, also each question's
    [right, answer cycles] (for paired comparisons)."""
    import torch

    right, by_difficulty, answer_cycles, prompt_cycles, cycles_by_difficulty = 0, {}, [], [], {}
    oks = []  # each question's result, in order
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(r["ids"]) for r in chunk)
        ids = torch.tensor([r["ids"] + [r["pad"]] * (width - len(r["ids"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["ids"]) + [0] * (width - len(r["ids"])) for r in chunk])
        with torch.no_grad():
            logits, cycles = model.infer(
                ids, attention_mask=mask, max_cycles=max_cycles, halt_threshold=threshold
            )
        predicted = logits[..., : chunk[0]["pieces"]].argmax(-1)  # [b, s]
        per_token = cycles.float().mean(0)  # [b, s]: H cycles per token, averaged over the blocks
        for b, r in enumerate(chunk):
            n, start = len(r["ids"]), r["start"]
            ok = bool((predicted[b, start - 1 : n - 1] == ids[b, start:n]).all())
            right += ok
            oks.append(ok)
            by_difficulty.setdefault(r["difficulty"], []).append(ok)
            answer_cycles.append(per_token[b, start - 1 : n - 1].mean().item())
            cycles_by_difficulty.setdefault(r["difficulty"], []).append(answer_cycles[-1])
            prompt_cycles.append(per_token[b, : start - 1].mean().item())
    out = {
        "exact": right / len(rows),
        "by_difficulty": {str(d): sum(v) / len(v) for d, v in sorted(by_difficulty.items())},
        "answer_cycles": sum(answer_cycles) / len(answer_cycles),
        "answer_cycles_by_difficulty": {
            str(d): sum(v) / len(v) for d, v in sorted(cycles_by_difficulty.items())
        },
        "prompt_cycles": sum(prompt_cycles) / len(prompt_cycles),
    }
    if details:
        out["questions"] = [[ok, c] for ok, c in zip(oks, answer_cycles)]
    return out


def trained_max(task: str) -> int:
    return TASK_MAX_CYCLES.get(task, MAX_CYCLES)


def evaluate(run: Path, data: dict[str, Path], hrm: bool, most: int) -> dict:
    """Scores of the trained model on val and hard: at each cycle count 1..2 x `most` (the trained
    maximum), and with per-token halting."""
    import torch

    from hrm_mega.checkpoint.consolidate import load_model

    torch.set_num_threads(1)
    latest = (run / "checkpoints/latest").read_text().strip()
    model, _ = load_model(run / "checkpoints" / latest)
    model.eval()
    out = {}
    for split in ("val", "hard"):
        rows = encode(data["jsonl"] / f"{split}.jsonl", data["tokenizer"])
        counts = range(1, 2 * most + 1) if hrm else [1]
        out[split] = {"fixed": {str(c): score(model, rows, c, None) for c in counts}}
        if hrm:
            out[split]["adaptive"] = {str(t): score(model, rows, 2 * most, t) for t in THRESHOLDS}
    return out


def calibrate(work: Path, task: str, extra: list[str], rounds: int = 3, steps: int = 8) -> float:
    """Seconds per training step (forward, backward, AdamATan2 step on one batch of the task's data) of
    both models, alternated in one process on one thread; HRMGemma's averaged over its cycle range.
    Returns gemma's step time over hrmgemma's."""
    import numpy as np
    import torch

    from hrm_mega.config import load_config
    from hrm_mega.data.stream import SampleStream
    from hrm_mega.models import build_model
    from hrm_mega.models.lm import lm_loss
    from hrm_mega.optim import AdamATan2
    from hrm_mega.training.tasks.lm import answer_only

    torch.set_num_threads(1)
    data = build_data(task, work)["train"]
    models, configs = {}, {}
    for name, sets in MODELS.items():
        configs[name] = load_config(
            TASK_RECIPES.get(task, RECIPE), [*COMMON, *sets, *extra, f"data.path={data}"]
        )
        models[name] = build_model(configs[name].model).init_weights(SEED)
    config = configs["hrmgemma"]
    stream = SampleStream(str(data), "train", seed=SEED, global_batch=config.train.global_batch,
                          partitions=config.data.partitions, dp_rank=0, dp_size=1)  # fmt: skip
    batch = stream.take(range(config.train.global_batch))
    stream.close()
    lo, hi = config.train.cycles_range or [config.model.h_cycles] * 2
    optimizers = {name: AdamATan2(model.parameters(), lr=1e-4) for name, model in models.items()}

    def step(name: str, cycles: int) -> float:
        start = time.perf_counter()
        logits, aux = models[name](batch["input_ids"], position_ids=batch["position_ids"],
                                   doc_ids=batch["doc_ids"], cycles=cycles)  # fmt: skip
        labels = answer_only(batch) if configs[name].data.answer_only_loss else batch["labels"]
        lm_loss(logits, labels, aux, configs[name].model)["loss"].backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        return time.perf_counter() - start

    step("gemma", 1), step("hrmgemma", hi)  # warm-up, not timed
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):  # alternated, so both see the same load on a shared machine
        seconds["gemma"] += [step("gemma", 1) for _ in range(steps)]
        seconds["hrmgemma"] += [
            step("hrmgemma", c) for c in range(lo, hi + 1) for _ in range(steps // 4 or 1)
        ]
    per_step = {name: float(np.mean(v)) for name, v in seconds.items()}
    ratio = per_step["gemma"] / per_step["hrmgemma"]
    for name, value in per_step.items():
        print(f"{name}: {value * 1000:.1f} ms/step", flush=True)
    print(
        f"gemma/hrmgemma step time: {ratio:.3f} -> gemma gets {1 / ratio:.2f}x hrmgemma's steps", flush=True
    )
    return ratio


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (task, r) in zip(axes[0], results.items()):
        for split, style in (("val", "-"), ("hard", "--")):
            curve = r["hrmgemma"]["scores"][split]["fixed"]
            xs = sorted(int(c) for c in curve)
            ax.plot(xs, [100 * curve[str(c)]["exact"] for c in xs], style, marker="o", color="C0",
                    label=f"HRMGemma {split}")  # fmt: skip
            gemma = r["gemma"]["scores"][split]["fixed"]["1"]["exact"]
            ax.axhline(100 * gemma, linestyle=style, color="gray", label=f"Gemma {split}")
        ax.axvline(trained_max(task), color="k", linewidth=0.5)
        ax.set(title=task, xlabel="test-time H cycles", ylabel="exact accuracy (%)", ylim=(-2, 102))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(results: dict) -> list[str]:
    """The table: per task and model, the cycle count and halting threshold chosen on val, and the
    harder split's accuracy at them, by cycle count, and with halting."""
    lines = [f"{'task':<9} {'model':<9} {'steps':>6} {'train s':>7} {'best c':>6} {'val':>6} {'hard':>6}"
             f"  hard by cycles 1..2x the trained maximum"]  # fmt: skip
    for task, r in results.items():
        for model in STEPS:
            s = r[model]["scores"]
            val, hard = s["val"]["fixed"], s["hard"]["fixed"]
            best = max(val, key=lambda c: (val[c]["exact"], -int(c)))
            curve = " ".join(f"{100 * hard[c]['exact']:.1f}" for c in sorted(hard, key=int))
            lines.append(f"{task:<9} {model:<9} {r[model]['steps']:>6} {r[model]['train_s']:>7.0f} {best:>6} "
                         f"{100 * val[best]['exact']:>5.1f}% {100 * hard[best]['exact']:>5.1f}%  {curve}")  # fmt: skip
            for t, a in s["hard"].get("adaptive", {}).items():
                v = s["val"]["adaptive"][t]
                lines.append(f"{'':<9} halting p>={t}: val {100 * v['exact']:.1f}%, hard {100 * a['exact']:.1f}% "
                             f"at {a['answer_cycles']:.2f} cycles per answer token, {a['prompt_cycles']:.2f} "
                             f"per prompt token (max {2 * trained_max(task)})")  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--work", type=Path, default=ROOT / "runs/cycles-bench")
    p.add_argument("--calibrate", action="store_true", help="measure the step times on each of --tasks")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], help="a recipe override for both models"
    )
    p.add_argument("--models", default=",".join(STEPS), help="train and score only these")
    p.add_argument("--steps", default="", help="hrmgemma,gemma step counts instead of STEPS (experiments)")
    p.add_argument("--data", type=Path, default=None, help="where the tasks' data is built (default: --work)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        for task in args.tasks.split(","):
            calibrate(args.data or args.work, task, args.sets)
        return 0
    results_file = args.work / "results.json"
    for task in args.tasks.split(","):
        steps = TASK_STEPS.get(task, STEPS)
        if args.steps:
            steps = dict(zip(STEPS, map(int, args.steps.split(","))))
        data = build_data(task, args.data or args.work)
        for model in args.models.split(","):
            run = args.work / task / model
            run.parent.mkdir(parents=True, exist_ok=True)
            seconds = train(task, model, data["train"], run, steps[model], args.sets)
            scores = evaluate(run, data, hrm=model == "hrmgemma", most=trained_max(task))
            # read again just before writing: runs of other models may share this work directory
            results = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results.setdefault(task, {})[model] = {
                "steps": steps[model],
                "train_s": seconds,
                "scores": scores,
            }
            hard = scores["hard"]["fixed"]
            print(f"{task} {model} ({seconds:.0f} s): hard " + " ".join(
                f"{c}:{100 * v['exact']:.1f}" for c, v in hard.items()), flush=True)  # fmt: skip
            results_file.write_text(json.dumps(results, indent=1))
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    complete = {t: r for t, r in results.items() if all(m in r for m in STEPS)}
    if complete:
        plot(complete, args.work / "cycles_scaling.png")
        print("\n".join(["", *summary(complete), f"figure: {args.work / 'cycles_scaling.png'}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
