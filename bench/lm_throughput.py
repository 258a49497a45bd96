"""HRMGemma on the CPU against cycles: train tokens/s and MFU, prefill and decode tokens/s, KV-cache bytes.

A recipe (default configs/lm/hrmgemma_tiny.yaml, `--set` overrides) with random-init weights, in one
precision, on `--threads` cores. Three sections, each over the cycle counts of `--cycles`:

1. train: a bare PyTorch loop, no trainer: forward on a synthetic packed batch (documents of random
   length, document-causal masking via doc_ids), lm_loss (CE + halting BCE + compute cost), backward,
   gradient clipping, AdamW. N = the H cycles of every CycleBlock (forward(cycles=N)). Each
   figure is the mean of --steps timed steps after --warmup steps.
   MFU = counted FLOPs per second / the best large-square-matmul rate measured in this process (same
   dtype, same threads). FLOPs counted (train_step_flops): the matmuls a step executes, 2 per multiply-add:
     - per layer run and token: q, k, v, o projections and the GeGLU's gate, up and down projections;
     - per layer run and sequence: attention scores q k^T and the mixing p v over all s keys and all
       query heads. On the CPU, scaled_dot_product_attention with a boolean mask computes every score,
       the masked ones too, so local layers and document boundaries do not reduce the count;
     - the tied LM head once per token;
     - layer runs per token: G groups x N x (T x local_per_global + 1) + trailing local layers;
     - backward = 2 x the forward of what the grad mode differentiates (full: every update; last_cycle:
       the last H cycle of each group; one_step: one L and one H update), plus the tail and the head.
   Not counted: embedding lookup, norms, RoPE, softmax, gates, halting heads (hidden x 1), the loss and
   the optimizer (elementwise work, or matmuls too small to matter).
2. decode: stream_generate, greedy, no early halting, max_cycles from --cycles: time of the prefill
   (first forward over the prompt, up to the first new token), then decode tokens/s over the remaining
   new tokens with the KV cache. For comparison, uncached decoding (use_cache=False: every step
   recomputes the whole sequence) at one cycle count (the recipe's h_cycles if it is in --cycles), over
   fewer tokens, with a check that it picks the same greedy tokens as the cached run.
3. kv: KVCache.nbytes() after a prefill of S - D tokens and D greedy decode steps (S positions cached),
   per max_cycles and S, next to the expectation from the config:
       bytes = 2 (k and v) x batch x kv_heads x head_dim x bytes per element
               x [local slots x min(S, window - 1) + global slots x S]
       local slots  = G x local_per_global x max_cycles x T + trailing local layers
       global slots = G x max_cycles
   (one slot per (layer, cycle step); local layers keep only window - 1 positions). A mismatch is
   flagged and makes the script exit with status 1. "held" is the bytes of the distinct storages the
   slots keep alive, which exceeds nbytes() when a slot's tensor is a view of a larger buffer.

    python bench/lm_throughput.py [--config configs/lm/hrmgemma_tiny.yaml] [--set model.KEY=VALUE ...]
        [--cycles 1,2,4] [--batch 8] [--seq-len 128] [--steps 3] [--prompt-len 64] [--new-tokens 64]
        [--decode-batches 1,4] [--kv-lengths 64,256,1024] [--precision fp32|bf16] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_throughput import matmul_peak  # bench/ is on sys.path when this file runs as a script

from hrm_mega.config import Config, LMModelConfig, load_config
from hrm_mega.inference.generate import left_pad, stream_generate
from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.lm import HRMGemma, document_starts, lm_loss

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = ("train", "decode", "kv")
# --quick: a ~20 s smoke run. Options given explicitly on the command line still win.
QUICK = {
    "cycles": [1, 2], "batch": 2, "seq_len": 64, "steps": 1, "warmup": 1, "prompt_len": 16,
    "new_tokens": 8, "decode_batches": [1, 2], "uncached_tokens": 4, "kv_lengths": [8, 32, 64],
    "kv_decode": 4, "peak_seconds": 0.6,
}  # fmt: skip


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def build_model(config: Config, dtype: torch.dtype) -> HRMGemma:
    return HRMGemma(config.model).init_weights(0).to(dtype)


# --- 1. training ----------------------------------------------------------------------------------


def packed_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tokens packed into rows as `hrm-mega prep text` packs documents: documents of random length
    (8 to seq_len/2 tokens) back to back, doc_ids numbering them, no label at a document's first token."""
    input_ids = torch.randint(1, vocab, (batch, seq_len), generator=generator)
    doc_ids = torch.empty(batch, seq_len, dtype=torch.long)
    shortest = min(8, seq_len)
    longest = max(shortest, seq_len // 2)
    for row in range(batch):
        start, doc = 0, 0
        while start < seq_len:
            length = int(torch.randint(shortest, longest + 1, (), generator=generator))
            doc_ids[row, start : start + length] = doc
            start, doc = start + length, doc + 1
    labels = input_ids.masked_fill(document_starts(doc_ids), -100)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}


