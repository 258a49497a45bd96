"""Model summary without training: parameter counts, FLOPs per segment, memory estimate per rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hrm_mega.config import Config, PuzzleModelConfig, swiglu_intermediate
from hrm_mega.models.puzzle import RecursiveReasoner, count_parameters


def build_on_meta(config: PuzzleModelConfig) -> RecursiveReasoner:
    """The model with no storage behind its tensors: for counting, never for running."""
    with torch.device("meta"):
        return RecursiveReasoner(config)


def _block_flops_per_sample(c: PuzzleModelConfig, total_len: int) -> int:
    """Forward FLOPs of one block on one sample (2 per multiply-add)."""
    h = c.hidden_size
    inter = swiglu_intermediate(h, c.expansion)
    mlp = 2 * total_len * 3 * h * inter
    if c.token_mixer == "mlp":
        seq_inter = swiglu_intermediate(total_len, c.expansion)
        return mlp + 2 * h * 3 * total_len * seq_inter
    projections = 2 * total_len * 4 * h * h
    scores_and_mix = 2 * 2 * total_len * total_len * h
    return projections + scores_and_mix + mlp


@dataclass
class FlopEstimate:
    forward_per_segment: int  # one sample, one segment
    train_per_segment: int  # forward + backward of the differentiated updates (+ bootstrap look-ahead)


def segment_flops(c: PuzzleModelConfig) -> FlopEstimate:
    total_len = c.seq_len + c.prefix_len
    block = _block_flops_per_sample(c, total_len)
    h_layers = c.l_layers if c.shared_net else c.h_layers
    l_update, h_update = c.l_layers * block, h_layers * block
    head = 2 * total_len * c.hidden_size * c.vocab_size
    if c.q_head == "cells":  # an h -> h -> 1 MLP on every answer cell
        head += 2 * c.seq_len * c.hidden_size * (c.hidden_size + 1)
    forward = c.h_cycles * (c.l_cycles * l_update + h_update) + head
    if c.grad_mode == "one_step":
        differentiated = l_update + h_update + head
    elif c.grad_mode == "last_cycle":
        differentiated = c.l_cycles * l_update + h_update + head
    else:
        differentiated = forward
    train = forward + 2 * differentiated  # backward costs about twice the forward of what it covers
    if c.q_target == "bootstrap" and c.halt_max_steps > 1:
        train += forward  # HRM's extra no-grad segment for the Q target, counted whole as HRM runs it
    return FlopEstimate(forward, train)


@dataclass
class MemoryEstimate:
    params: int
    grads: int
    optimizer: int
    puzzle_emb: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.puzzle_emb + self.activations


def memory_per_rank(config: Config, world_size: int = 1) -> MemoryEstimate:
    """Bytes per rank for the configured layout (ZeRO stage, tp, precision); activations are a rough bound."""
    c, par = config.model, config.parallel
    dp = max(1, world_size // (par.tp * par.pp))
    n_params = count_parameters(build_on_meta(c))["total"] // par.tp
    half = config.train.precision == "bf16"
    param_bytes = n_params * (2 if half else 4)
    grad_bytes = n_params * (2 if half else 4)
    optim_bytes = n_params * (4 * 2 + (4 if half else 0))  # Adam moments (+ fp32 master weights in bf16)
    if par.zero_stage >= 1:
        optim_bytes //= dp
    if par.zero_stage >= 2:
        grad_bytes //= dp
    if par.zero_stage >= 3:
        param_bytes //= dp
    micro = config.train.micro_batch or max(1, config.train.global_batch // dp)
    total_len = c.seq_len + c.prefix_len
    inter = swiglu_intermediate(c.hidden_size, c.expansion)
    per_layer = micro * total_len * (8 * c.hidden_size + 3 * inter) // par.tp
    if c.token_mixer == "attention":
        per_layer += micro * c.num_heads // par.tp * total_len * total_len  # attention probabilities
    h_layers = c.l_layers if c.shared_net else c.h_layers
    layers_kept = {
        "one_step": c.l_layers + h_layers,
        "last_cycle": c.l_cycles * c.l_layers + h_layers,
        "full": c.h_cycles * (c.l_cycles * c.l_layers + h_layers),
    }[c.grad_mode]
    carry = 2 * micro * total_len * c.hidden_size
    act_bytes = (per_layer * layers_kept + carry) * (2 if half else 4)
    emb_bytes = c.num_puzzle_identifiers * c.puzzle_emb_ndim * 4
    return MemoryEstimate(param_bytes, grad_bytes, optim_bytes, emb_bytes, act_bytes)


def describe_lm(config: Config, world_size: int = 1, seq_len: int = 4096) -> str:
    """`hrm-mega info` for HRMGemma: parameter counts (Gemma part and HRM additions), FLOPs per token, and
    memory per GPU of the first and last pipeline stage at seq_len x the micro-batch (models/lm_memory.py)."""

    from hrm_mega.models.lm import HRMGemma

    c = config.model
    with torch.device("meta"):
        model = HRMGemma(c)
    counts = model.parameter_counts()
    embed = c.vocab_size * c.hidden_size
    per_layer = counts["gemma"] - counts["vision"] - embed - c.hidden_size  # minus embedding, final norm
    layer_params = per_layer / c.num_layers
    layer_runs = c.num_groups * c.h_cycles * (c.l_cycles * c.local_per_global + 1) + c.num_tail_layers
    flops = 2 * layer_params * layer_runs + 2 * embed  # matmuls per token (tied head included), scores aside
    return "\n".join(
        [
            f"model: hrm_gemma  hidden={c.hidden_size} layers={c.num_layers} ({c.num_groups} CycleBlocks of "
            f"{c.local_per_global} local + 1 global, {c.num_tail_layers} tail)  cycles N={c.h_cycles} T={c.l_cycles}",
            f"parameters: {counts['total']:,} (Gemma 3: {counts['gemma']:,}; HRM gates and heads: {counts['hrm_only']:,})",
            *(
                [
                    f"image encoder: {counts['vision']:,} parameters (included above; FLOPs below are text only)"
                ]
                if c.vision is not None
                else []
            ),
            f"forward FLOPs per token (matmuls, excluding attention scores): {flops / 1e9:.2f} GFLOP",
            *memory_lines(config, world_size, seq_len),
        ]
    )


def memory_lines(config: Config, world_size: int, seq_len: int) -> list[str]:
    from hrm_mega.models.lm_memory import GIB, estimate, parameter_groups

    par, train = config.parallel, config.train
    dp = max(1, world_size // (par.tp * par.pp))
    micro = train.micro_batch or max(1, train.global_batch // dp)
    lines = [
        f"memory per GPU (world={world_size}, tp={par.tp}, pp={par.pp}, zero={par.zero_stage}, {train.precision}, "
        f"seq {seq_len} x micro-batch {micro}):"
    ]
    for e in estimate(config, parameter_groups(config.model), world_size, seq_len * micro):
        ckpt = train.activation_checkpointing and e.activations_ckpt is not None
        activations = e.activations_ckpt if ckpt else e.activations
        lines.append(
            f"  stage {e.stage}: {(e.states + activations) / GIB:.2f} GiB = weights {e.weights / GIB:.3f}  "
            f"grads {e.grads / GIB:.3f}  optimizer {e.optimizer / GIB:.3f}  activations ~{activations / GIB:.3f}"
            + (" (checkpointed)" if ckpt else "")
        )
    return lines


def describe(config: Config, world_size: int = 1, seq_len: int = 4096) -> str:
    """The text `hrm-mega info` prints (seq_len: the LM's tokens per row for its memory estimate)."""
    if config.model.family == "hrm_gemma":
        return describe_lm(config, world_size, seq_len)
    c = config.model
    counts = count_parameters(build_on_meta(c))
    flops = segment_flops(c)
    mem = memory_per_rank(config, world_size)
    gib = 1024**3
    lines = [
        f"model: {c.family}  hidden={c.hidden_size} heads={c.num_heads} layers H={c.h_layers} L={c.l_layers}"
        f"{' (shared net)' if c.shared_net else ''}  cycles N={c.h_cycles} T={c.l_cycles}  grad={c.grad_mode}",
        f"parameters (excluding the puzzle-embedding table): {counts['total']:,}",
    ]
    lines += [f"  {name:<22} {n:>14,}" for name, n in counts.items() if name not in ("total",)]
    lines += [
        f"FLOPs per sample per segment: forward {flops.forward_per_segment / 1e9:.3f} GFLOP, "
        f"train step {flops.train_per_segment / 1e9:.3f} GFLOP",
        f"FLOPs per token per segment: forward {flops.forward_per_segment / c.seq_len / 1e6:.2f} MFLOP",
        f"memory per rank (world={world_size}, tp={config.parallel.tp}, zero={config.parallel.zero_stage}, "
        f"{config.train.precision}, micro-batch from train.global_batch={config.train.global_batch}): "
        f"{mem.total / gib:.2f} GiB",
        f"  params {mem.params / gib:.3f}  grads {mem.grads / gib:.3f}  optimizer {mem.optimizer / gib:.3f}  "
        f"puzzle_emb {mem.puzzle_emb / gib:.3f}  activations ~{mem.activations / gib:.3f} GiB",
    ]
    return "\n".join(lines)
