"""Optimizer step time: AdamATan2 against torch.optim.AdamW(foreach=True) on the paper-scale model.

The parameters are those of configs/puzzle/hrm_sudoku.yaml's RecursiveReasoner (27.3M, the puzzle
embedding left out: it has its own sign-SGD), fp32 on the CPU, with fixed random gradients. AdamATan2
runs eager (cache-sized slices) and with compile=True (one compiled kernel per tensor). Every optimizer
first takes one step (its state exists; the compiled one compiles), then the rounds alternate them,
timing --steps steps each; the ratios are each AdamATan2's mean step time over AdamW's, and over each
one's best round. The bar (issue #23): at most 1.2x.

    python bench/optimizer_step.py [--rounds 6] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hrm_mega.config import load_config
from hrm_mega.models import build_model
from hrm_mega.optim.adam_atan2 import AdamATan2

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs/puzzle/hrm_sudoku.yaml").model)
    params = [p for name, p in model.named_parameters() if "puzzle_emb" not in name]
    for p_ in params:
        p_.grad = torch.randn_like(p_)
    optimizers = {
        "AdamATan2": AdamATan2(params, lr=1e-4, weight_decay=0.1),
        "AdamATan2(compile)": AdamATan2(params, lr=1e-4, weight_decay=0.1, compile=True),
        "AdamW(foreach)": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True),
    }
    for name, opt in optimizers.items():
        start = time.perf_counter()
        opt.step()
        print(f"  first step of {name}: {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{len(params)} tensors, {sum(p_.numel() for p_ in params):,} parameters, fp32, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    for name, t in times.items():
        print(f"  {name:<19} mean {1e3 * sum(t) / len(t):8.1f} ms   best {1e3 * min(t):8.1f} ms")
    mean = {name: sum(t) / len(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    for name in ("AdamATan2", "AdamATan2(compile)"):
        print(f"{name} / AdamW: mean {mean[name] / mean['AdamW(foreach)']:.3f}, "
              f"best {best[name] / best['AdamW(foreach)']:.3f} (bar: <= 1.2)")  # fmt: skip


if __name__ == "__main__":
    main()
