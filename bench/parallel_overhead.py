"""Communication volume per training step, per parallel layout: measured bytes against the analytic volume.

Every collective and point-to-point call that torch.distributed makes during one steady-state optimizer
step (step 3: steps 1-2 are warm-up) is counted, on every rank, by wrapping the torch.distributed
functions themselves (all_reduce, all_gather, all_gather_into_tensor, reduce_scatter(_tensor), reduce,
broadcast, send/recv/isend/irecv, batch_isend_irecv, all_to_all, ...; barriers are ignored). megatron-core
and DeepSpeed (through deepspeed.comm's TorchBackend) both call these module attributes at call time, and
DeepSpeed binds its all-gather/reduce-scatter function when its backend starts, so the wrappers go in
before either is imported. A call made from inside another wrapped call (torch's own
all_gather_object -> all_gather) is counted once, at the outer call.

Payload is the size of the (full) tensor the operation works on, the convention of nccl-tests: the
tensor of an all-reduce, broadcast or reduce; the gathered output of an all-gather; the input of a
reduce-scatter; the tensor of a send or recv. Bytes on the wire per rank follow from it: a ring
all-reduce moves 2(n-1)/n x payload, an all-gather or reduce-scatter (n-1)/n x. A rank's
point-to-point payload is what it sends plus what it receives.

Each call is booked under the process group it ran on (by its ranks: TP, DP, PP (send/recv between
pipeline stages, and the tied-embedding group of the first and last stage), world, or a 1-rank group)
and under a traffic term named from its call site (the first frames outside torch.distributed and
deepspeed.comm, the innermost hrm_mega frame, and whether autograd's backward is running). Only
trainer.train_step() is measured: no logging, evaluation or checkpoint traffic.

The analytic volume per rank, from the config and the rank's share of the model (b = micro-batch rows,
s = sequence, h = hidden, fp32; E = layer evaluations on this rank per micro-batch, E_grad = those that
run with gradients: one_step differentiates one L and one H update of each CycleBlock, last_cycle the
last H cycle, full everything; trailing layers always):
  TP  layer outputs (fwd)          2 all-reduces of [b, s, h] per layer evaluation (o_proj, down_proj)
      activation grads (bwd)       2 per layer evaluation with gradients (q/k/v and gate/up inputs)
                                   + the tied LM head's input (HRMGemma) or lm_head's (puzzle)
      qk-norm weight grads (bwd)   2 x [head_dim] per layer evaluation with gradients (HRMGemma)
      embedding (fwd)              1 all-reduce of [b, s, h] per forward (VocabParallelEmbedding)
      vocab-parallel CE            softmax: 3 x [b, s-1] fp32 (max, target logit, sum of exp);
                                   stablemax: 2 x [b, s] fp64
      logit all-gather             puzzle accuracy metric: the full [b, s, V] fp32 logits
  DP  ZeRO-0: one all-reduce of the local gradients (P = local parameter bytes) at the step boundary;
      ZeRO-1/2: every gradient slice is reduced to the rank owning its partition (the trainer sets
      zero_optimization.use_multi_rank_bucket_allreduce false; DeepSpeed 0.19's default all-reduces
      whole buckets): every rank passes all P bytes to reduce calls and sends the (dp-1)/dp x P it does
      not own, the reduce-scatter volume; then the updated fp32 partitions are all-gathered (P, the
      flat buffer padded to 2 x dp elements). With a 1-rank
      data-parallel group (tp or pp layouts at dp 1) DeepSpeed still issues the P-byte all-reduce;
      it moves nothing over the wire
  PP  activations (fwd)            per micro-batch: hidden [b, s, h] fp32 + position_ids, doc_ids,
                                   token_mask [b, s] int64 + halting sums [3] fp32
      activation grads (bwd)       per micro-batch: [b, s, h] + [3] fp32
      shape metadata               DeepSpeed's dynamic_shape protocol: one int32[256] per micro-batch
      tied embedding grads         one all-reduce of the stage's embedding shard, first <-> last stage
Scalars (loss and metric sums, finite flags, gradient norms, DeepSpeed's loss broadcast) are counted and
listed, not modelled.

    python bench/parallel_overhead.py [--only NAME[,NAME...]]

Layouts, global batch 8 (one micro-batch per rank; pipeline layouts: micro-batches of 2 rows). HRMGemma:
configs/lm/hrmgemma_tiny.yaml (hidden 128, 4 heads, 2 CycleBlocks of 3 local + 1 global layer, 2 trailing
layers) at N = T = 2, one_step, vocab 320, seq 64. Puzzle: configs/puzzle/hrm_sudoku_tiny.yaml (hidden 128,
2+2 layers, N = T = 2, one_step, bootstrap Q target), vocab 12.
  dp2_zero0, dp2_zero1, dp2_zero2, tp2, tp2_puzzle, pp2, tp2_pp2, pp2_dp2_zero1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MEASURED_STEP = 3  # steps 1-2 warm up (first-step allocations, DeepSpeed's first-send metadata)
SCALAR_NUMEL = 16  # calls on tensors this small are control traffic (metrics, flags, norms, loss)
GRADIENT_TOLERANCE = 0.05  # ZeRO gradient bytes sent against the reduce-scatter theory
TOLERANCE = 0.01  # a modelled term must match within 1%

LM_RECIPE = "configs/lm/hrmgemma_tiny.yaml"
LM_SETS = [
    "model.vocab_size=320", "model.h_cycles=2", "model.l_cycles=2", "model.grad_mode=one_step",
    "train.cycles_range=[]", "train.global_batch=8", "data.partitions=2", "data.shuffle_buffer=8",
]  # fmt: skip
PUZZLE_RECIPE = "configs/puzzle/hrm_sudoku_tiny.yaml"
PUZZLE_SETS = ["model.vocab_size=12", "train.global_batch=8"]  # 12: divisible by tp
# Pipeline layouts run 2-row micro-batches (DeepSpeed's schedule needs several to pipeline); the others
# one micro-batch per rank: the LM and puzzle tasks call engine.step() once after all micro-batches, and
# DeepSpeed then treats only every k-th step as a gradient-accumulation boundary (docs/benchmarks.md).
PIPELINE_MICRO = "train.micro_batch=2"
COMMON_SETS = [
    "train.steps=100", "train.eval_interval=0", "train.checkpoint_interval=0", "log.wandb=disabled",
    "log.progress_bar=false", "log.log_interval=1000",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "lm" | "puzzle"
    sets: tuple[str, ...]


# (ranks, cases): the cases of an entry run one after another in one torchrun. The DP cases go first: they
# need no model-parallel groups, which the TP cases then create for the rest of the process
# (megatron-core's parallel_state is a process-wide singleton).
WORLDS: list[tuple[int, list[Case]]] = [
    (
        2,
        [
            *(Case(f"dp2_zero{z}", "lm", (f"parallel.zero_stage={z}",)) for z in (0, 1, 2)),
            Case("tp2", "lm", ("parallel.tp=2",)),
            Case("tp2_puzzle", "puzzle", ("parallel.tp=2",)),
        ],
    ),
    (2, [Case("pp2", "lm", ("parallel.pp=2", PIPELINE_MICRO))]),
    (4, [Case("tp2_pp2", "lm", ("parallel.tp=2", "parallel.pp=2", PIPELINE_MICRO))]),
    (4, [Case("pp2_dp2_zero1", "lm", ("parallel.pp=2", "parallel.zero_stage=1", PIPELINE_MICRO))]),
]


# --- the byte counter ------------------------------------------------------------------------------


def _payload(name: str, a: dict[str, Any]) -> tuple[list[Any], Any, int | None]:
    """(tensors whose bytes count, process group, peer rank for point-to-point) of one bound call."""
    group = a.get("group")
    if name in ("send", "isend"):
        return [a["tensor"]], group, a.get("dst")
    if name in ("recv", "irecv"):
        return [a["tensor"]], group, a.get("src")
    if name == "reduce":  # the root is the peer: a non-root rank sends its tensor there
        return [a["tensor"]], group, a.get("dst")
    if name == "batch_isend_irecv":
        ops = a["p2p_op_list"]
        return [op.tensor for op in ops], ops[0].group if ops else None, ops[0].peer if ops else None
    tensors = {
        "all_reduce": lambda: [a["tensor"]],
        "broadcast": lambda: [a["tensor"]],
        "gather": lambda: [a["tensor"]],
        "scatter": lambda: [a["tensor"]],
        "all_reduce_coalesced": lambda: list(a["tensors"]),
        "all_gather": lambda: list(a["tensor_list"]),
        "all_gather_into_tensor": lambda: [a["output_tensor"]],
        "_all_gather_base": lambda: [a["output_tensor"]],
        "all_gather_coalesced": lambda: [t for ts in a["output_tensor_lists"] for t in ts],
        "reduce_scatter": lambda: list(a["input_list"]),
        "reduce_scatter_tensor": lambda: [a["input"]],
        "_reduce_scatter_base": lambda: [a["input"]],
        "all_to_all_single": lambda: [a["input"]],
        "all_to_all": lambda: list(a["input_tensor_list"]),
    }[name]()
    return tensors, group, None


COUNTED = (
    "all_reduce", "reduce", "broadcast", "gather", "scatter", "all_reduce_coalesced", "all_gather",
    "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "all_to_all", "send", "recv",
    "isend", "irecv", "batch_isend_irecv",
)  # fmt: skip
P2P = ("send", "recv", "isend", "irecv", "batch_isend_irecv")
SKIPPED_FRAMES = (
    f"{os.sep}torch{os.sep}distributed{os.sep}",
    f"{os.sep}deepspeed{os.sep}comm{os.sep}",
    __file__,
)


def _short(filename: str) -> str:
    if "site-packages" + os.sep in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    return os.path.relpath(filename, ROOT) if filename.startswith(str(ROOT)) else filename


class CommCounter:
    """Wraps torch.distributed's communication functions; while `active`, records every outermost call."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[dict[str, Any]] = []
        self._depth = threading.local()

    @classmethod
    def install(cls) -> CommCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        counter = cls()
        for name in COUNTED:
            original = getattr(c10d, name)
            wrapped = counter._wrap(name, original)
            for module in (dist, c10d):  # the same function object under both names
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapped)
        return counter

    def _wrap(self, name: str, original: Any) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if self.active and depth == 0:
                self._record(name, signature.bind(*args, **kwargs).arguments)
            self._depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.n = depth

        return counted

    def _record(self, name: str, arguments: dict[str, Any]) -> None:
        import torch

        tensors, group, peer = _payload(name, arguments)
        frames, mine, frame = [], "", sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if not any(part in path for part in SKIPPED_FRAMES):
                where = f"{_short(path)}:{frame.f_code.co_name}"
                if len(frames) < 3:
                    frames.append(where)
                if not mine and path.startswith(str(ROOT / "hrm_mega")):
                    mine = where
            frame = frame.f_back
        first = tensors[0] if tensors else None
        self.calls.append({
            "op": name,
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "numel": sum(t.numel() for t in tensors),
            "shape": list(first.shape) if first is not None else [],
            "dtype": str(first.dtype).replace("torch.", "") if first is not None else "",
            "ranks": _group_ranks(group),
            "peer": peer,
            "backward": torch._C._current_autograd_node() is not None,
            "frames": frames,
            "mine": mine,
        })  # fmt: skip


