"""MFU of the official HRM implementation next to hrm-mega's, interleaved in one process.

Both models are the paper-scale sudoku HRM (hidden 512, 8 heads, 4+4 layers, N=T=2, batch 32), both
train one ACT segment per step with HRM's bootstrap look-ahead, and both take the adam-atan2 package's
update with no gradient clipping (HRM's pretrain.py clips nothing): the official side through
PackageAdamATan2 below, a transcription of the package's kernel in torch ops (the package itself is
CUDA-only), hrm-mega through its AdamATan2 as the trainer builds it on the CPU (the eager update in
cache-sized slices, also under --compile: train.compile compiles the optimizer only on GPUs).
Steps of the two alternate, the first of a round swapping every round, and the matmul peak is measured
between rounds, so machine noise hits both alike. FLOPs are hrm-mega's executed-FLOP count
(hrm_mega.models.summary.segment_flops) for both.

--dtype bfloat16: the official model computes in bf16 from fp32 weights (its forward_dtype; CastedLinear
casts the weights every call); hrm-mega's model is cast to bf16 as a bf16 run's engine does, and its
AdamATan2 keeps fp32 moments. The peak is then the bf16 square-matmul rate.

The official code (github.com/sapientinc/HRM) is not part of this repository: pass a checkout of it.
Its attention imports flash-attn, which has no CPU build; a stand-in module with the same call
signature, backed by torch's scaled_dot_product_attention, is registered before importing it.

    python bench/official_hrm_mfu.py --hrm-repo /path/to/HRM [--compile] [--dtype bfloat16] [--rounds 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hrm_mega.config import load_config  # noqa: E402
from hrm_mega.models.act import initial_state, step_segment  # noqa: E402
from hrm_mega.models.puzzle import RecursiveReasoner  # noqa: E402
from hrm_mega.models.summary import segment_flops  # noqa: E402
from hrm_mega.optim import AdamATan2  # noqa: E402


def cpu_flash_attn_func(q, k, v, causal=False, **_):
    """flash-attn's layout ([batch, seq, heads, head_dim]) on top of SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


class PackageAdamATan2(torch.optim.Optimizer):
    """The adam-atan2 package's update (csrc/adam_atan2.cu, adam_math), written out per tensor for the
    CPU, independently of hrm_mega.optim. With t the step count: p *= 1 - lr*wd; m = lerp(m, g, 1-b1);
    v = lerp(v, g*g, 1-b2); p -= lr / (1-b1^t) * atan2(m, sqrt(v) / sqrt(1-b2^t))."""

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                p.mul_(1 - lr * wd)
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].lerp_(p.grad.square(), 1 - b2)
                denom = st["v"].sqrt().div_(math.sqrt(1 - b2 ** st["t"]))
                p.sub_(torch.atan2(st["m"], denom).mul_(lr / (1 - b1 ** st["t"])))


def official_model(repo: Path, batch: int, dtype: str):
    shim = types.ModuleType("flash_attn")
    shim.flash_attn_func = cpu_flash_attn_func
    sys.modules.setdefault("flash_attn", shim)
    sys.path.insert(0, str(repo))
    from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
    from models.losses import ACTLossHead

    arch = dict(batch_size=batch, seq_len=81, puzzle_emb_ndim=512, num_puzzle_identifiers=1, vocab_size=11,
                H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, expansion=4, num_heads=8,
                pos_encodings="rope", halt_max_steps=16, halt_exploration_prob=0.1, forward_dtype=dtype)  # fmt: skip
    return ACTLossHead(HierarchicalReasoningModel_ACTV1(arch), "stablemax_cross_entropy").train()


def matmul_rate(seconds: float = 1.0, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(n, n, dtype=dtype)
    a @ a
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hrm-repo", type=Path, required=True, help="a checkout of github.com/sapientinc/HRM")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile both (the official pretrain.py default)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (args.hrm_repo / "models/hrm/hrm_act_v1.py").is_file():
        sys.exit(
            f"--hrm-repo {args.hrm_repo}: not a checkout of sapientinc/HRM (no models/hrm/hrm_act_v1.py)"
        )
    torch.set_num_threads(args.threads)
    b = args.batch

    dtype = getattr(torch, args.dtype)
    ref = official_model(args.hrm_repo, b, args.dtype)
    config = load_config(ROOT / "configs/puzzle/hrm_sudoku.yaml").model
    ours = RecursiveReasoner(config).init_weights(0).to(dtype)
    ref_fwd, ours_fwd = ref, ours
    if args.compile:
        ref_fwd = torch.compile(ref, dynamic=False)
        ours.compile()
        ours_fwd = ours
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, 11, (b, 81), generator=g),
        "labels": torch.randint(2, 11, (b, 81), generator=g),
        "puzzle_identifiers": torch.zeros(b, dtype=torch.int32),
    }
    opt_ref = PackageAdamATan2([p for p in ref.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    # as Trainer.build_optimizer on the CPU: eager, also under --compile
    opt_ours = AdamATan2(ours.parameters(), lr=1e-4, weight_decay=0.1)
    carry = ref.initial_carry(batch)
    state = initial_state(ours, {**batch, "puzzle_identifiers": batch["puzzle_identifiers"].long()})

    def step_ref() -> None:
        nonlocal carry
        carry, loss, *_ = ref_fwd(carry=carry, batch=batch, return_keys=[])
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    def step_ours() -> None:
        nonlocal state
        loss, _, state, _ = step_segment(ours_fwd, config, state, training=True)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (and compilation)
        step_ref()
        step_ours()
    times: dict[str, list[float]] = {"official HRM": [], "hrm-mega": []}
    peaks = []
    contenders = [("official HRM", step_ref), ("hrm-mega", step_ours)]
    for round_ in range(args.rounds):
        peaks.append(matmul_rate(dtype=dtype))
        order = contenders if round_ % 2 == 0 else contenders[::-1]  # each goes first half the time
        for name, step in order:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    flops, peak = segment_flops(config).train_per_segment * b, max(peaks)
    mode = "torch.compile" if args.compile else "eager"
    print(f"paper-scale sudoku HRM, batch {b}, {args.dtype}, {mode}, {args.threads} threads; "
          f"{flops / 1e9:.0f} GFLOP/step; matmul peak {peak / 1e9:.0f} GFLOP/s (best of {len(peaks)})")  # fmt: skip
    for name, ts in times.items():
        best, mean = min(ts), sum(ts) / len(ts)
        print(f"  {name:<13} best {best * 1e3:6.0f} ms/step  MFU {flops / best / peak:5.1%}   "
              f"mean {mean * 1e3:6.0f} ms/step  MFU {flops / mean / peak:5.1%}")  # fmt: skip
        print(f"  {'':<13} rounds (ms): {' '.join(f'{t * 1e3:.0f}' for t in ts)}")
    ref_t, ours_t = (sum(t) / len(t) for t in times.values())
    print(f"hrm-mega throughput / official: {ref_t / ours_t:.3f} (means)")


if __name__ == "__main__":
    main()
