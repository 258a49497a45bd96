"""Adaptive computation time (ACT) for the puzzle family: halting, exploration, Q targets, losses.

A training step is one segment for every row of the batch. Rows carry their own state across steps:

    state = refill(state, new_samples)          # halted rows take a new sample; their carry resets
    out = model(state.carry, state.batch)       # one segment
    halted, is_last = decide_halting(...)       # Q-head decision, max steps, exploration
    target = q_continue_target(...)             # bootstrap: one extra no-grad segment (HRM)
    loss, metrics = act_loss(out, ...)

Halting (training): a row halts at halt_max_steps, or when its Q-head says so (bootstrap: q_halt >
q_continue; halt_only: q_halt > 0; model.halt_threshold applies at inference only), unless exploration holds it: with probability p a minimum step count
is drawn from U{2..halt_max_steps}, redrawn every step as in HRM. Exploration draws are keyed by
(seed, sample id, epoch, step), not by rank or batch position, so a run is identical at any DP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hrm_mega.config import PuzzleModelConfig
from hrm_mega.models.keyed import keyed_uniform
from hrm_mega.models.puzzle import QValues, SegmentOutput
from hrm_mega.models.recurrence import Carry
from hrm_mega.models.vocab import IGNORE_LABEL, cross_entropy, gather_vocab

# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kind: str = "stablemax") -> torch.Tensor:
    """Per-token loss [b, seq]; 0 where labels == IGNORE_LABEL. Stablemax runs in fp64, as in HRM.
    Under tensor parallelism logits are this rank's vocabulary slice (models/vocab.py)."""
    return cross_entropy(logits, labels, kind)


# --------------------------------------------------------------------------------------------------
# ACT state
# --------------------------------------------------------------------------------------------------


@dataclass
class ACTState:
    carry: Carry
    steps: torch.Tensor  # [b] int64: segments run on the current sample
    halted: torch.Tensor  # [b] bool: the row needs a new sample before the next step
    batch: dict[str, torch.Tensor]  # the current sample of every row