def layer_runs_per_token(c: LMModelConfig, cycles: int) -> int:
    """Transformer-layer evaluations per token in one forward with `cycles` H cycles per block."""
    return c.num_groups * cycles * (c.l_cycles * c.local_per_global + 1) + c.num_tail_layers


def train_step_flops(
    c: LMModelConfig, cycles: int, batch: int, seq_len: int, pairs: float | None = None
) -> float:
    """Matmul FLOPs of one training step (forward + backward), as the module docstring counts them.
    pairs: (query, key) pairs scored per row; default seq_len^2 (dense), the sum of squared document
    lengths per row for per-document attention."""
    h, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
    projections = 2 * (2 * h * c.num_heads * d + 2 * h * c.num_kv_heads * d)  # q, o and k, v
    mlp = 2 * 3 * h * inter  # GeGLU: gate, up, down
    pairs = seq_len * seq_len if pairs is None else pairs
    attention = 2 * 2 * c.num_heads * d * pairs  # q k^T and p v over the scored pairs
    layer = seq_len * (projections + mlp) + attention  # one layer run over one sequence
    head = 2 * seq_len * h * c.vocab_size
    group_runs = cycles * (c.l_cycles * c.local_per_global + 1)
    differentiated_runs = {
        "full": group_runs,
        "last_cycle": c.l_cycles * c.local_per_global + 1,
        "one_step": c.local_per_global + 1,
    }[c.grad_mode]
    forward = (c.num_groups * group_runs + c.num_tail_layers) * layer + head
    differentiated = (c.num_groups * differentiated_runs + c.num_tail_layers) * layer + head
    return batch * (forward + 2 * differentiated)


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Mean seconds per call of `step` over `steps` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def train_section(args: argparse.Namespace, config: Config, dtype: torch.dtype, peak: float) -> None:
    c, o = config.model, config.optim
    model = build_model(config, dtype).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    batch = packed_batch(args.batch, args.seq_len, c.vocab_size, torch.Generator().manual_seed(0))

    def step(cycles: int) -> None:
        logits, aux = model(batch["input_ids"], doc_ids=batch["doc_ids"], cycles=cycles)
        lm_loss(logits, batch["labels"], aux, c)["loss"].backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = args.batch * args.seq_len
    print(f"\ntrain: bare loop (forward with doc_ids, lm_loss, backward, clip, AdamW), batch {args.batch} x "
          f"seq {args.seq_len} packed, T={c.l_cycles}, grad {c.grad_mode}; {args.warmup} warm-up + "
          f"{args.steps} timed steps")  # fmt: skip
    print(f"{'N':>3} {'layers/token':>12} {'ms/step':>9} {'tok/s':>9} {'GFLOP/step':>11} {'MFU':>6}")
    for cycles in args.cycles:
        seconds = time_steps(functools.partial(step, cycles), args.steps, args.warmup)
        flops = train_step_flops(c, cycles, args.batch, args.seq_len)
        runs = layer_runs_per_token(c, cycles)
        print(f"{cycles:>3} {runs:>12} {seconds * 1e3:>9.0f} {tokens / seconds:>9.0f} "
              f"{flops / 1e9:>11.2f} {flops / seconds / peak:>6.1%}", flush=True)  # fmt: skip


# --- 2. decoding ----------------------------------------------------------------------------------


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(batch)])