def _group_ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


# --- what a call is ------------------------------------------------------------------------------------


def group_label(call: dict[str, Any], rank: int, layout: Any) -> str:
    """TP, DP, PP, world, or '1 rank' for the process group (or point-to-point peer) of a call."""
    pp_rank, dp_rank, tp_rank = layout.coordinates(rank)
    axes = {
        "TP": {(pp_rank * layout.dp + dp_rank) * layout.tp + t for t in range(layout.tp)},
        "DP": {(pp_rank * layout.dp + d) * layout.tp + tp_rank for d in range(layout.dp)},
        "PP": {(p * layout.dp + dp_rank) * layout.tp + tp_rank for p in range(layout.pp)},
    }
    ranks = {rank, call["peer"]} if call["op"] in P2P else set(call["ranks"])
    if len(ranks) == 1:  # DeepSpeed and the trainer reduce over the data-parallel group even at dp 1
        return "DP (1 rank)" if layout.dp == 1 else "1 rank"
    for axis, members in axes.items():
        if len(members) > 1 and ranks == members:
            return axis
    if call["op"] in P2P and call["peer"] in axes["PP"]:
        return "PP"
    if ranks == set(range(layout.world_size)):
        return "world"
    return f"ranks {sorted(ranks)}"


def traffic_term(call: dict[str, Any]) -> str:
    """The analytic model's name for what a call carries, from its call site (module docstring)."""
    frames, mine, op = " ".join(call["frames"]), call["mine"], call["op"]
    if op in P2P:
        if "_tensor_meta" in frames:
            return "shape metadata"
        if "grads" in frames:
            return "activation grads (bwd)"
        if "activations" in frames:
            return "activations (fwd)"
        return "other p2p: " + call["frames"][0]
    if "tied" in frames:
        return "tied embedding grads"
    if call["numel"] <= SCALAR_NUMEL:
        return "scalars"
    if "cross_entropy" in frames or mine.endswith(":_vocab_parallel_cross_entropy"):
        return "vocab-parallel CE"
    if mine.endswith(":gather_vocab"):
        return "logit all-gather (accuracy metric)"
    if "sign_sgd" in mine:
        return "puzzle-embedding rows"
    if call["frames"] and call["frames"][0].startswith("megatron/core/tensor_parallel"):
        if call["backward"]:
            return "qk-norm weight grads (bwd)" if len(call["shape"]) == 1 else "activation grads (bwd)"
        if mine.endswith((":embed_scaled", ":embed")):
            return "embedding (fwd)"
        return "layer outputs (fwd)"
    if "deepspeed/runtime/zero" in frames:
        if op.startswith("all_gather") or op == "_all_gather_base":
            return "ZeRO parameter all-gather"
        return "ZeRO gradient reduce" if op != "all_reduce" else "ZeRO gradient all-reduce"
    if "deepspeed/runtime" in frames and op == "all_reduce":
        return "gradient all-reduce"
    return "other: " + (call["frames"][0] if call["frames"] else op)


