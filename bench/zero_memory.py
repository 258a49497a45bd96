"""ZeRO memory per rank: bytes of parameters, gradients and optimizer state held by the real DeepSpeed
engine at ZeRO stages 0-3, at DP=2 against DP=1, on CPU (DS_ACCELERATOR=cpu, gloo).

The model is a RecursiveReasoner of a few million parameters (hidden 384, 2+2 layers), built, wrapped
and stepped with the repo's own pieces: `build_model`, the trainer's optimizer (`Trainer.build_optimizer`),
`engine.deepspeed_config`, `engine.initialize`, and an ACT segment (`act.step_segment`) as the loss.
Each DP size runs in its own `torchrun --nproc-per-node DP` of this file, which builds an engine at
every stage in turn. Each engine takes one full optimizer step, then runs the second step's forward
and backward and is measured there: the optimizer state exists and this step's gradients are held,
the model-state peak of every step.

What is counted: every tensor the engine holds, found by walking the engine, its ZeRO optimizer and the
client optimizer, counted once per storage (views of flat buffers count their buffer once), and sorted:
  params     the module's parameter storage (ZeRO-3: this rank's ds_tensor partitions, plus any
             parameter still whole)
  grads      .grad of parameters and master partitions, and the ZeRO gradient buffers/partitions
  optimizer  the client optimizer's state (exp_avg, exp_avg_sq) and the fp32 master partitions
  other      anything else the engine holds (reported so that nothing is hidden)
The `unbooked` column (not in the total) is what else came alive in the process since the engine was
built: the batch, the ACT carry, RoPE tables, and anything the census missed; it bounds what was missed.

The trainer's DeepSpeed config scales ZeRO's buckets to the model (engine.zero_buckets: the "auto"
values of the Hugging Face DeepSpeed integration, reduce and all-gather buckets hidden^2 elements, ZeRO-3
prefetch 0.9 hidden^2, persistence threshold 10 hidden). `--default-buckets` measures DeepSpeed's
defaults instead (reduce_bucket_size 5e8 elements: a 2 GB fp32 ZeRO-3 reduce buffer per rank, whatever
the model size).

    python bench/zero_memory.py [--precisions fp32,bf16] [--hidden 384] [--default-buckets]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("params", "grads", "optimizer", "other")
RATIO_LIMIT = 0.55  # the issue's bar: ZeRO-3 at DP=2 holds at most this fraction of DP=1's total


# --- worker: one engine, one rank --------------------------------------------------------------------


def bench_config(stage: int, precision: str, hidden: int):
    from hrm_mega.config import load_config

    overrides = [
        f"model.hidden_size={hidden}", "model.num_heads=6", "model.h_layers=2", "model.l_layers=2",
        f"model.puzzle_emb_ndim={hidden}", "model.halt_max_steps=4",
        f"parallel.zero_stage={stage}", f"train.precision={precision}", "train.global_batch=4",
        "log.wandb=disabled", "log.progress_bar=false",
    ]  # fmt: skip
    return load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", overrides)


def category_of(path: str) -> str:
    """The category of a tensor found inside DeepSpeed's objects, from the attribute names leading to it."""
    path = path.lower()
    if any(word in path for word in ("grad", "ipg", "bucket")):
        return "grads"  # gradient partitions, accumulation and reduction buffers
    if "fp32" in path or "master" in path:
        return "optimizer"  # fp32 master partitions (ZeRO-3 keeps them outside the client's param_groups)
    return "other"


