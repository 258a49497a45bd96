"""Packed LM training at long sequences: attention per document against the dense document mask.

HRMGemma trains on packed rows (several documents a row, doc_ids). `model.packed_attention=mask` builds
a boolean [batch, 1, seq, seq] mask per layer kind and hands it to scaled_dot_product_attention, which
scores every pair of the row; `=documents` (the default) runs each document's attention on its own
(models/attention.py, DocumentRuns), so neither the mask nor the scores across documents exist.

The model is configs/lm/hrmgemma_tiny.yaml (max_position raised to the longest sequence) with random
weights in fp32 and H cycles fixed at the recipe's h_cycles. A training step is forward, lm_loss,
backward and an AdamW step on a batch of --batch rows of random tokens packed as `prep text` packs
documents (lengths drawn uniformly from 8 to seq/2 tokens, back to back; bench/lm_throughput.py's
packed_batch, same seed for both paths).

1. memory: each (path, seq) runs in a fresh process: the resident set once model, optimizer and batch
   are built, then the process's high-water mark (VmHWM) over the first training step. "step" =
   high-water mark - resident before: what the step itself needs (with AdamW's state, 12 MiB);
   "peak" = the whole process's high-water mark.
2. saved: where the step's memory goes. One forward per (path, seq) in this process, then a walk of
   the autograd graph summing the bytes each kind of backward node keeps (each storage counted once,
   at the first node that holds it; parameters left out), in MiB and KB per token.
3. speed: at each sequence length, one process alternates the two paths for --rounds rounds of
   --steps timed steps (after one untimed step each); tokens/s per path are means over rounds, and the
   ratio is documents / mask.

    python bench/packed_attention.py [--seq-lens 2048,4096] [--batch 2] [--rounds 4] [--steps 1]
        [--sections memory,saved,speed] [--threads 2] [--activation-checkpointing]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from lm_throughput import int_list, packed_batch  # bench/ is on sys.path when this file runs as a script

from hrm_mega.config import load_config
from hrm_mega.models.lm import HRMGemma, lm_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/lm/hrmgemma_tiny.yaml"
PATHS = ("documents", "mask")


def training_step(
    packed_attention: str, seq_len: int, batch: int, checkpointing: bool = False
):  # -> Callable[[], None]
    """A closure running one training step of the recipe's model with the given attention path;
    checkpointing: train.activation_checkpointing (each CycleBlock recomputed in backward)."""
    c = load_config(RECIPE).model
    c = dataclasses.replace(c, packed_attention=packed_attention, max_position=max(c.max_position, seq_len))
    model = HRMGemma(c).init_weights(0)
    for block in model.blocks.values():
        block.recompute = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = packed_batch(batch, seq_len, c.vocab_size, torch.Generator().manual_seed(seq_len))

    def step() -> None:
        logits, aux = model(b["input_ids"], doc_ids=b["doc_ids"])
        lm_loss(logits, b["labels"], aux, c)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def status_kib(field: str) -> int:
    """A VmRSS/VmHWM-style field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(packed_attention: str, seq_len: int, batch: int, checkpointing: bool) -> dict[str, float]:
    """In this (fresh) process: MiB resident before a step, and the high-water mark over it."""
    step = training_step(packed_attention, seq_len, batch, checkpointing)
    # The first step: memory a step frees stays in this process's heap, so a second step's high-water
    # mark would hide below the first one's. (AdamW's state, created here, is 2 x 1.5M floats.)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = status_kib("VmRSS")
    step()
    peak = status_kib("VmHWM")
    return {"before_mib": before / 1024, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def memory_section(args: argparse.Namespace) -> None:
    ckpt = ", activation checkpointing" if args.activation_checkpointing else ""
    print(f"memory: one training step, batch {args.batch}{ckpt}, fresh process per row (MiB)")
    print(f"{'seq':>6} {'path':<10} {'step':>8} {'peak':>8}")
    for seq_len in args.seq_lens:
        steps = {}
        for path in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, "--child-memory", path, "--seq-lens", str(seq_len),
                 "--batch", str(args.batch), "--threads", str(args.threads)]
                + (["--activation-checkpointing"] if args.activation_checkpointing else []),
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            m = json.loads(out.stdout.strip().splitlines()[-1])
            steps[path] = m
            print(f"{seq_len:>6} {path:<10} {m['step_mib']:>8.0f} {m['peak_mib']:>8.0f}", flush=True)
        d, k = steps["documents"], steps["mask"]
        print(
            f"{seq_len:>6} documents/mask: step {d['step_mib'] / k['step_mib']:.2f}x, "
            f"peak {d['peak_mib'] / k['peak_mib']:.2f}x",
            flush=True,
        )