def initial_state(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ACTState:
    """A state whose rows hold `batch`, at step 0, with fresh carries."""
    b = batch["inputs"].shape[0]
    device = batch["inputs"].device
    return ACTState(
        carry=model.initial_carry(b),
        steps=torch.zeros(b, dtype=torch.long, device=device),
        halted=torch.zeros(b, dtype=torch.bool, device=device),
        batch=dict(batch),
    )


def refill(model: torch.nn.Module, state: ACTState, new_rows: dict[str, torch.Tensor]) -> ACTState:
    """Puts one new sample into every halted row (in row order) and resets those rows' carry and steps."""
    rows = state.halted.nonzero().squeeze(-1)
    if rows.numel() == 0:
        return state
    n_new = next(iter(new_rows.values())).shape[0]
    if n_new != rows.numel():
        raise ValueError(f"refill got {n_new} samples for {rows.numel()} halted rows")
    batch = {}
    for key, current in state.batch.items():
        updated = current.clone()
        updated[rows] = new_rows[key].to(current.device, current.dtype)
        batch[key] = updated
    return ACTState(
        carry=model.reset_carry(state.carry, state.halted),
        steps=torch.where(state.halted, 0, state.steps),
        halted=torch.zeros_like(state.halted),
        batch=batch,
    )


def decide_halting(
    config: PuzzleModelConfig,
    out: SegmentOutput,
    steps: torch.Tensor,
    *,
    training: bool,
    seed: int = 0,
    sample_keys: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (halted, is_last) for the rows after a segment; `steps` counts this segment already.

    At evaluation only halt_max_steps ends a row (the papers' fixed-depth evaluation); adaptive
    evaluation uses `q_says_halt` directly. `sample_keys` (e.g. sample id and epoch) key exploration.
    """
    is_last = steps >= config.halt_max_steps
    if not training or config.halt_max_steps == 1:
        return is_last, is_last
    halted = is_last | q_says_halt(config, out, threshold=0.0)  # the threshold is an inference knob
    if config.halt_exploration_prob > 0:
        explore = (
            keyed_uniform(seed, *sample_keys, steps, torch.zeros_like(steps)) < config.halt_exploration_prob
        )
        u = keyed_uniform(seed, *sample_keys, steps, torch.ones_like(steps))
        min_steps = 2 + (u * (config.halt_max_steps - 1)).long()  # U{2..halt_max_steps}
        halted = halted & (steps >= torch.where(explore, min_steps, 0))
    return halted, is_last


def halt_logit(config: PuzzleModelConfig, out: SegmentOutput, threshold: float | None = None) -> torch.Tensor:
    """The logit of the halting decision after a segment, positive exactly where the rule halts:
    q_halt - q_continue (bootstrap) or q_halt (halt_only); with a threshold t (default
    model.halt_threshold), q_halt - logit(t), i.e. halt when sigmoid(q_halt) > t."""
    t = config.halt_threshold if threshold is None else threshold
    if t:
        return out.q_halt - math.log(t / (1 - t))
    return out.q_halt if config.q_target == "halt_only" else out.q_halt - out.q_continue


def q_says_halt(
    config: PuzzleModelConfig, out: SegmentOutput, threshold: float | None = None
) -> torch.Tensor:
    return halt_logit(config, out, threshold) > 0


def q_continue_target(next_out: QValues | SegmentOutput, is_last: torch.Tensor) -> torch.Tensor:
    """HRM's bootstrap target for q_continue: sigmoid of the next segment's best Q (its q_halt at the end)."""
    best_next = torch.where(is_last, next_out.q_halt, torch.maximum(next_out.q_halt, next_out.q_continue))
    return torch.sigmoid(best_next)


# --------------------------------------------------------------------------------------------------
# Loss and metrics
# --------------------------------------------------------------------------------------------------


def act_loss(
    config: PuzzleModelConfig,
    out: SegmentOutput,
    labels: torch.Tensor,
    halted: torch.Tensor,
    steps: torch.Tensor,
    q_continue_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over rows of: per-row-averaged token CE + 0.5 * (BCE(q_halt, correct) + BCE(q_cont, target)).
    With q_head = "cells" the halting term is each cell's BCE against whether that cell is right (an
    unlabelled cell counts as right), averaged over the row's cells: q_halt is their product.

    Metrics are sums over the rows that halted this step (divide by `count` to report them), the loss
    parts as batch means, and over every labelled row of the step how the halting rule decided:
    `unsolved_continue` of `unsolved` rows (wrong after this segment) were sent on, `solved_halt` of
    `solved` rows were stopped.
    """
    with torch.no_grad():
        valid = labels != IGNORE_LABEL
        n_valid = valid.sum(-1)
        correct = valid & (gather_vocab(out.logits).argmax(-1) == labels)
        seq_correct = correct.sum(-1) == n_valid
        counted = halted & (n_valid > 0)
        metrics = {
            "count": counted.sum(),
            "token_accuracy": torch.where(counted, correct.sum(-1) / n_valid.clamp_min(1), 0).sum(),
            "exact_accuracy": (counted & seq_correct).sum(),
            "q_halt_accuracy": (counted & ((out.q_halt >= 0) == seq_correct)).sum(),
            "segments": torch.where(counted, steps, 0).sum(),  # ACT segments of the counted rows
        }
        says_halt, labelled = q_says_halt(config, out, threshold=0.0), n_valid > 0
        metrics["unsolved"] = (labelled & ~seq_correct).sum()
        metrics["unsolved_continue"] = (labelled & ~seq_correct & ~says_halt).sum()
        metrics["solved"] = (labelled & seq_correct).sum()
        metrics["solved_halt"] = (labelled & seq_correct & says_halt).sum()
    b = labels.shape[0]
    lm_loss = (token_cross_entropy(out.logits, labels, config.loss).sum(-1) / n_valid.clamp_min(1)).sum() / b
    if out.cell_logits is not None:
        right = (correct | ~valid).float()
        per_cell = F.binary_cross_entropy_with_logits(out.cell_logits, right, reduction="none")
        q_halt_loss = per_cell.mean(-1).sum() / b
    else:
        q_halt_loss = F.binary_cross_entropy_with_logits(out.q_halt, seq_correct.float(), reduction="sum") / b
    loss = lm_loss + 0.5 * q_halt_loss
    metrics["lm_loss"], metrics["q_halt_loss"] = lm_loss.detach(), q_halt_loss.detach()
    if q_continue_target is not None:
        q_cont_loss = (
            F.binary_cross_entropy_with_logits(out.q_continue, q_continue_target, reduction="sum") / b
        )
        loss = loss + 0.5 * q_cont_loss
        metrics["q_continue_loss"] = q_cont_loss.detach()
    return loss, metrics


def step_segment(
    model: torch.nn.Module,
    config: PuzzleModelConfig,
    state: ACTState,
    *,
    training: bool,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], ACTState, SegmentOutput]:
    """One ACT segment for every row: forward, halting decision, Q target, loss. Returns the new state.

    `model` may be any callable with the RecursiveReasoner forward signature (e.g. a DeepSpeed engine).
    """
    out = model(state.carry, state.batch)
    steps = state.steps + 1
    keys = tuple(state.batch[k] for k in ("sample_id", "epoch") if k in state.batch)
    halted, is_last = decide_halting(config, out, steps, training=training, seed=seed, sample_keys=keys)
    target = None
    if training and config.q_target == "bootstrap" and config.halt_max_steps > 1:
        with torch.no_grad():
            target = q_continue_target(model(out.carry, state.batch, q_only=True), is_last)
    loss, metrics = act_loss(config, out, state.batch["labels"], halted, steps, target)
    return loss, metrics, replace(state, carry=out.carry, steps=steps, halted=halted), out
