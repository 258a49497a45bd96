"""RL step throughput on the CPU: rollout tokens/s, training tokens/s, and the share of a step each takes.

A GRPO step as the RL trainer runs it (hrm_mega/training/tasks/rl.py), without DeepSpeed and checkpoints:

    rollout   no grad: group_size samples per prompt (LM: lm_rollout, KV-cached decoding with per-token
              halting; puzzles: puzzle_rollout, the ACT loop and per-cell sampling), rewards
    update    the training forward over the rollouts (recompute_policy), group advantages, the
              clipped policy loss, backward, AdamW step

Rollout tokens/s = new tokens (LM) or sampled cells (puzzles) per second of rollout. Training tokens/s =
the positions the training forward and backward run over per second of update: prompt + completion
tokens (LM, real ones) or cells x ACT segments recomputed (puzzles). The model is the recipe's, from
--init (e.g. the demo checkpoints) or freshly initialised; the rewards are the recipe's. Each figure is
the mean over --steps timed steps after one warm-up step.

    python bench/rl_throughput.py [--family lm|puzzle|both] [--lm-init runs/demo-lm/checkpoints/step-00000400]
        [--puzzle-init runs/demo/checkpoints/step-00000500] [--steps 3] [--threads 2]

--compare-rollout REF measures the LM rollout alone against the rollout code of git commit REF (e.g. the
commit before a rollout change): two worker processes, one importing hrm_mega as it was at REF (`git
archive`, into a temporary directory) and one the working tree's, load the same weights and take turns,
round after round (the order flipping each round, so drift in the machine's load falls on both), each
timing lm_rollout on the same prompts with the same seed. It prints each round's tokens/s (wall time,
and per CPU second of the worker: on a machine shared with other jobs the scheduler decides much of the
wall time), the ratio of the medians, and whether the two produced the same samples (tokens and cycles,
and log-probs bit for bit):

    python bench/rl_throughput.py --compare-rollout 1a2b3c4 --rollout-batch 8 --rounds 6 --threads 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.config import Config, load_config
from hrm_mega.data.reader import iterate_split
from hrm_mega.inference.generate import left_pad
from hrm_mega.models import build_model
from hrm_mega.rl.advantages import group_advantages
from hrm_mega.rl.losses import policy_loss
from hrm_mega.rl.prompts import ArithmeticPrompts
from hrm_mega.rl.rewards import combine_rewards, compute_fraction, shape_for_compute
from hrm_mega.rl.rollout import lm_rollout, puzzle_rollout, recompute_policy

ROOT = Path(__file__).resolve().parents[1]


def model_for(config: Config, init: str | None) -> torch.nn.Module:
    if init:
        model, _ = load_model(init)
        return model
    return build_model(config.model).init_weights(config.train.seed)


def update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rollout, logprobs_mask, rewards, n: int
) -> None:
    logprobs_old, mask = logprobs_mask
    new = recompute_policy(model, rollout)
    adv = group_advantages(rewards, n, "group")
    loss, _ = policy_loss(new.logprobs, logprobs_old, adv, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_lm(args: argparse.Namespace) -> dict[str, float]:
    import sentencepiece as spm

    config = load_config(ROOT / args.lm_config)
    rl = config.rl
    model = model_for(config, args.lm_init)
    tokenizer = spm.SentencePieceProcessor(model_file=str(Path(config.data.path) / "tokenizer.model"))
    prompts = ArithmeticPrompts(
        config.train.seed, rl.arithmetic_ops, rl.arithmetic_max_digits, 1, rl.prompts_per_step
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    totals = {"rollout_s": 0.0, "update_s": 0.0, "new_tokens": 0, "train_tokens": 0}
    for step in range(args.steps + 1):
        questions = prompts.train_questions(step, 0, rl.prompts_per_step)
        encoded = [[tokenizer.bos_id(), *tokenizer.encode(p)] for p, _ in questions]
        ids, mask = left_pad(encoded, pad_id=max(tokenizer.pad_id(), 0))
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            ro = lm_rollout(
                model, ids, attention_mask=mask, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                temperature=rl.temperature, seed=step, eos_id=tokenizer.eos_id(),
                vocab_limit=tokenizer.get_piece_size(),
            )  # fmt: skip
            texts = [tokenizer.decode(t) for t in ro.completion_lists(tokenizer.eos_id())]
            repeat = [q for q in questions for _ in range(rl.group_size)]
            rewards, _ = combine_rewards(
                rl.rewards, prompts=[p for p, _ in repeat], completions=texts, answers=[a for _, a in repeat]
            )
        t1 = time.perf_counter()
        model.train()
        update(model, optimizer, ro, (ro.logprobs, ro.completion_mask), rewards, rl.group_size)
        t2 = time.perf_counter()
        if step == 0:
            continue  # warm-up
        totals["rollout_s"] += t1 - t0
        totals["update_s"] += t2 - t1
        totals["new_tokens"] += int(ro.completion_mask.sum())
        totals["train_tokens"] += int(ro.prompt_mask.sum()) + int(ro.completion_mask.sum())
    return totals


def bench_puzzle(args: argparse.Namespace) -> dict[str, float]:
    config = load_config(ROOT / args.puzzle_config)
    rl = config.rl
    model = model_for(config, args.puzzle_init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = iterate_split(config.data.path, config.data.train_split, batch_size=rl.prompts_per_step)
    totals = {"rollout_s": 0.0, "update_s": 0.0, "new_tokens": 0, "train_tokens": 0}
    for step in range(args.steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            ro = puzzle_rollout(model, batch, group_size=rl.group_size, temperature=rl.temperature,
                                halting=rl.halting, seed=step)  # fmt: skip
            total, _ = combine_rewards(rl.rewards, tokens=ro.tokens, inputs=ro.batch["inputs"])
            fraction = compute_fraction(ro.segments, config.model.halt_max_steps)
            rewards = shape_for_compute(total, fraction, rl.compute_cost_lambda)
        t1 = time.perf_counter()
        model.train()
        update(model, optimizer, ro, (ro.logprobs, ro.mask), rewards, rl.group_size)
        t2 = time.perf_counter()
        if step == 0:
            continue
        totals["rollout_s"] += t1 - t0
        totals["update_s"] += t2 - t1
        totals["new_tokens"] += ro.tokens.numel()
        # puzzle_policy recomputes every row for the batch's longest run of segments
        totals["train_tokens"] += ro.tokens.numel() * int(ro.segments.max())
    return totals


# A rollout worker: reads jobs (prompts, options) as JSON lines, answers with the time lm_rollout took and
# what it sampled. Run with the hrm_mega tree to measure first on sys.path.
WORKER = r"""
import json, sys, time
import torch
import hrm_mega
from hrm_mega.config import load_config
from hrm_mega.models import build_model
from hrm_mega.rl.rollout import lm_rollout