def saved_bytes(loss: torch.Tensor, skip: set[int]) -> Counter[str]:
    """Bytes kept for backward under loss's graph, by node kind; storages in `skip` (parameters) and
    storages already counted at another node are left out."""
    seen, by_kind = set(skip), Counter()
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr, None)
                tensors += [value] if isinstance(value, torch.Tensor) else []
                tensors += (
                    [t for t in value if isinstance(t, torch.Tensor)] if isinstance(value, tuple) else []
                )
        if hasattr(node, "saved_tensors"):  # custom autograd Functions (RMSNorm, the gated activation)
            tensors += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                by_kind[type(node).__name__] += storage.nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return by_kind


def saved_section(args: argparse.Namespace) -> None:
    print(f"saved for backward: one forward, batch {args.batch} (MiB; KB per token)")
    for seq_len in args.seq_lens:
        for path in PATHS:
            c = load_config(RECIPE).model
            c = dataclasses.replace(c, packed_attention=path, max_position=max(c.max_position, seq_len))
            model = HRMGemma(c).init_weights(0)
            b = packed_batch(args.batch, seq_len, c.vocab_size, torch.Generator().manual_seed(seq_len))
            logits, aux = model(b["input_ids"], doc_ids=b["doc_ids"])
            loss = lm_loss(logits, b["labels"], aux, c)["loss"]
            kinds = saved_bytes(loss, {p.untyped_storage().data_ptr() for p in model.parameters()})
            tokens, total = args.batch * seq_len, sum(kinds.values())
            print(f"{seq_len:>6} {path:<10} {total / 2**20:8.0f} MiB  {total / tokens / 1024:6.1f} KB/token")
            for kind, n in kinds.most_common(6):
                print(f"         {kind:<46} {n / 2**20:8.0f} MiB  {n / tokens / 1024:6.1f} KB/token")
            del logits, aux, loss


def speed_section(args: argparse.Namespace) -> None:
    print(
        f"speed: training tokens/s, batch {args.batch}, {args.rounds} alternating rounds of {args.steps} steps"
    )
    for seq_len in args.seq_lens:
        steps = {
            path: training_step(path, seq_len, args.batch, args.activation_checkpointing) for path in PATHS
        }
        for step in steps.values():
            step()  # warm-up
        rates: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(args.rounds):
            for path, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                rates[path].append(args.steps * args.batch * seq_len / (time.perf_counter() - start))
        means = {path: sum(r) / len(r) for path, r in rates.items()}
        for path in PATHS:
            rounds = " ".join(f"{r:.0f}" for r in rates[path])
            print(f"{seq_len:>6} {path:<10} {means[path]:>8.0f} tokens/s  (rounds: {rounds})")
        print(f"{seq_len:>6} documents/mask: {means['documents'] / means['mask']:.2f}x", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int_list, default=[2048, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="timed steps per path and round")
    p.add_argument("--sections", default="memory,speed", help="comma-separated: memory, saved, speed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each CycleBlock in backward"
    )
    p.add_argument("--child-memory", choices=PATHS, help=argparse.SUPPRESS)  # one memory row, as JSON
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child_memory:
        memory = measure_memory(
            args.child_memory, args.seq_lens[0], args.batch, args.activation_checkpointing
        )
        print(json.dumps(memory))
        return
    sections = args.sections.split(",")
    if "memory" in sections:
        memory_section(args)
    if "saved" in sections:
        saved_section(args)
    if "speed" in sections:
        speed_section(args)


if __name__ == "__main__":
    main()
