"""Memory per GPU of an HRMGemma layout: model states and activations of the first and the last pipeline
stage, from the parameters counted on the meta device. `hrm-mega info` prints it for a recipe's layout;
bench/memory_plan.py tabulates it over layouts for the 1B-27B recipes (docs/parallelism.md).

Model states, bytes per parameter held on the GPU (P = the parameters of its pipeline stage, split by
TP), bf16 mixed precision with Adam(-atan2) (fp32 training: weights 4, grads 4, optimizer 8), the ZeRO paper's accounting (Rajbhandari et al. 2020),
which bench/zero_memory.py measures exactly from DeepSpeed's engine:

    weights 2 (bf16)   grads 2 (bf16)   optimizer 12 (fp32 master 4 + exp_avg 4 + exp_avg_sq 4)
    ZeRO-1 divides the optimizer's 12 by dp, ZeRO-2 also the grads, ZeRO-3 also the weights.

Activations, bytes per token of one micro-batch (bf16, fused attention, no sequence parallelism):

    per layer   36 h + (16 a d + 8 k d + 8 i) / tp      (traced from our Gemma layer; see --check)
    per layer   2 h (a d + 2 k d + 2 i) / tp once       (q/k/v and gate/up weights concatenated in forward)
    logits      6 V / tp on the last stage               (bf16 logits + fp32 log-softmax)

h hidden, a heads, k kv heads, d head_dim, i MLP width, V vocab. 36 h: the four sandwich norms' fp32
inputs and outputs and the bf16 inputs of the two fused projections (replicated across TP ranks);
16 a d: the fp32 QK-norm input and output of q, and q, k, v (repeated to a heads) and the attention
output in bf16; 8 k d: the fp32 QK-norm of k; 8 i: the GeGLU (gate|up, activation, product).
grad_mode one_step differentiates each layer once per step (the other cycles run under no_grad and keep
nothing), so a step keeps num_layers layer passes. train.activation_checkpointing (pipeline stages
only, parallel.pp > 1) checkpoints each CycleBlock and the trailing layers as a unit: a unit keeps its
bf16 input (2 h per token), and one unit at a time is recomputed in backward. Under pipeline
parallelism with DeepSpeed's 1F1B schedule (gradient accumulation >= pp), stage s holds pp - s
micro-batches in flight; the table shows the first and the last stage, and a layout fits when all
its stages do. Stages hold whole CycleBlocks: the
embedding on the first, the trailing layers, the final norm and a tied copy of the embedding (the LM
head) on the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hrm_mega.config import Config, LMModelConfig, pipeline_stage_blocks
from hrm_mega.models import build_model

GIB = 2**30


def state_bytes(precision: str) -> tuple[int, int, int]:
    """Bytes per parameter of (weights, grads, optimizer): bf16 keeps an fp32 master copy with Adam's two
    moments; fp32 trains the weights themselves."""
    return (2, 2, 12) if precision == "bf16" else (4, 4, 8)


# --- parameters per pipeline stage and TP rank -------------------------------------------------------


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "embed", "block.<g>", "tail", "final" (norm, untied LM head, value head)
    split: int  # elements split across TP ranks
    replicated: int  # elements every TP rank holds (norm weights, gates, halting heads)


def parameter_groups(c: LMModelConfig) -> list[ParamGroup]:
    """The model's parameters by where pipeline parallelism puts them. A 2-D tensor whose both sides
    exceed 1 (a linear weight, the embedding) is split by TP; vectors and the 1-wide heads are not."""
    with torch.device("meta"):
        model = build_model(c)
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        finals = {"norm": "final", "lm_head": "final", "value_head": "final"}
        key = {"embed_tokens": "embed", "tail": "tail", "vision": "vision", **finals}.get(top)
        if top == "blocks":
            key = f"block.{name.split('.')[1]}"
        if key is None:
            raise ValueError(f"memory_plan: no pipeline stage for parameter {name}")
        split = p.dim() == 2 and min(p.shape) > 1
        if top == "vision":  # only the encoder layers' linears are split (models/vision.py)
            split = split and ".layers." in name
        groups.setdefault(key, [0, 0])[0 if split else 1] += p.numel()
    return [ParamGroup(k, s, r) for k, (s, r) in groups.items()]


def stage_contents(
    c: LMModelConfig, groups: list[ParamGroup], blocks_per_stage: list[int]
) -> list[tuple[int, int, int]]:
    """(TP-split elements, replicated elements, CycleBlocks) of each pipeline stage."""
    pp = len(blocks_per_stage)
    stage_of_block = [s for s, n in enumerate(blocks_per_stage) for _ in range(n)]
    stages = [[0, 0, n] for n in blocks_per_stage]
    for g in groups:
        if g.name.startswith("block."):
            targets = [stage_of_block[int(g.name.split(".")[1])]]
        elif g.name == "embed":
            targets = [0, pp - 1] if pp > 1 else [0]  # the tied LM head: a copy on the last stage
        elif g.name == "vision":
            targets = [0]  # the image encoder feeds the embedding
        else:
            targets = [pp - 1]
        for s in targets:
            stages[s][0] += g.split
            stages[s][1] += g.replicated
    return [(split, replicated, blocks) for split, replicated, blocks in stages]


# --- the estimate -----------------------------------------------------------------------------------


def layer_activation_bytes(c: LMModelConfig, tp: int) -> float:
    """Bytes one layer keeps for backward per token (see the module docstring)."""
    h, a, k, d, i = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return 36 * h + (16 * a * d + 8 * k * d + 8 * i) / tp


def fused_weight_bytes(c: LMModelConfig, tp: int) -> float:
    """Bytes of the concatenated q/k/v and gate/up weights one layer keeps for backward."""
    h, k, d, i = c.hidden_size, c.num_kv_heads, c.head_dim, c.intermediate_size
    return 2 * h * (c.num_heads * d + 2 * k * d + 2 * i) / tp


def differentiated_passes(c: LMModelConfig, layers: int) -> float:
    """Layer passes kept per step on a stage of `layers` layers, by grad mode (one_step: each once)."""
    per_group = {
        "one_step": c.group_size,
        "last_cycle": c.l_cycles * c.local_per_global + 1,
        "full": c.h_cycles * (c.l_cycles * c.local_per_global + 1),
    }[c.grad_mode]
    return layers * per_group / c.group_size


@dataclass
class Estimate:
    tp: int
    pp: int
    dp: int
    zero: int
    stage: int
    blocks: int  # CycleBlocks on this stage
    params: float  # parameters on one GPU of this stage
    weights: float
    grads: float
    optimizer: float
    activations: float  # without activation checkpointing
    activations_ckpt: float | None  # with train.activation_checkpointing (None: not offered, pp = 1)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer


def estimate(config: Config, groups: list[ParamGroup], gpus: int, tokens: int) -> list[Estimate]:
    """Bytes per GPU of the first and the last pipeline stage. The stages between hold fewer
    micro-batches than the first and neither the embedding nor the logits, so they need less."""
    c, par = config.model, config.parallel
    tp, pp, zero = par.tp, par.pp, par.zero_stage
    dp = gpus // (tp * pp)
    stages = stage_contents(c, groups, pipeline_stage_blocks(config))
    estimates = []
    for s in sorted({0, pp - 1}):
        split, replicated, blocks = stages[s]
        last = s == pp - 1
        tail = c.num_tail_layers if last else 0
        layers = blocks * c.group_size + tail
        n = split / tp + replicated
        weight_bytes, grad_bytes, optimizer_bytes = state_bytes(config.train.precision)
        weights = n * weight_bytes / (dp if zero >= 3 else 1)
        grads = n * grad_bytes / (dp if zero >= 2 else 1)
        optimizer = n * optimizer_bytes / (dp if zero >= 1 else 1)
        in_flight = pp - s  # 1F1B: stage s holds pp - s micro-batches
        logits = tokens * 6 * c.vocab_size / tp if last else 0.0
        one_layer = tokens * layer_activation_bytes(c, tp) + fused_weight_bytes(c, tp)
        full = in_flight * differentiated_passes(c, layers) * one_layer + logits
        ckpt = None
        if pp > 1:  # checkpoint units: the stage's CycleBlocks, and the tail on the last stage
            units = blocks + (1 if tail else 0)
            largest_unit = max(differentiated_passes(c, c.group_size), tail)
            ckpt = in_flight * units * tokens * 2 * c.hidden_size + largest_unit * one_layer + logits
        estimates.append(Estimate(tp, pp, dp, zero, s, blocks, n, weights, grads, optimizer, full, ckpt))
    return estimates
