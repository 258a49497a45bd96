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
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"GRPO steps on the CPU, {args.threads} threads, mean of {args.steps} steps after a warm-up")
    if args.family in ("lm", "both"):
        report("lm", bench_lm(args), args.steps)
    if args.family in ("puzzle", "both"):
        report("puzzle", bench_puzzle(args), args.steps)


if __name__ == "__main__":
    main()
