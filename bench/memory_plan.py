"""Memory per GPU for the HRMGemma recipes under tensor x pipeline x data parallelism and ZeRO: the table
that docs/parallelism.md shows. Nothing is trained; parameters are counted on the meta device.

The model states and activation formulas are in hrm_mega/models/lm_memory.py (also what `hrm-mega info`
prints for one layout); this script tabulates them over layouts and checks the activation formula
against autograd (--check).

    python bench/memory_plan.py [--seq-len 8192] [--micro-batch 1] [--nodes 27b=5] [--gpu-gib 80]
                                [--reserve-gib 8] [--check]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from hrm_mega.config import (
    Config,
    ConfigError,
    load_config,
    resolve_layout,
)
from hrm_mega.models import build_model
from hrm_mega.models.lm_memory import (
    GIB,
    estimate,
    fused_weight_bytes,
    layer_activation_bytes,
    parameter_groups,
)

ROOT = Path(__file__).resolve().parents[1]
# Recipe -> the nodes (of --gpus-per-node GPUs) it is planned on.
RECIPES = {"1b": 1, "4b": 1, "12b": 2, "27b": 4}


def layouts(config: Config, gpus: int, gpus_per_node: int) -> list[Config]:
    """Layouts to show: pure DP at ZeRO 1-3; every TP within a node at ZeRO-1; and for every TP the
    fewest pipeline stages that fit the GPUs, at ZeRO-1. Invalid ones are dropped by the repo's own
    checks (ParallelConfig.validate and hrm_mega.config.resolve_layout)."""

    def layout(tp: int, pp: int, zero: int) -> Config | None:
        # Blocks that do not split evenly go to the first stages (the last holds the tail and logits).
        extra, per_stage = config.model.num_groups % pp, config.model.num_groups // pp
        blocks = [per_stage + 1] * extra + [per_stage] * (pp - extra) if extra else []
        cfg = replace(
            config, parallel=replace(config.parallel, tp=tp, pp=pp, zero_stage=zero, pp_blocks=blocks)
        )
        try:
            cfg.parallel.validate()
            resolve_layout(cfg, gpus)
        except ConfigError:
            return None
        return cfg

    tps = [tp for tp in (1, 2, 4, 8) if tp <= gpus_per_node]
    shown = [layout(1, 1, zero) for zero in (1, 2, 3)]
    shown += [layout(tp, 1, 1) for tp in tps[1:]]
    for tp in tps:
        pipelined = (layout(tp, pp, 1) for pp in range(2, config.model.num_groups + 1))
        shown.append(next((cfg for cfg in pipelined if cfg is not None), None))
    return [cfg for cfg in shown if cfg is not None]


# --- the formula's check against autograd ------------------------------------------------------------


def traced_layer_bytes(seq_lens: tuple[int, int] = (80, 160)) -> tuple[float, float, float, float]:
    """Runs one global Gemma layer of a toy config in bf16 on the CPU and counts what autograd saves for
    backward, once per storage, parameters and the [s, s] mask left out (flash attention has none).
    Returns (traced bytes per token, formula's, traced bytes independent of s, formula's fused weights).
    The traced per-token figure also holds the RoPE cos/sin rows (4 d bytes), which all layers share."""
    from hrm_mega.models.lm import sequence_context

    overrides = [
        "model.vocab_size=512", "model.hidden_size=192", "model.intermediate_size=1152",
        "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=64", "model.query_pre_attn_scalar=64",
        "model.num_layers=6",
    ]  # fmt: skip
    c = load_config(ROOT / "configs/lm/hrmgemma_1b.yaml", overrides).model
    model = build_model(c).init_weights(0).to(torch.bfloat16)
    layer = model.blocks["0"].H.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    totals = []
    for s in seq_lens:  # neither equals head_dim, so only the mask has the shape [s, s]
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, s: int = s, saved: dict[int, int] = saved) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and not (t.dim() >= 2 and t.shape[-2:] == (s, s)):
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(1, s, c.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        ctx = sequence_context(c, (model.rope_local, model.rope_global), x, None, None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, ctx)
        totals.append(sum(saved.values()))
    per_token = (totals[1] - totals[0]) / (seq_lens[1] - seq_lens[0])
    constant = totals[0] - per_token * seq_lens[0]
    return per_token, layer_activation_bytes(c, 1), constant, fused_weight_bytes(c, 1)


# --- the table ---------------------------------------------------------------------------------------


def gib(n: float | None) -> str:
    return "     -" if n is None or n == math.inf else f"{n / GIB:6.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch (train.micro_batch)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", default="", help="nodes per recipe, e.g. 27b=5 (default 1b=1,4b=1,12b=2,27b=4)")
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--reserve-gib", type=float, default=8.0, help="CUDA context, NCCL, ZeRO buckets, slack")
    p.add_argument("--check", action="store_true", help="check the activation formula against autograd")
    args = p.parse_args()
    tokens = args.seq_len * args.micro_batch
    budget = (args.gpu_gib - args.reserve_gib) * GIB

    if args.check:
        traced, formula, constant, fused = traced_layer_bytes()
        print(f"activation formula check (one global layer, width 192, bf16, CPU): traced {traced:.0f} "
              f"B/token, formula {formula:.0f} ({formula / traced - 1:+.1%}); per-layer constant traced "
              f"{constant / 1e6:.3f} MB, fused-weight formula {fused / 1e6:.3f} MB\n")  # fmt: skip

    print(
        f"HRMGemma memory per GPU (GiB): bf16 weights and grads, fp32 master + Adam; seq {args.seq_len} x "
        f"micro-batch {args.micro_batch}; budget {args.gpu_gib:g} GiB - {args.reserve_gib:g} reserve = "
        f"{budget / GIB:g} GiB\n"
        "fits (every stage): y = without activation checkpointing, ck = with it (pp > 1 only), - = no"
    )
    plan = dict(RECIPES)
    for item in filter(None, args.nodes.split(",")):
        recipe, _, count = item.partition("=")
        if recipe not in RECIPES or not count.isdigit() or int(count) < 1:
            p.error(f"--nodes {item!r}: expected RECIPE=N with RECIPE one of {', '.join(RECIPES)}")
        plan[recipe] = int(count)
    for recipe, nodes in plan.items():
        config = load_config(ROOT / f"configs/lm/hrmgemma_{recipe}.yaml")
        c = config.model
        groups = parameter_groups(c)
        total = sum(g.split + g.replicated for g in groups)
        embedding = sum(g.split for g in groups if g.name == "embed")
        gpus = nodes * args.gpus_per_node
        print(
            f"\nhrmgemma_{recipe}: {total / 1e9:.2f}B params ({embedding / 1e9:.2f}B embedding), "
            f"{c.num_groups} CycleBlocks + {c.num_tail_layers} tail layers, heads {c.num_heads}/"
            f"{c.num_kv_heads} kv, grad_mode {c.grad_mode}; {nodes} node(s) = {gpus} GPUs"
        )
        print(
            f"  {'tp':>2} {'pp':>2} {'dp':>3} {'zero':>4} {'stage':>5} {'blocks':>6} {'params/GPU':>10} "
            f"{'weights':>7} {'grads':>6} {'optim':>6} {'states':>6} {'act':>6} {'act+ck':>6} "
            f"{'total':>6} {'+ck':>6} fits"
        )
        for cfg in layouts(config, gpus, args.gpus_per_node):
            stages = estimate(cfg, groups, gpus, tokens)
            totals = [(e.states + e.activations, e.states + (e.activations_ckpt or math.inf)) for e in stages]
            fits = "y" if max(a for a, _ in totals) <= budget else "-"
            fits = "ck" if fits == "-" and max(b for _, b in totals) <= budget else fits
            for e, (no_ckpt, ckpt) in zip(stages, totals):
                print(
                    f"  {e.tp:>2} {e.pp:>2} {e.dp:>3} {e.zero:>4} {e.stage:>5} {e.blocks:>6} "
                    f"{e.params / 1e9:>9.2f}B {gib(e.weights):>7} {gib(e.grads)} {gib(e.optimizer)} "
                    f"{gib(e.states)} {gib(e.activations)} {gib(e.activations_ckpt)} {gib(no_ckpt)} "
                    f"{gib(ckpt)}   {fits}"
                )


if __name__ == "__main__":
    main()