class StorageCensus:
    """Walks objects to the tensors they hold and books each storage once, under the first category
    that claims it (claims come in priority order: params, optimizer, grads, other)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.booked: dict[int, str] = {}
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.largest_other: list[tuple[int, str]] = []

    def book(self, t: Any, category: str, path: str = "") -> None:
        if t is None or t.device.type == "meta" or t.numel() == 0:
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.booked or storage.nbytes() == 0:
            return
        self.booked[key] = category
        self.bytes[category] += storage.nbytes()
        if category == "other":
            self.largest_other.append((storage.nbytes(), path))

    def walk(self, obj: Any, path: str, depth: int = 0, seen: set[int] | None = None) -> None:
        """Books every tensor reachable from `obj` through containers and plain attributes (category_of
        names the category of those that no earlier claim took)."""
        torch = self.torch
        seen = set() if seen is None else seen
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.book(obj, category_of(path), path)
            for attr in ("grad", "ds_tensor"):
                if getattr(obj, attr, None) is not None:
                    self.walk(getattr(obj, attr), f"{path}.{attr}", depth + 1, seen)
            return
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple, set)):
            items = enumerate(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            if not type(obj).__module__.startswith(("deepspeed", "hrm_mega", "torch.optim")):
                return  # process groups, loggers, configs: no model state behind them
            items = vars(obj).items()
        else:
            return
        for key, value in items:
            self.walk(value, f"{path}.{key}" if isinstance(key, str) else f"{path}[]", depth + 1, seen)


def live_storages() -> dict[int, int]:
    """{storage address: bytes} of every tensor (and its .grad) that Python's gc can see in this process."""
    import gc

    import torch

    live = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            for t in (obj, obj.grad):
                if t is not None and t.numel():
                    live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return live


def measure(engine: Any, model: Any, before: dict[int, int]) -> dict[str, Any]:
    """Bytes this rank holds, by category (see the module docstring). `unbooked`: tensors created since
    `before` (a live_storages() snapshot) that are still alive but that no category took: the batch,
    the carry, RoPE tables and other buffers, and anything the census missed."""
    census = StorageCensus()
    for p in model.parameters():
        census.book(getattr(p, "ds_tensor", None), "params")  # ZeRO-3: this rank's partition
        census.book(p.data, "params")
    zero_optimizer = engine.optimizer
    client = getattr(zero_optimizer, "optimizer", zero_optimizer)  # the AdamATan2 inside a ZeRO wrapper
    for state in client.state.values():
        for t in state.values():
            if hasattr(t, "untyped_storage"):
                census.book(t, "optimizer")
    for group in client.param_groups:  # under ZeRO these are the fp32 master partitions
        for p in group["params"]:
            census.book(p, "optimizer")
    for p in model.parameters():
        census.book(p.grad, "grads")
    for group in client.param_groups:
        for p in group["params"]:
            census.book(p.grad, "grads")
    census.walk(zero_optimizer, "optimizer")
    census.walk({k: v for k, v in vars(engine).items() if k not in ("_modules", "optimizer")}, "engine")
    census.largest_other.sort(reverse=True)
    unbooked = sum(n for ptr, n in live_storages().items() if ptr not in before and ptr not in census.booked)
    return {**census.bytes, "unbooked": unbooked, "other_largest": census.largest_other[:3]}


def one_stage(stage: int, args: argparse.Namespace) -> dict[str, Any]:
    """Builds the engine at `stage`, takes a step and a half, and returns this rank's bytes."""
    import torch

    from hrm_mega.models import build_model
    from hrm_mega.models.act import initial_state, step_segment
    from hrm_mega.training import engine as ds
    from hrm_mega.training.trainer import Trainer

    before = live_storages()  # what earlier stages left behind in this process
    config = bench_config(stage, args.precision, args.hidden)
    world = ds.setup_distributed(config)  # a no-op for the process group after the first stage
    model = build_model(config.model).init_weights(config.train.seed).to(world.device)
    # The trainer's own optimizer factory (AdamATan2 over the trainable parameters for this recipe).
    optimizer = Trainer.build_optimizer(SimpleNamespace(config=config, model=model))
    local_batch = config.train.global_batch // world.dp_size
    ds_config = ds.deepspeed_config(config, world, local_batch)  # buckets scaled to the model
    if args.default_buckets:
        for key in ds.zero_buckets(args.hidden):
            del ds_config["zero_optimization"][key]
    engine = ds.initialize(model, optimizer, ds_config, world)

    g = torch.Generator().manual_seed(world.rank)
    batch = {
        "inputs": torch.randint(1, 11, (local_batch, 81), generator=g),
        "labels": torch.randint(2, 11, (local_batch, 81), generator=g),
        "puzzle_identifiers": torch.zeros(local_batch, dtype=torch.long),
    }
    state = initial_state(model, batch)
    for step in range(2):
        loss, _, state, _ = step_segment(engine, config.model, state, training=True)
        engine.backward(loss)
        if step == 1:  # optimizer state from step 0 exists, this step's gradients are held
            held = measure(engine, model, before)
        engine.step()
    held["n_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held


def worker(args: argparse.Namespace) -> None:
    """Every stage in turn (ZeRO-3 last: it leaves hooks behind), in this torchrun's world; rank 0
    writes {stage: [per-rank bytes]} to args.out."""
    import gc

    import torch

    torch.set_num_threads(1)
    results = {}
    for stage in range(4):
        held = one_stage(stage, args)
        every_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every_rank, held)
        results[stage] = every_rank
        gc.collect()
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))