def time_decode(
    model: HRMGemma, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, max_cycles: int, use_cache: bool
) -> tuple[float, float, torch.Tensor]:
    """Greedy stream_generate: (seconds to the first new token, seconds for the remaining ones,
    new tokens [b, n])."""
    steps = stream_generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, max_cycles=max_cycles,
                            greedy=True, use_cache=use_cache)  # fmt: skip
    start = time.perf_counter()
    tokens = [next(steps).tokens]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens += [step.tokens for step in steps]
    return prefill, time.perf_counter() - start, torch.stack(tokens, dim=1)


def decode_section(args: argparse.Namespace, config: Config, dtype: torch.dtype) -> None:
    c = config.model
    model = build_model(config, dtype).eval()
    steps = args.new_tokens - 1  # the prefill produces the first new token
    print(f"\ndecode: stream_generate greedy, no early halting; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens = prefill + {steps} decode steps")  # fmt: skip
    print(f"{'batch':>5} {'max_cycles':>10} {'cache':>5} {'tokens':>6} {'prefill ms':>10} {'ms/step':>8} "
          f"{'decode tok/s':>12}")  # fmt: skip
    uncached_cycles = c.h_cycles if c.h_cycles in args.cycles else args.cycles[0]
    for batch in args.decode_batches:
        ids, mask = random_prompts(batch, args.prompt_len, c.vocab_size, seed=batch)
        time_decode(model, ids, mask, 2, max(args.cycles), use_cache=True)  # warm-up: first-call costs
        cached = {}
        for cycles in args.cycles:
            prefill, seconds, tokens = time_decode(model, ids, mask, args.new_tokens, cycles, use_cache=True)
            cached[cycles] = tokens
            print(f"{batch:>5} {cycles:>10} {'yes':>5} {args.new_tokens:>6} {prefill * 1e3:>10.1f} "
                  f"{seconds / steps * 1e3:>8.1f} {batch * steps / seconds:>12.1f}", flush=True)  # fmt: skip
        n = args.uncached_tokens
        prefill, seconds, tokens = time_decode(model, ids, mask, n, uncached_cycles, use_cache=False)
        same = torch.equal(tokens, cached[uncached_cycles][:, :n])
        print(f"{batch:>5} {uncached_cycles:>10} {'no':>5} {n:>6} {prefill * 1e3:>10.1f} "
              f"{seconds / (n - 1) * 1e3:>8.1f} {batch * (n - 1) / seconds:>12.1f}   "
              f"(greedy tokens {'equal' if same else 'DIFFER from'} the cached run's)",
              flush=True)  # fmt: skip


# --- 3. KV-cache bytes ----------------------------------------------------------------------------


def storage_bytes(cache: KVCache) -> tuple[int, int, int]:
    """(tensor bytes of local-layer slots, of global-layer slots, bytes of every distinct storage the
    slots keep alive). Tensors shared by several slots count once, as in KVCache.nbytes()."""
    tensors: dict[str, dict[int, int]] = {"local": {}, "global": {}}
    storages: dict[int, int] = {}
    for layer, slots in cache.slots.items():
        kind = "global" if ".H." in layer else "local"  # blocks.g.H.i; blocks.g.L.i and tail.i are local
        for s in slots:
            for t in (s.k, s.v):
                if t is not None:
                    tensors[kind][id(t)] = t.numel() * t.element_size()
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(tensors["local"].values()), sum(tensors["global"].values()), sum(storages.values())


def expected_slots(c: LMModelConfig, max_cycles: int) -> tuple[int, int]:
    """(local-layer slots, global-layer slots): one per (layer, cycle step) the layer runs."""
    local = c.num_groups * c.local_per_global * max_cycles * c.l_cycles + c.num_tail_layers
    return local, c.num_groups * max_cycles


def expected_bytes(
    c: LMModelConfig, max_cycles: int, positions: int, batch: int, itemsize: int
) -> tuple[int, int]:
    """(local, global) bytes of keys and values after `positions` positions; local layers keep window - 1."""
    per_position = 2 * batch * c.num_kv_heads * c.head_dim * itemsize
    local_slots, global_slots = expected_slots(c, max_cycles)
    local = local_slots * min(positions, c.sliding_window - 1) * per_position
    return local, global_slots * positions * per_position