def sent_bytes(call: dict[str, Any], rank: int) -> float:
    """Bytes a rank sends for one collective over n ranks with the bandwidth-optimal algorithms: a ring
    all-reduce 2(n-1)/n of the tensor, a reduce the whole tensor from each non-root rank (exact at
    n = 2; a ring reduce averages (n-1)/n per rank), all-gather and reduce-scatter (n-1)/n."""
    n, b = len(call["ranks"]), call["bytes"]
    if call["op"] == "all_reduce":
        return 2 * (n - 1) / n * b
    if call["op"] == "reduce":
        return (0.0 if call["peer"] == rank else float(b)) if n == 2 else (n - 1) / n * b
    return (n - 1) / n * b


def call_site(call: dict[str, Any]) -> str:
    """e.g. "all_reduce float32[] <- deepspeed/runtime/engine.py:f (in hrm_mega/training/trainer.py:g)"."""
    where = call["frames"][0] if call["frames"] else "?"
    inside = f" (in {call['mine']})" if call["mine"] and call["mine"] != where else ""
    return f"{call['op']} {call['dtype']}{call['shape']} <- {where}{inside}"


# --- the analytic model ----------------------------------------------------------------------------


def layer_evaluations(n: int, t: int, per_l: int, per_h: int, grad_mode: str) -> tuple[int, int]:
    """(layer evaluations, those with gradients) of one CycleBlock forward: N x (T x L-layers + H-layers)."""
    total = n * (t * per_l + per_h)
    with_grad = {"full": total, "last_cycle": t * per_l + per_h, "one_step": per_l + per_h}[grad_mode]
    return total, with_grad