setup = json.loads(sys.argv[1])
torch.set_num_threads(setup["threads"])
model = build_model(load_config(setup["config"]).model)
model.load_state_dict(torch.load(setup["weights"], weights_only=True))
model.eval()
print(json.dumps({"hrm_mega": hrm_mega.__file__}), flush=True)
for line in sys.stdin:  # a job: rollouts to run one after the other, timed together
    out = {"seconds": 0.0, "cpu_seconds": 0.0, "new_tokens": 0, "tokens": [], "logprobs": [], "cycles": []}
    for job in json.loads(line):
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            ro = lm_rollout(model, ids, attention_mask=mask, **job["options"])
        out["seconds"] += time.perf_counter() - start
        out["cpu_seconds"] += time.process_time() - cpu
        out["new_tokens"] += int(ro.completion_mask.sum())
        out["tokens"].append(ro.completion_ids.tolist())
        out["logprobs"].append(ro.logprobs.tolist())
        out["cycles"].append(ro.cycles.tolist())
    print(json.dumps(out), flush=True)
"""


class RolloutWorker:
    """A process running WORKER with `tree`'s hrm_mega first on its path."""

    def __init__(self, tree: Path, config: Path, weights: Path, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        setup = json.dumps({"config": str(config), "weights": str(weights), "threads": threads})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, setup], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=tree, text=True,
        )  # fmt: skip
        loaded = Path(self.read()["hrm_mega"]).resolve()
        if tree.resolve() not in loaded.parents:
            raise RuntimeError(f"the worker for {tree} imported {loaded}")

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a rollout worker died; see its traceback above")
        return json.loads(line)

    def run(self, job: list[dict]) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare_rollout(args: argparse.Namespace) -> None:
    """Old (commit args.compare_rollout) against new (the working tree) LM rollouts, alternated."""
    import sentencepiece as spm

    config = load_config(ROOT / args.lm_config)
    rl = config.rl
    data = Path(args.lm_data or config.data.path)
    tokenizer = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    group = rl.group_size
    prompts = ArithmeticPrompts(config.train.seed, rl.arithmetic_ops, rl.arithmetic_max_digits, 1, 64)
    new_tokens = args.max_new_tokens or rl.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="rl_rollout_") as tmp:
        old_tree = Path(tmp) / "old"
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.compare_rollout, "hrm_mega", "configs"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(old_tree, filter="data")
        weights = Path(tmp) / "weights.pt"
        torch.save(model_for(config, args.lm_init).state_dict(), weights)
        workers = {
            "old": RolloutWorker(old_tree, old_tree / args.lm_config, weights, args.threads),
            "new": RolloutWorker(ROOT, ROOT / args.lm_config, weights, args.threads),
        }
        rates: dict[str, list[float]] = {"old": [], "new": [], "old_cpu": [], "new_cpu": []}
        same_tokens = same_logprobs = True
        print(
            f"LM rollouts at batch {args.rollout_batch} ({args.rollout_batch // group} prompts x {group} samples), "
            f"up to {new_tokens} new tokens, {args.rollouts_per_round} rollouts per worker and round, "
            f"{args.threads} thread(s); old = {args.compare_rollout}, new = the working tree"
        )
        for r in range(args.rounds + 1):
            job = []  # args.rollouts_per_round rollouts of rollout_batch rows, each its own prompts and seed
            for i in range(args.rollouts_per_round):
                step = r * args.rollouts_per_round + i
                questions = prompts.train_questions(step, 0, args.rollout_batch // group)
                encoded = [[tokenizer.bos_id(), *tokenizer.encode(p)] for p, _ in questions]
                ids, mask = left_pad(encoded, pad_id=max(tokenizer.pad_id(), 0))
                options = dict(
                    group_size=group, max_new_tokens=new_tokens, temperature=rl.temperature, seed=step,
                    eos_id=tokenizer.eos_id(), vocab_limit=tokenizer.get_piece_size(),
                )  # fmt: skip
                job.append({"ids": ids.tolist(), "mask": mask.tolist(), "options": options})
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            out = {name: workers[name].run(job) for name in order}
            same_tokens &= (
                out["old"]["tokens"] == out["new"]["tokens"] and out["old"]["cycles"] == out["new"]["cycles"]
            )
            same_logprobs &= out["old"]["logprobs"] == out["new"]["logprobs"]
            if r == 0:
                continue  # warm-up
            line = []
            for name in ("old", "new"):
                rates[name].append(out[name]["new_tokens"] / out[name]["seconds"])
                rates[f"{name}_cpu"].append(out[name]["new_tokens"] / out[name]["cpu_seconds"])
                line.append(
                    f"{name} {rates[name][-1]:7.1f} tok/s ({rates[f'{name}_cpu'][-1]:7.1f} per CPU s)"
                )
            ratio, cpu_ratio = (
                rates["new"][-1] / rates["old"][-1],
                rates["new_cpu"][-1] / rates["old_cpu"][-1],
            )
            print(f"round {r} ({'-'.join(order)}): {'  '.join(line)}  new/old {ratio:.2f} ({cpu_ratio:.2f})")
        for w in workers.values():
            w.close()
    for suffix, unit in (("", "tok/s"), ("_cpu", "tok per CPU s")):
        old, new = statistics.median(rates["old" + suffix]), statistics.median(rates["new" + suffix])
        print(f"median: old {old:.1f} {unit}, new {new:.1f} {unit}, new/old {new / old:.2f}x")
    print(f"same samples: tokens and cycles {'yes' if same_tokens else 'NO'}, log-probs bit for bit "
          f"{'yes' if same_logprobs else 'NO'}")  # fmt: skip


def report(name: str, t: dict[str, float], steps: int) -> None:
    step_s = t["rollout_s"] + t["update_s"]
    print(
        f"{name:<8} rollout {t['new_tokens'] / t['rollout_s']:>9.1f} tok/s  "
        f"training {t['train_tokens'] / t['update_s']:>9.1f} tok/s  "
        f"rollout share {t['rollout_s'] / step_s:>6.1%}  training share {t['update_s'] / step_s:>6.1%}  "
        f"step {step_s / steps:>6.2f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("lm", "puzzle", "both"), default="both")
    p.add_argument("--lm-config", default="configs/rl/grpo_arith_tiny.yaml")
    p.add_argument("--puzzle-config", default="configs/rl/grpo_sudoku_tiny.yaml")
    p.add_argument("--lm-init", default=None, help="checkpoint for the LM (default: fresh weights)")
    p.add_argument(
        "--puzzle-init", default=None, help="checkpoint for the puzzle model (default: fresh weights)"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-rollout", metavar="REF", help="time LM rollouts against git commit REF's code")
    p.add_argument("--lm-data", help="the LM's tokenizer directory (default: the recipe's data.path)")
    p.add_argument("--rollout-batch", type=int, default=8, help="rows per rollout (prompts x group_size)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: the recipe's rl.max_new_tokens")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rollouts-per-round", type=int, default=4, help="rollouts each worker times per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.compare_rollout:
        compare_rollout(args)
        return
    print(f"GRPO steps on the CPU, {args.threads} threads, mean of {args.steps} steps after a warm-up")
    if args.family in ("lm", "both"):
        report("lm", bench_lm(args), args.steps)
    if args.family in ("puzzle", "both"):
        report("puzzle", bench_puzzle(args), args.steps)


if __name__ == "__main__":
    main()