def fill_cache(
    model: HRMGemma, prompt: torch.Tensor, decode_steps: int, max_cycles: int
) -> tuple[KVCache, float]:
    """Prefill `prompt`, then `decode_steps` greedy tokens, one forward each. Returns the cache and, just
    after the prefill, held bytes / nbytes() - 1 (> 0 when slots keep views of larger buffers alive)."""
    cache = KVCache()
    with torch.no_grad():
        logits, _ = model.infer(prompt, cache=cache, max_cycles=max_cycles)
        prefill_excess = storage_bytes(cache)[2] / cache.nbytes() - 1
        for _ in range(decode_steps):
            logits, _ = model.infer(logits[:, -1:].argmax(dim=-1), cache=cache, max_cycles=max_cycles)
    return cache, prefill_excess


def kv_section(args: argparse.Namespace, config: Config, dtype: torch.dtype) -> bool:
    """Prints the table and the checks; returns whether every measurement matched the expectation."""
    c = config.model
    model = build_model(config, dtype).eval()
    itemsize = dtype.itemsize
    d, w = args.kv_decode, c.sliding_window
    print(f"\nkv cache: batch 1, prefill S-{d} tokens + {d} greedy decode steps = S positions, no early "
          f"halting; window {w} (local layers keep {w - 1})")  # fmt: skip
    print(f"expected = 2 x kv_heads {c.num_kv_heads} x head_dim {c.head_dim} x {itemsize} B x [local slots x "
          f"min(S, {c.sliding_window - 1}) + global slots x S]; local slots = {c.num_groups} groups x "
          f"{c.local_per_global} x max_cycles x T={c.l_cycles} + {c.num_tail_layers} tail, global slots = "
          f"{c.num_groups} x max_cycles")  # fmt: skip
    print(f"{'max_cycles':>10} {'S':>5} {'slots L/G':>9} {'local B':>10} {'global B':>10} {'nbytes()':>10} "
          f"{'expected':>10} {'held':>10}  check")  # fmt: skip
    ok = True
    measured: dict[tuple[int, int], tuple[int, int]] = {}  # (max_cycles, S) -> (local, total)
    prefill_excess: list[float] = []  # held / nbytes - 1 just after the prefill, per case
    g = torch.Generator().manual_seed(1)
    for cycles in args.cycles:
        for length in args.kv_lengths:
            prompt = torch.randint(1, c.vocab_size, (1, length - args.kv_decode), generator=g)
            cache, excess = fill_cache(model, prompt, args.kv_decode, cycles)
            local, global_, held = storage_bytes(cache)
            total = cache.nbytes()
            exp_local, exp_global = expected_bytes(c, cycles, length, 1, itemsize)
            slots = (sum(len(s) for n, s in cache.slots.items() if ".H." not in n),
                     sum(len(s) for n, s in cache.slots.items() if ".H." in n))  # fmt: skip
            problems = []
            if cache.length != length:
                problems.append(f"cache holds {cache.length} positions")
            if slots != expected_slots(c, cycles):
                problems.append(f"slots {slots} != expected {expected_slots(c, cycles)}")
            if (local, global_) != (exp_local, exp_global) or total != exp_local + exp_global:
                problems.append(f"bytes local/global {local}/{global_} != expected {exp_local}/{exp_global}")
            if held != total:
                problems.append("held != nbytes()")
            ok = ok and not problems
            measured[cycles, length] = (local, total)
            prefill_excess.append(excess)
            print(f"{cycles:>10} {length:>5} {f'{slots[0]}/{slots[1]}':>9} {local:>10,} {global_:>10,} "
                  f"{total:>10,} {exp_local + exp_global:>10,} {held:>10,}  "
                  f"{'ok' if not problems else 'MISMATCH: ' + '; '.join(problems)}", flush=True)  # fmt: skip
    return report_kv_checks(args, c, measured, prefill_excess) and ok