def analytic_volume(trainer: Any, case: Case, cycles: int) -> tuple[dict[str, dict[str, int]], list[str]]:
    """({group: {traffic term: bytes}} this rank should move in one step (module docstring), notes)."""
    from hrm_mega.config import pipeline_stage_blocks

    cfg, w = trainer.config, trainer.world
    layout, c = w.layout, cfg.model
    micro = cfg.train.micro_batch or trainer.local_batch
    n_micro = trainer.local_batch // micro
    out: dict[str, dict[str, int]] = defaultdict(dict)
    notes: list[str] = []
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    h, f32 = c.hidden_size, 4

    if case.family == "lm":
        s = trainer.manifest["seq_len"]
        act = micro * s * h * f32
        blocks = pipeline_stage_blocks(cfg)[w.pp_rank] if layout.pp > 1 else c.num_groups
        first, last = w.pp_rank == 0, w.pp_rank == layout.pp - 1
        total, grad = layer_evaluations(cycles, c.l_cycles, c.local_per_global, 1, c.grad_mode)
        evals = blocks * total + (c.num_tail_layers if last else 0)
        evals_grad = blocks * grad + (c.num_tail_layers if last else 0)
        if layout.tp > 1:
            tp = out["TP"]
            tp["layer outputs (fwd)"] = n_micro * 2 * evals * act
            tp["activation grads (bwd)"] = n_micro * (2 * evals_grad + int(last)) * act  # + the head's input
            tp["qk-norm weight grads (bwd)"] = n_micro * 2 * evals_grad * c.head_dim * f32
            if first:
                tp["embedding (fwd)"] = n_micro * act
            if last:
                tp["vocab-parallel CE"] = n_micro * 3 * micro * (s - 1) * f32
        if layout.pp > 1:
            ids = 3 * micro * s * 8  # position_ids, doc_ids, token_mask: int64
            sides = int(not first) + int(not last)  # boundaries this stage sends or receives across
            pp = out["PP"]
            pp["activations (fwd)"] = sides * n_micro * (act + ids + 3 * f32)
            pp["activation grads (bwd)"] = sides * n_micro * (act + 3 * f32)
            pp["shape metadata"] = sides * n_micro * 256 * 4  # with every micro-batch's activations
            if first or last:
                embed = trainer.model.tied_modules["embed"].embed_tokens.weight  # this rank's shard
                pp["tied embedding grads"] = embed.numel() * embed.element_size()
    else:  # the puzzle family: one segment per step, plus HRM's bootstrap look-ahead (a no-grad forward)
        s, prefix = c.seq_len, c.prefix_len
        act, tok = micro * (s + prefix) * h * f32, micro * s * h * f32
        forwards = 2 if c.q_target == "bootstrap" and c.halt_max_steps > 1 else 1
        per_h = 0 if c.shared_net else c.h_layers
        total, grad = layer_evaluations(cycles, c.l_cycles, c.l_layers, per_h, c.grad_mode)
        if layout.tp > 1:
            tp = out["TP"]
            tp["layer outputs (fwd)"] = n_micro * forwards * 2 * total * act
            tp["activation grads (bwd)"] = n_micro * (2 * grad + 1) * act  # + lm_head's input
            tp["embedding (fwd)"] = n_micro * forwards * tok
            tp["vocab-parallel CE"] = n_micro * 2 * micro * s * 8  # stablemax in fp64
            tp["logit all-gather (accuracy metric)"] = n_micro * micro * s * c.vocab_size * f32

    if layout.dp == 1 and cfg.parallel.zero_stage == 0:  # DeepSpeed still all-reduces over the 1-rank group
        out["DP (1 rank)"]["gradient all-reduce"] = param_bytes
    if layout.dp > 1:
        dp = out["DP"]
        stage = cfg.parallel.zero_stage
        if stage == 0:
            dp["gradient all-reduce"] = param_bytes
        else:  # each slice reduced to its owner (engine.ZERO_REDUCE)
            dp["ZeRO gradient reduce"] = param_bytes
            align = 2 * layout.dp  # the flat fp32 buffer is padded to nccl_start_alignment_factor x dp
            numel = sum(p.numel() for p in params)
            dp["ZeRO parameter all-gather"] = -(numel // -align) * align * 4
    return {k: dict(v) for k, v in out.items()}, notes


# --- worker: one torchrun world, its cases one after another -------------------------------------------


def case_config(case: Case, data: dict[str, str], run_dir: Path):
    from hrm_mega.config import load_config

    recipe, sets = (LM_RECIPE, LM_SETS) if case.family == "lm" else (PUZZLE_RECIPE, PUZZLE_SETS)
    overrides = [*sets, *COMMON_SETS, *case.sets, f"data.path={data[case.family]}", f"log.out_dir={run_dir}"]
    return load_config(ROOT / recipe, overrides)


def run_case(case: Case, counter: CommCounter, data: dict[str, str], tmp: Path) -> dict[str, Any]:
    import torch

    from hrm_mega.training.trainer import build_trainer

    trainer = build_trainer(case_config(case, data, tmp / case.name), resume="none")
    for step in range(1, MEASURED_STEP + 1):
        cycles = (
            trainer.task.cycles_for_step(trainer.step)
            if case.family == "lm"
            else trainer.config.model.h_cycles
        )
        counter.calls, counter.active = [], step == MEASURED_STEP
        start = time.perf_counter()
        trainer.train_step()
        seconds = time.perf_counter() - start
        counter.active = False
    rank, layout = trainer.world.rank, trainer.world.layout
    measured: dict[str, dict[str, list[Any]]] = defaultdict(dict)
    sent: dict[str, float] = defaultdict(float)  # DP gradient terms: bytes this rank puts on the wire
    for call in counter.calls:
        group, term = group_label(call, rank, layout), traffic_term(call)
        if group == "DP" and "gradient" in term:
            sent[term] += sent_bytes(call, rank)
        entry = measured[group].setdefault(term, [0, 0, set()])
        entry[0] += 1
        entry[1] += call["bytes"]
        if term == "scalars" or term.startswith("other"):
            entry[2].add(call_site(call))
    analytic, notes = analytic_volume(trainer, case, cycles)
    result = {
        "rank": rank,
        "pp_rank": trainer.world.pp_rank,
        "measured": {
            g: {t: [n, b, sorted(src)] for t, (n, b, src) in terms.items()} for g, terms in measured.items()
        },
        "analytic": analytic,
        "notes": notes,
        "seconds": seconds,
        "gradient_sent": dict(sent),
    }
    trainer.logger.close()
    trainer.stream.close()
    every: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, result)  # after the measurement: not counted
    return {"layout": f"tp {layout.tp} x pp {layout.pp} x dp {layout.dp}", "ranks": every}