# --- driver: launch the workers, print the table ------------------------------------------------------


def run_world(dp: int, precision: str, args: argparse.Namespace, tmp: Path) -> dict[int, list[dict]]:
    """{stage: [bytes of every rank]} from one `torchrun --nproc-per-node dp` of this file."""
    out = tmp / f"dp{dp}_{precision}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp}",
        __file__, "--worker", f"--precision={precision}", f"--hidden={args.hidden}", f"--out={out}",
        *(["--default-buckets"] if args.default_buckets else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        sys.exit(f"zero_memory: DP={dp} {precision} failed (exit {proc.returncode}):\n{tail}")
    return {int(stage): ranks for stage, ranks in json.loads(out.read_text()).items()}


def mib(n: float) -> str:
    return f"{n / 2**20:10.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--hidden", type=int, default=384, help="model width (6 heads)")
    p.add_argument("--default-buckets", action="store_true", help="keep DeepSpeed's bucket-size defaults")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from importlib.metadata import version

    from hrm_mega.training.engine import zero_buckets

    start = time.perf_counter()
    buckets = (
        "DeepSpeed defaults" if args.default_buckets else f"scaled to the model {zero_buckets(args.hidden)}"
    )
    print(
        f"RecursiveReasoner hidden {args.hidden}, 6 heads, H/L layers 2+2; DeepSpeed {version('deepspeed')}, "
        f"torch {version('torch')}, CPU/gloo; client optimizer AdamATan2\n"
        f"bytes held per rank after step 1's optimizer step and step 2's backward (max over ranks); "
        f"buckets: {buckets}"
    )
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            rows = {}
            for dp in (1, 2):
                for stage, ranks in run_world(dp, precision, args, Path(tmp)).items():
                    rows[stage, dp] = {
                        k: max(r[k] for r in ranks) for k in (*CATEGORIES, "unbooked", "n_params")
                    }
                    rows[stage, dp]["other_largest"] = ranks[0]["other_largest"]
            n = rows[0, 1]["n_params"]
            print(f"\n{precision}: {n:,} parameters ({n * (4 if precision == 'fp32' else 2) / 2**20:.2f} MiB "
                  f"of {precision} weights); MiB per rank")  # fmt: skip
            print(f"{'stage':>5} {'DP':>3} {'params':>10} {'grads':>10} {'optimizer':>10} {'other':>10} "
                  f"{'total':>10} {'vs DP=1':>8} {'unbooked':>9}")  # fmt: skip
            for stage in range(4):
                base = sum(rows[stage, 1][k] for k in CATEGORIES)
                for dp in (1, 2):
                    r = rows[stage, dp]
                    total = sum(r[k] for k in CATEGORIES)
                    print(f"{stage:>5} {dp:>3} {mib(r['params'])} {mib(r['grads'])} {mib(r['optimizer'])} "
                          f"{mib(r['other'])} {mib(total)} {total / base:7.3f}x "
                          f"{mib(r['unbooked'])[1:]}")  # fmt: skip
            for (stage, dp), r in rows.items():
                if r["other"] > 0.01 * sum(r[k] for k in CATEGORIES):
                    print(f"  note: ZeRO-{stage} DP={dp} 'other' holds {r['other_largest']}")
            ratio = sum(rows[3, 2][k] for k in CATEGORIES) / sum(rows[3, 1][k] for k in CATEGORIES)
            verdict = "PASS" if ratio <= RATIO_LIMIT else "FAIL"
            print(f"{verdict} {precision}: ZeRO-3 total per rank at DP=2 / DP=1 = {ratio:.3f} "
                  f"(must be <= {RATIO_LIMIT})")  # fmt: skip
            if verdict == "FAIL":
                failures.append(precision)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