def report_kv_checks(
    args: argparse.Namespace,
    c: LMModelConfig,
    measured: dict[tuple[int, int], tuple[int, int]],
    prefill_excess: list[float],
) -> bool:
    """The two properties the table should show, stated and checked."""
    ok = True
    cycles = sorted(set(args.cycles))
    for length in args.kv_lengths:
        totals = [measured[n, length][1] for n in cycles]
        grows = all(a < b for a, b in zip(totals, totals[1:]))
        ok = ok and grows
        ratios = ", ".join(f"x{t / totals[0]:.2f}" for t in totals)
        print(f"{'PASS' if grows else 'FAIL'} S={length}: nbytes() grows with max_cycles "
              f"{', '.join(map(str, cycles))}: {ratios} of max_cycles={cycles[0]}")  # fmt: skip
    capped = [s for s in args.kv_lengths if s >= c.sliding_window - 1]
    if len(capped) >= 2:
        flat = all(len({measured[n, s][0] for s in capped}) == 1 for n in cycles)
        ok = ok and flat
        lengths = ", ".join(map(str, capped))
        print(f"{'PASS' if flat else 'FAIL'} local-layer bytes are the same at S={lengths} "
              f"for every max_cycles (bounded by the window)")  # fmt: skip
    worst = max(prefill_excess)
    if worst > 0:
        print(f"note: right after a prefill (before any decode step) the slots keep up to {worst:.0%} "
              f"more bytes alive than nbytes() counts: some cached tensors are views of larger "
              f"buffers")  # fmt: skip
    else:
        print("note: held bytes equal nbytes() just after every prefill too")
    return ok


# --- main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=str(ROOT / "configs/lm/hrmgemma_tiny.yaml"), help="an hrm_gemma recipe"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    p.add_argument(
        "--cycles", type=int_list, default=[1, 2, 4], help="H cycles (train) / max_cycles (decode)"
    )
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: train, decode, kv")
    p.add_argument("--batch", type=int, default=8, help="train rows")
    p.add_argument("--seq-len", type=int, default=128, help="train sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per cycle count")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps per cycle count")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-batches", type=int_list, default=[1, 4])
    p.add_argument("--uncached-tokens", type=int, default=16, help="new tokens of the use_cache=False run")
    p.add_argument("--kv-lengths", type=int_list, default=[64, 256, 1024], help="cached positions S")
    p.add_argument("--kv-decode", type=int, default=8, help="decode steps D after the prefill of S-D tokens")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring the matmul peak")
    p.add_argument("--quick", action="store_true", help="a ~20 s smoke run (smaller settings)")
    args = p.parse_args()
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args()
    sections = args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    for name in ("threads", "batch", "seq_len", "steps", "prompt_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("new_tokens", "uncached_tokens"):
        if getattr(args, name) < 2:
            p.error(
                f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 2 (prefill + a decode step)"
            )
    if args.warmup < 0 or args.kv_decode < 0:
        p.error("--warmup and --kv-decode must be >= 0")
    if min(args.kv_lengths) <= args.kv_decode:
        p.error(f"--kv-lengths must all exceed --kv-decode={args.kv_decode} (the prefill needs a token)")
    try:
        args.config_obj = load_config(args.config, args.set)
    except (OSError, ValueError) as e:
        p.error(f"{args.config}: {e}")
    if args.config_obj.model.family != "hrm_gemma":
        p.error(
            f"{args.config}: model.family={args.config_obj.model.family!r}; this benchmark needs hrm_gemma"
        )
    return args


def main() -> None:
    args = parse_args()
    config: Config = args.config_obj
    c = config.model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.precision]
    with torch.device("meta"):
        params = sum(p.numel() for p in HRMGemma(c).parameters())
    overrides = "".join(f" {item}" for item in args.set)
    print(f"HRMGemma {Path(args.config).name}{overrides}: hidden {c.hidden_size}, "
          f"{c.num_layers} layers = {c.num_groups} CycleBlocks of {c.local_per_global} local + 1 global "
          f"+ {c.num_tail_layers} tail, heads {c.num_heads} ({c.num_kv_heads} kv) x {c.head_dim}, window "
          f"{c.sliding_window}, vocab {c.vocab_size}, T={c.l_cycles}, {params:,} params, "
          f"random init")  # fmt: skip
    peak = 0.0
    if "train" in args.sections:
        peak = matmul_peak(dtype, seconds=args.peak_seconds)
    print(f"{args.precision}, {args.threads} threads, torch {torch.__version__}, CPU"
          + (f"; matmul peak {peak / 1e9:.1f} GFLOP/s" if peak else ""))  # fmt: skip
    ok = True
    if "train" in args.sections:
        train_section(args, config, dtype, peak)
    if "decode" in args.sections:
        decode_section(args, config, dtype)
    if "kv" in args.sections:
        ok = kv_section(args, config, dtype)
    if not ok:
        print("KV-cache bytes differ from the expectation (see MISMATCH/FAIL above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
