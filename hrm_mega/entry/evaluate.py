"""Evaluation entry point: `hrm-mega eval CKPT --data DIR [--mode fixed|adaptive|table]`.

Puzzle models: one JSON line with exact_accuracy, token_accuracy, q_halt_accuracy and mean_segments.
`--halt-threshold T` sets the adaptive halting rule (model.halt_threshold: halt once sigmoid(q_halt) > T).
`--mode table` prints one line per fixed depth (1..halt_max_steps) and per adaptive threshold
(`--thresholds`), all read from one pass of every row through every segment.
Language models (HRMGemma): one JSON line with loss, ppl and mean_cycles on the eval split, at the
trained H cycles or at `--cycles N`. CKPT is a training checkpoint (runs/.../checkpoints/step-*), a
consolidated .safetensors file or a model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from hrm_mega.entry.common import add_device_arg, resolve_device, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm-mega eval", description="evaluate a puzzle model or an HRMGemma")
    p.add_argument("checkpoint", help="training checkpoint dir, consolidated .safetensors, or model dir")
    p.add_argument("--data", help="dataset directory (default: the data.path the model was trained on)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    p.add_argument("--mode", choices=["fixed", "adaptive", "table"], default="fixed")
    p.add_argument("--halt-threshold", type=float, help="puzzles: model.halt_threshold for adaptive halting")
    p.add_argument(
        "--thresholds",
        default="0,0.5,0.8,0.9,0.95,0.99",
        help="--mode table: adaptive thresholds (0: the rule)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="rows per forward (default: train.global_batch)")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0 = all)")
    p.add_argument("--predictions", help="write one JSON line per sample (id, prediction, segments) here")
    p.add_argument("--cycles", type=int, default=0, help="HRMGemma: H cycles per block (default: as trained)")
    add_device_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.data.reader import iterate_split
    from hrm_mega.data.shards import read_manifest
    from hrm_mega.inference.puzzle import (
        metric_sums,
        metrics_from_sums,
        run_adaptive,
        run_fixed,
        run_trajectories,
    )

    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint)
    model.to(device)
    data = replace(
        config.data, path=args.data or config.data.path, eval_split=args.split or config.data.eval_split
    )
    if config.task == "lm":
        return evaluate_lm_checkpoint(model, replace(config, data=data), args, device)
    if args.cycles:
        raise ValueError("--cycles applies to HRMGemma checkpoints; puzzle models run model.h_cycles")
    if args.halt_threshold is not None:
        config = replace(config, model=replace(config.model, halt_threshold=args.halt_threshold))
        config.model.validate()
    manifest = read_manifest(data.path)
    for field in ("vocab_size", "seq_len"):
        if manifest[field] != getattr(config.model, field):
            raise ValueError(
                f"{data.path}: {field}={manifest[field]} but the model has {field}={getattr(config.model, field)}"
            )
    batch_size = args.batch_size or config.train.global_batch
    model.eval()
    batches = iterate_split(
        data.path, data.eval_split, batch_size=batch_size, corrupt_policy=data.corrupt_policy,
        shard_url=data.shard_url, read_retries=data.read_retries,
    )  # fmt: skip
    if args.max_samples:
        batches = _first(batches, args.max_samples)
    batches = ({k: v.to(device) for k, v in b.items()} for b in batches)
    if args.mode == "table":
        thresholds = [float(t) for t in args.thresholds.split(",")]
        traj = run_trajectories(model, config.model, batches)
        rows = [{"mode": "fixed", "threshold": None, **metrics_from_sums(traj.fixed(k))}
                for k in range(1, config.model.halt_max_steps + 1)]  # fmt: skip
        rows += [
            {"mode": "adaptive", "threshold": t, **metrics_from_sums(traj.adaptive(t))} for t in thresholds
        ]
        for row in rows:
            print(json.dumps({**row, "split": data.eval_split}), flush=True)
        return 0
    with torch.no_grad():
        if args.mode == "fixed":
            records = list(run_fixed(model, config.model, batches))
        else:
            records = list(run_adaptive(model, config.model, batches, batch_size))
    metrics = metrics_from_sums(metric_sums(records))
    if args.predictions:
        with open(args.predictions, "w") as f:
            for r in records:
                f.write(json.dumps({"sample_id": r.sample_id, "prediction": r.prediction.tolist(),
                                    "segments": r.segments, "q_halt": r.q_halt}) + "\n")  # fmt: skip
    print(json.dumps({"mode": args.mode, "split": data.eval_split, **metrics}), flush=True)
    return 0


def evaluate_lm_checkpoint(model, config, args: argparse.Namespace, device) -> int:

    from hrm_mega.training.engine import World
    from hrm_mega.training.tasks.lm import evaluate_lm

    if args.mode != "fixed" or args.predictions or args.halt_threshold is not None:
        raise ValueError(
            "--mode adaptive/table, --halt-threshold and --predictions apply to puzzle models, not HRMGemma"
        )
    if args.cycles < 0:
        raise ValueError(f"--cycles={args.cycles} must be >= 1")
    train = replace(config.train, global_batch=args.batch_size or config.train.global_batch,
                    eval_max_samples=args.max_samples)  # fmt: skip
    world = World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=device)
    cycles = args.cycles or config.model.h_cycles
    # A mixture's checkpoint without --data: every source's eval split, one line each, as in training.
    sources = [(s.name, s.path, s.shard_url) for s in config.data.sources] if not args.data else []
    for name, path, url in sources or [(None, config.data.path, config.data.shard_url)]:
        data = replace(config.data, path=path, shard_url=url, sources=[])
        metrics = evaluate_lm(model, replace(config, train=train, data=data), world, cycles=cycles)
        where = {"source": name} if name else {}
        print(json.dumps({**where, "split": data.eval_split, "cycles": cycles, **metrics}), flush=True)
    return 0


def _first(batches, n: int):
    seen = 0
    for b in batches:
        if seen >= n:
            return
        keep = min(n - seen, b["inputs"].shape[0])
        yield {k: v[:keep] for k, v in b.items()}
        seen += keep


def main(argv: list[str] | None = None) -> int:
    return run_main("eval", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