def worker(args: argparse.Namespace) -> None:
    counter = CommCounter.install()  # before deepspeed and megatron-core bind anything
    import torch

    torch.set_num_threads(1)
    cases = [case for _, world in WORLDS for case in world if case.name in args.cases.split(",")]
    data = json.loads(args.data)
    results = {case.name: run_case(case, counter, data, Path(args.tmp)) for case in cases}
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))


# --- driver ----------------------------------------------------------------------------------------------


def build_data(tmp: Path) -> dict[str, str]:
    """A text dataset (SentencePiece vocab 320, rows of 64 tokens) and a small sudoku set, by hrm_mega.prep."""
    from hrm_mega.prep.cli import main as prep

    one_worker = ["--workers", "1"]
    steps = [
        ["corpus", "--out", str(tmp / "corpus"), "--docs", "400", "--seed", "0"],
        ["text", "--input", str(tmp / "corpus/train.txt"), "--test-input", str(tmp / "corpus/test.txt"),
         "--vocab-size", "320", "--seq-len", "64", "--out", str(tmp / "text"), "--samples-per-shard", "8",
         *one_worker],
        ["sudoku", "--out", str(tmp / "sudoku"), "--train", "64", "--test", "8", "--givens", "50",
         "--samples-per-shard", "16", "--quiet", *one_worker],
    ]  # fmt: skip
    for argv in steps:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = prep(argv)
        if status != 0:
            sys.exit(f"parallel_overhead: `hrm-mega prep {' '.join(argv)}` failed")
    return {"lm": str(tmp / "text"), "puzzle": str(tmp / "sudoku")}


