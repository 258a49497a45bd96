"""Paged KV cache with offload: the same tokens with a quarter of the blocks resident, and the bytes.

Generates greedily for a batch of prompts of mixed lengths with HRMGemma (by default a random-init model
of configs/lm/hrmgemma_tiny.yaml, fp32; or --checkpoint) four ways:

1. uncached: the full-sequence reference (every step recomputes everything);
2. rectangular: the KVCache of models/kv_cache.py;
3. paged: models/paged_kv_cache.py with every block resident; its peak block count is the run's need;
4. paged + offload: a resident budget of --fraction (default 1/4) of that peak; the other blocks go to
   memory-mapped files and come back when an attention call needs them.

Prints per run the wall time and whether its tokens and cycles equal the reference, and for the paged
runs: peak blocks held, the resident frames' bytes (what the budget bounds) against all KV bytes at the
peak, blocks offloaded and reloaded, copies on write, and the largest transient view one attention call
gathers (SDPA needs contiguous keys/values; a paged-attention kernel would read the blocks in place).
Exit status 1 when any run's tokens differ or resident bytes exceed the budget.

--kv-int8 adds the paged cache with int8 keys/values (a scale per token and head), whole and with the
same resident fraction, and reports against the fp32 reference: the share of free-running greedy tokens
equal to it (and the first step that differs), and, feeding both caches the reference's tokens
(teacher forcing, so every step compares the same context), the share of steps whose argmax agrees and
the largest |logit difference|; plus the KV bytes at the peak against the fp32 paged cache's. Its
tokens may differ (int8 is lossy), so it does not set the exit status, except that the offloaded int8
run must give the whole int8 run's tokens.

    python bench/paged_kv.py [--checkpoint CKPT] [--prompts 6] [--new-tokens 48] [--block-size 16]
        [--fraction 0.25] [--max-cycles N] [--threads 2] [--kv-int8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="an HRMGemma checkpoint (default: random-init hrmgemma_tiny)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--max-cycles", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-int8", action="store_true", help="also the int8 KV cache, against fp32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.config import load_config
    from hrm_mega.inference.generate import generate, left_pad
    from hrm_mega.models import build_model
    from hrm_mega.models.paged_kv_cache import pool_for

    if args.checkpoint:
        model = load_model(args.checkpoint)[0].eval()
    else:
        config = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml")
        model = build_model(config.model).init_weights(0).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = [16 + (37 * i) % 160 for i in range(args.prompts)]
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(prompts)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=args.new_tokens, greedy=True, max_cycles=args.max_cycles
    )
    c = model.config
    print(f"model: {c.num_layers} layers, h_cycles={c.h_cycles} l_cycles={c.l_cycles}, window {c.sliding_window}, "
          f"{c.num_kv_heads} kv heads x {c.head_dim}; {args.prompts} prompts of {min(lengths)}-{max(lengths)} "
          f"tokens, {args.new_tokens} new tokens each, max_cycles={args.max_cycles or c.h_cycles}")  # fmt: skip

    def timed(**extra):
        start = time.perf_counter()
        out = generate(model, ids, **kwargs, **extra)
        return out, time.perf_counter() - start

    reference, t_ref = timed(use_cache=False)
    print(f"{'uncached':<16} {t_ref:7.2f} s  (reference)")
    ok = True
    rect, t_rect = timed()
    same = torch.equal(rect.tokens, reference.tokens) and torch.equal(rect.cycles, reference.cycles)
    ok &= same
    print(f"{'rectangular':<16} {t_rect:7.2f} s  tokens equal: {same}")

    full = pool_for(model, block_size=args.block_size)
    paged, t_paged = timed(kv_pool=full)
    peak = full.counters["peak_blocks"]
    budget = max(1, int(peak * args.fraction))
    small = pool_for(model, block_size=args.block_size, resident_blocks=budget)
    offload, t_off = timed(kv_pool=small)
    width = max(lengths) + args.new_tokens
    view = 2 * args.prompts * width * c.num_kv_heads * c.head_dim * full.frames.element_size()
    mib = 1 / 2**20
    for name, pool, out, t in (("paged", full, paged, t_paged), ("paged+offload", small, offload, t_off)):
        same = torch.equal(out.tokens, reference.tokens) and torch.equal(out.cycles, reference.cycles)
        ok &= same
        k = pool.counters
        print(
            f"{name:<16} {t:7.2f} s  tokens equal: {same}; peak blocks {k['peak_blocks']} "
            f"({k['peak_blocks'] * pool.block_bytes * mib:.2f} MiB of KV), resident frames "
            f"{pool.resident_bytes() * mib:.2f} MiB (peak {k['peak_resident']} blocks in them), "
            f"offloaded {k['offloaded']}, reloaded {k['reloaded']}, copied on write {k['copied_on_write']}"
        )
    within = (
        small.resident_bytes() <= budget * small.block_bytes and small.counters["peak_resident"] <= budget
    )
    ok &= within
    print(
        f"budget: {budget} of {peak} blocks ({args.fraction:.0%}) = {budget * small.block_bytes * mib:.2f} MiB; "
        f"resident KV bytes within it: {within}; second tier {small.second_tier_bytes() * mib:.2f} MiB; "
        f"largest transient view of one attention call {view * mib:.2f} MiB"
    )
    if args.kv_int8:
        ok &= int8_report(model, ids, mask, kwargs, reference, full, args, budget, timed)
    return 0 if ok else 1


def int8_report(model, ids, mask, kwargs, reference, fp32_pool, args, budget, timed) -> bool:
    """The int8 runs (module docstring); False when offloading changes the int8 tokens."""
    from hrm_mega.models.paged_kv_cache import pool_for

    whole = pool_for(model, block_size=args.block_size, kv_dtype="int8")
    int8, t_int8 = timed(kv_pool=whole)
    small = pool_for(model, block_size=args.block_size, kv_dtype="int8", resident_blocks=budget)
    offload, t_off = timed(kv_pool=small)
    same_offload = torch.equal(offload.tokens, int8.tokens) and torch.equal(offload.cycles, int8.cycles)
    equal = int8.tokens == reference.tokens  # [b, n]
    differs = (~equal).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else None
    forced_int8 = forced_logits(model, ids, mask, reference.tokens, whole, args.max_cycles)
    forced_fp32 = forced_logits(model, ids, mask, reference.tokens, pool_for(model, block_size=args.block_size),
                                args.max_cycles)  # fmt: skip
    agree = (forced_int8.argmax(-1) == forced_fp32.argmax(-1)).float().mean().item()
    diff = (forced_int8 - forced_fp32).abs().max().item()
    scale = forced_fp32.abs().max().item()
    peak, peak32 = whole.counters["peak_blocks"], fp32_pool.counters["peak_blocks"]
    ratio = peak * whole.block_bytes / (peak32 * fp32_pool.block_bytes)
    mib = 1 / 2**20
    print(
        f"{'paged int8':<16} {t_int8:7.2f} s  greedy tokens equal to fp32: {equal.float().mean().item():.1%} "
        f"(first difference at step {first}); teacher-forced argmax agreement {agree:.2%}, max |logit "
        f"difference| {diff:.4f} (max |logit| {scale:.2f}); KV at the peak {peak * whole.block_bytes * mib:.2f} "
        f"MiB = {ratio:.3f}x the fp32 paged cache's ({whole.block_bytes} of {fp32_pool.block_bytes} bytes "
        f"per block)"
    )
    print(
        f"{'paged int8+off.':<16} {t_off:7.2f} s  tokens equal to paged int8: {same_offload}; resident frames "
        f"{small.resident_bytes() * mib:.2f} MiB, offloaded {small.counters['offloaded']}"
    )
    return same_offload


def forced_logits(model, ids, mask, tokens, pool, max_cycles) -> torch.Tensor:
    """Next-token logits [b, n, vocab] after the prompt and after each of `tokens`' columns but the last,
    decoding against a paged cache on `pool` (teacher forcing)."""
    from hrm_mega.models.paged_kv_cache import PagedKVCache

    cache = PagedKVCache(pool)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    step = {"max_cycles": max_cycles, "cache": cache}
    with torch.no_grad():
        logits, _ = model.infer(ids, attention_mask=mask, position_ids=positions, **step)
        out = [logits[:, -1].float()]
        last = positions[:, -1:]
        for i in range(tokens.shape[1] - 1):
            last = last + 1
            column = tokens[:, i : i + 1]
            logits, _ = model.infer(column, attention_mask=torch.ones_like(column), position_ids=last, **step)
            out.append(logits[:, -1].float())
    cache.release()
    return torch.stack(out, dim=1)


if __name__ == "__main__":
    sys.exit(main())
