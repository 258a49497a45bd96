"""Training memory of one ACT segment against the number of recurrent updates N*T, per grad mode.

For each (h_cycles N, l_cycles T) and grad mode, a fresh subprocess builds a RecursiveReasoner, runs
one segment forward and backward on the CPU, and reports two figures:

- saved activations (primary): bytes of the tensors autograd keeps for backward, recorded with
  torch.autograd.graph.saved_tensors_hooks and counted once per storage, parameters excluded. It is
  exact and deterministic: it is the memory that the grad mode decides.
- peak RSS delta (secondary): the process's peak resident set during forward+backward minus its RSS
  just before (the kernel's high-water mark is reset via /proc/self/clear_refs). It adds the
  transient buffers of the no_grad updates, gradients and allocator effects, so it is noisier.

HRM's one-step gradient must keep memory flat in N*T; `full` backprop must grow with it.

    python bench/memory_vs_cycles.py [--hidden 256] [--layers 2] [--batch 16] [--seq-len 81] [--jobs 2]

Cases run --jobs at a time with one compute thread each; the memory figures are per process, so
running them side by side does not change them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

CYCLES = [(1, 2), (2, 2), (2, 4), (4, 4), (4, 8)]  # (N, T): N*T = 2, 4, 8, 16, 32
MODES = ("one_step", "last_cycle", "full")
TOLERANCE = 0.10  # one_step at N*T=32 must be within 10% of N*T=2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (Linux >= 4.0); False if this system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(args: argparse.Namespace, n: int, t: int, mode: str) -> dict[str, float]:
    """One case, in this process: build, one segment forward + backward, memory figures."""
    from hrm_mega.config import PuzzleModelConfig
    from hrm_mega.models.puzzle import RecursiveReasoner

    config = PuzzleModelConfig(
        vocab_size=11, seq_len=args.seq_len, num_puzzle_identifiers=1, hidden_size=args.hidden,
        num_heads=args.heads, h_layers=args.layers, l_layers=args.layers, h_cycles=n, l_cycles=t,
        grad_mode=mode, puzzle_emb_ndim=args.hidden,
    )  # fmt: skip
    model = RecursiveReasoner(config).init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, 11, (args.batch, args.seq_len), generator=g),
        "puzzle_identifiers": torch.zeros(args.batch, dtype=torch.long),
    }
    labels = torch.randint(0, 11, (args.batch, args.seq_len), generator=g)
    carry = model.initial_carry(args.batch)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    saved: dict[int, int] = {}  # storage address -> bytes; a saved tensor keeps its storage alive

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    gc.collect()
    exact_peak = _reset_peak_rss()
    rss_before = _status_kb("VmRSS") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(carry, batch)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten()) + out.q_halt.mean()
    saved_bytes = sum(saved.values())
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "saved_mib": saved_bytes / 2**20,
        "rss_mib": max(0, peak - rss_before) / 1024,
        "seconds": seconds,
        "exact_peak": exact_peak,
    }


def run_case(args: argparse.Namespace, n: int, t: int, mode: str) -> dict[str, float]:
    """Runs one case in a fresh interpreter, so no case inherits another's allocator state or peak."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        # a fixed mmap threshold returns freed activation buffers to the OS, so RSS follows live memory
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs)),
    }
    sizes = ["--hidden", args.hidden, "--heads", args.heads, "--layers", args.layers, "--batch", args.batch]
    cmd = [
        sys.executable,
        __file__,
        "--case",
        f"{n},{t},{mode}",
        *map(str, sizes),
        "--seq-len",
        str(args.seq_len),
    ]
    cmd += ["--jobs", str(args.jobs)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"case N={n} T={t} {mode} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="layers in each of H and L")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=81, help="puzzle tokens; one prefix position is added")
    parser.add_argument("--jobs", type=int, default=2, help="cases measured side by side")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: N,T,MODE measured in this process
    args = parser.parse_args()
    if args.case:
        n, t, mode = args.case.split(",")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        print(json.dumps(measure(args, int(n), int(t), mode)))
        return

    print(
        f"RecursiveReasoner hidden={args.hidden} heads={args.heads} H/L layers={args.layers}+{args.layers} "
        f"batch={args.batch} seq={args.seq_len}+1, fp32, CPU, torch {torch.__version__}; one segment fwd+bwd"
    )
    print("saved = activations kept for backward (primary); rss = peak RSS delta over the pre-step RSS\n")
    header = f"{'N':>2} {'T':>2} {'N*T':>4}" + "".join(f" | {m + ' saved/rss MiB':>26}" for m in MODES)
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    cases = [(n, t, mode) for n, t in CYCLES for mode in MODES]
    cost = {"one_step": 1, "last_cycle": 1, "full": 3}  # start the longest cases first
    order = sorted(cases, key=lambda c: -(c[0] * c[1] + c[0]) * cost[c[2]])
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(order, pool.map(lambda c: run_case(args, *c), order)))
    results = {(mode, n * t): done[n, t, mode] for n, t, mode in cases}
    for n, t in CYCLES:
        row = f"{n:>2} {t:>2} {n * t:>4}"
        for mode in MODES:
            r = results[mode, n * t]
            row += f" | {r['saved_mib']:>12.1f} / {r['rss_mib']:>9.1f}"
        print(row)
    if not all(r["exact_peak"] for r in results.values()):
        print("note: /proc/self/clear_refs not writable; rss is the ru_maxrss delta (may under-read)")
    print(f"\nwall time {time.perf_counter() - start:.0f} s\n")

    lo, hi = CYCLES[0][0] * CYCLES[0][1], CYCLES[-1][0] * CYCLES[-1][1]

    def ratio(mode: str, key: str) -> float:
        return results[mode, hi][key] / results[mode, lo][key]

    one = ratio("one_step", "saved_mib")
    ok_one = abs(one - 1) <= TOLERANCE
    print(
        f"{'PASS' if ok_one else 'FAIL'} one_step: saved activations at N*T={hi} / N*T={lo} = {one:.3f} "
        f"(must be within {TOLERANCE:.0%} of 1; peak RSS ratio {ratio('one_step', 'rss_mib'):.3f})"
    )
    full = [results["full", n * t]["saved_mib"] for n, t in CYCLES]
    ok_full = all(b > a for a, b in zip(full, full[1:])) and ratio("full", "saved_mib") > 1 + TOLERANCE
    print(
        f"{'PASS' if ok_full else 'FAIL'} full: saved activations grow with N*T, N*T={hi} / N*T={lo} = "
        f"{ratio('full', 'saved_mib'):.2f} (must rise at every step; peak RSS ratio {ratio('full', 'rss_mib'):.2f})"
    )
    sys.exit(0 if ok_one and ok_full else 1)


if __name__ == "__main__":
    main()