def run_world(nproc: int, cases: list[Case], data: dict[str, str], tmp: Path) -> dict[str, Any]:
    out = tmp / f"{cases[0].name}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
        "--worker", f"--cases={','.join(c.name for c in cases)}", f"--data={json.dumps(data)}",
        f"--tmp={tmp}", f"--out={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stdout + proc.stderr).splitlines()
        ranks = [line for line in lines if line.startswith("[rank")]  # the ranks' own tracebacks
        tail = "\n".join((ranks or lines)[-40:])
        sys.exit(f"parallel_overhead: {[c.name for c in cases]} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def rank_classes(ranks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Ranks with identical measured and analytic volumes, merged: [(label, one rank's result)]."""
    classes: list[tuple[list[int], dict[str, Any]]] = []
    for r in ranks:
        key = (r["measured"], r["analytic"])
        for members, rep in classes:
            if (rep["measured"], rep["analytic"]) == key:
                members.append(r["rank"])
                break
        else:
            classes.append(([r["rank"]], r))
    out = []
    for members, rep in classes:
        where = "all ranks" if len(classes) == 1 else f"ranks {','.join(map(str, members))}"
        if len(classes) > 1 and len({ranks[m]["pp_rank"] for m in members}) == 1:
            where = f"stage {rep['pp_rank']} ({where})"
        out.append((where, rep))
    return out


def fmt(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f}"


GROUP_ORDER = ("TP", "DP", "PP", "world", "DP (1 rank)")


def print_report(results: dict[str, Any]) -> list[str]:
    """Prints the summary and the per-term tables; returns the modelled terms that disagree."""
    failures, summary, details, gradients = [], [], [], []
    for name, res in results.items():
        for where, r in rank_classes(res["ranks"]):
            groups = sorted(set(r["measured"]) | set(r["analytic"]),
                            key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else 9)  # fmt: skip
            details.append(f"\n{name} ({res['layout']}), {where}; the step took {r['seconds']:.2f} s")
            details.append(f"  {'group':<11} {'traffic':<36} {'calls':>5} {'measured B':>12} "
                           f"{'analytic B':>12} {'ratio':>6}")  # fmt: skip
            for g in groups:
                measured, analytic = r["measured"].get(g, {}), r["analytic"].get(g, {})
                for term in sorted(set(measured) | set(analytic), key=lambda t: (t not in analytic, t)):
                    n, b, sources = measured.get(term, [0, 0, []])
                    a = analytic.get(term)
                    ratio = f"{b / a:6.3f}" if a else "     -"
                    details.append(f"  {g:<11} {term:<36} {n:>5} {fmt(b):>12} {fmt(a):>12} {ratio}")
                    details += [f"  {'':<11}   {src}" for src in sources]
                    if a is not None and abs(b - a) > TOLERANCE * a:
                        failures.append(f"{name} {where} {g} {term}: measured {b:,} vs analytic {a:,}")
                total = sum(v[1] for v in measured.values())
                unmodelled = sum(v[1] for t, v in measured.items() if t not in analytic)
                expected = sum(analytic.values())
                ratio = f"{(total - unmodelled) / expected:6.3f}" if expected else "     -"
                summary.append(f"{name:<14} {where:<20} {g:<11} {fmt(total):>12} {fmt(unmodelled):>8} "
                               f"{fmt(expected or None):>12} {ratio}")  # fmt: skip
            details += [f"  note: {note}" for note in r["notes"]]
            grads = r["analytic"].get("DP", {})
            payload = grads.get("ZeRO gradient reduce") or grads.get("gradient all-reduce")
            if payload and r["gradient_sent"]:
                dp = int(res["layout"].split("dp ")[1])
                theory, wire = (dp - 1) / dp * payload, sum(r["gradient_sent"].values())
                details.append(f"  DP gradient bytes sent per rank: {fmt(wire)}; reduce-scatter theory "
                               f"(dp-1)/dp x P = {fmt(theory)}; ratio {wire / theory:.3f}")  # fmt: skip
                zero = "ZeRO gradient reduce" in grads
                gradients.append(f"{name:<14} {where:<20} {fmt(payload):>12} {fmt(wire):>12} {fmt(theory):>12} "
                                 f"{wire / theory:6.3f}{'' if zero else '  (ZeRO-0: an all-reduce)'}")  # fmt: skip
                if zero and abs(wire - theory) > GRADIENT_TOLERANCE * theory:
                    failures.append(
                        f"{name} {where}: gradient bytes sent {wire:,.0f} vs reduce-scatter theory {theory:,.0f}"
                    )
    print(f"\n{'layout':<14} {'ranks':<20} {'group':<11} {'measured B':>12} {'unmod. B':>8} "
          f"{'analytic B':>12} {'ratio':>6}")  # fmt: skip
    print("-" * 89)
    print("\n".join(summary))
    print("\nbytes of payload per step and rank; unmod. = the measured bytes the model leaves out (scalars);")
    print("ratio = (measured - unmod.) / analytic")
    if gradients:
        print(f"\n{'layout':<14} {'ranks':<20} {'grad P B':>12} {'sent B':>12} {'theory B':>12} {'ratio':>6}")
        print("\n".join(gradients))
        print("DP gradient bytes a rank sends per step; theory: reduce-scatter, (dp-1)/dp x P")
    print("\n".join(details))
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated layout names (default: all)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from importlib.metadata import version

    wanted = set(args.only.split(",")) if args.only else None
    known = {c.name for _, cases in WORLDS for c in cases}
    if wanted and not wanted <= known:
        sys.exit(f"parallel_overhead: --only {args.only}: unknown layout(s) {sorted(wanted - known)}; "
                 f"choose from {sorted(known)}")  # fmt: skip
    start = time.perf_counter()
    print(
        f"Communication payload per training step and rank (step {MEASURED_STEP}; torch {version('torch')}, "
        f"deepspeed {version('deepspeed')}, megatron-core {version('megatron-core')}, CPU/gloo, fp32)\n"
        "HRMGemma: hidden 128, 4 heads (2 kv, head_dim 32), 2 CycleBlocks x (3 local + 1 global) + 2 "
        "trailing layers, N=T=2 one_step, vocab 320, seq 64\n"
        "puzzle HRM: hidden 128, 2+2 layers, N=T=2 one_step, vocab 12, 81+1 positions, bootstrap Q target\n"
        "global batch 8: one micro-batch per rank, pipeline layouts micro-batches of 2 rows"
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp))
        for nproc, cases in WORLDS:
            cases = [c for c in cases if wanted is None or c.name in wanted]
            if cases:
                results.update(run_world(nproc, cases, data, Path(tmp)))
    failures = print_report(results)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if failures:
        print("FAIL: modelled terms off by more than 1%:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print(f"PASS: every modelled term within {TOLERANCE:.0%} of the measurement")


if __name__ == "__main__":
    main()
