"""RecursiveReasoner: the HRM-ACT-v1 and TRM puzzle models.

One forward call is one ACT segment:

    x   = sqrt(h) * [puzzle_emb_prefix ; embed(tokens)]        (+ learned positions, if configured)
    z_H, carry = CycleBlock(x, carry, cycles=N)                # N x T recurrent updates (N = h_cycles)
    logits = lm_head(z_H)[:, prefix:]                          # answer tokens
    q_halt, q_continue = q_head(z_H[:, 0])                     # halting Q-values, read at position 0
    or, with q_head = "cells":
    c_i = cell_head(z_H[:, prefix + i])                         # logit P(cell i is right), no gradient
    q_halt = logit(prod_i sigmoid(c_i))                         #   into z_H; trained per cell (act_loss)

The ACT loop that calls it segment after segment (halting, refills, Q targets) lives in
hrm_mega.models.act. The puzzle-embedding table is a buffer, not a parameter: it is trained by sparse
sign-SGD outside the main optimizer, so ZeRO never shards it. A training step passes the batch's rows
of it in `batch["puzzle_emb"]` (a leaf tensor with requires_grad) to collect their gradients. With
puzzle_emb_ndim = 0 there is no table (`puzzle_emb` is None and absent from the state dict, as in HRM);
a prefix of puzzle_emb_len > 0 positions then starts at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega.config.model import PuzzleModelConfig, swiglu_intermediate
from hrm_mega.models.block import BlockStack, SeqContext, attention_block, sequence_mlp_block
from hrm_mega.models.layers import (
    RotaryEmbedding,
    column_linear,
    init_parameters,
    lecun_init,
    set_init,
)
from hrm_mega.models.recurrence import Carry, CycleBlock
from hrm_mega.models.vocab import vocab_embedding


@dataclass
class SegmentOutput:
    carry: Carry  # detached, for the next segment
    logits: torch.Tensor  # [batch, seq_len, vocab] (this rank's vocabulary slice under TP)
    q_halt: torch.Tensor  # [batch], fp32
    q_continue: torch.Tensor  # [batch], fp32 (zeros with q_head = "cells")
    cell_logits: torch.Tensor | None = None  # [batch, seq_len], fp32: q_head = "cells" only


@dataclass
class QValues:
    """The halting Q-values of a segment alone (`forward(..., q_only=True)`)."""

    q_halt: torch.Tensor  # [batch], fp32
    q_continue: torch.Tensor  # [batch], fp32


class RecursiveReasoner(nn.Module):
    def __init__(self, config: PuzzleModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.prefix_len = c.prefix_len
        self.total_len = c.seq_len + self.prefix_len
        self.embed_scale = math.sqrt(c.hidden_size)

        self.embed_tokens = vocab_embedding(c.vocab_size, c.hidden_size)
        set_init(self.embed_tokens.weight, "trunc_normal", 1.0 / self.embed_scale)
        table = torch.zeros(c.num_puzzle_identifiers, c.puzzle_emb_ndim) if c.puzzle_emb_ndim else None
        self.register_buffer("puzzle_emb", table)
        if c.pos_encoding == "learned":
            self.embed_pos = nn.Parameter(torch.empty(self.total_len, c.hidden_size))
            set_init(self.embed_pos, "trunc_normal", 1.0 / self.embed_scale)
        self.rotary = (
            RotaryEmbedding(c.head_dim, self.total_len, c.rope_theta) if c.pos_encoding == "rope" else None
        )

        L = BlockStack([self._block() for _ in range(c.l_layers)])
        H = None if c.shared_net else BlockStack([self._block() for _ in range(c.h_layers)])
        self.cycle = CycleBlock(
            L, H, hidden_size=c.hidden_size, l_cycles=c.l_cycles, grad_mode=c.grad_mode,
            injection=c.injection,
        )  # fmt: skip
        self.register_buffer("H_init", set_init(torch.empty(c.hidden_size), "trunc_normal", 1.0))
        self.register_buffer("L_init", set_init(torch.empty(c.hidden_size), "trunc_normal", 1.0))

        self.lm_head = column_linear(c.hidden_size, c.vocab_size)  # vocab-parallel logits under TP
        if c.q_head == "cells":
            # Whether a cell is right is not linear in z_H (a linear probe finds nothing; docs/configs.md),
            # hence a small MLP. It starts at P = 1/2 per cell, so no row halts before it has learned.
            h = c.hidden_size
            self.cell_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
            lecun_init(self.cell_head[0].weight, h)
            for p in (self.cell_head[0].bias, self.cell_head[2].weight, self.cell_head[2].bias):
                set_init(p, "constant", 0.0)
        else:
            self.q_head = nn.Linear(c.hidden_size, 2)
            set_init(self.q_head.weight, "constant", 0.0)  # Q starts near zero: sigmoid(-5) ~ 0.007
            set_init(self.q_head.bias, "constant", -5.0)

    def _block(self) -> nn.Module:
        c = self.config
        inter = swiglu_intermediate(c.hidden_size, c.expansion)
        if c.token_mixer == "mlp":
            seq_inter = swiglu_intermediate(self.total_len, c.expansion)
            return sequence_mlp_block(c.hidden_size, self.total_len, seq_inter, inter, eps=c.rms_norm_eps)
        return attention_block(
            c.hidden_size, c.num_heads, inter, norm_placement="post", norm_weight="none", eps=c.rms_norm_eps
        )

    def init_weights(self, seed: int) -> RecursiveReasoner:
        init_parameters(self, seed)
        return self

    # ---------------------------------------------------------------------------------------------

    def initial_carry(self, batch_size: int) -> Carry:
        shape = (batch_size, self.total_len, self.config.hidden_size)
        return Carry(self.H_init.expand(shape).clone(), self.L_init.expand(shape).clone())

    def reset_carry(self, carry: Carry, reset: torch.Tensor) -> Carry:
        """Rows where `reset` is True start again from H_init / L_init."""
        r = reset.view(-1, 1, 1)
        return Carry(torch.where(r, self.H_init, carry.z_H), torch.where(r, self.L_init, carry.z_L))

    def embed(self, inputs: torch.Tensor, puzzle_emb: torch.Tensor | None) -> torch.Tensor:
        """inputs: [b, seq_len] token ids; puzzle_emb: [b, puzzle_emb_ndim] or None (no table)
        -> x: [b, prefix+seq_len, h]."""
        c = self.config
        x = self.embed_tokens(inputs)
        if self.prefix_len:
            if puzzle_emb is None:
                puzzle_emb = x.new_zeros(x.shape[0], 0)
            pad = self.prefix_len * c.hidden_size - puzzle_emb.shape[-1]
            prefix = F.pad(puzzle_emb.to(x.dtype), (0, pad)).view(-1, self.prefix_len, c.hidden_size)
            x = torch.cat((prefix, x), dim=1)
        if c.pos_encoding == "learned":
            x = (x + self.embed_pos.to(x.dtype)) / math.sqrt(2)  # keep the variance of the sum at 1
        return self.embed_scale * x

    def forward(
        self, carry: Carry, batch: dict[str, torch.Tensor], q_only: bool = False
    ) -> SegmentOutput | QValues:
        """One segment. batch: inputs [b, seq_len], puzzle_identifiers [b], optional puzzle_emb rows.

        q_only: the Q-values alone (HRM's bootstrap look-ahead needs nothing else). Where the Q head reads
        position 0 only (attention blocks, q_head "first"), the last layer of the last H update then computes
        that position alone: about 1% of a training step."""
        puzzle_emb = batch.get("puzzle_emb")
        if puzzle_emb is None and self.puzzle_emb is not None:
            puzzle_emb = self.puzzle_emb[batch["puzzle_identifiers"]]
        x = self.embed(batch["inputs"], puzzle_emb)
        carry = Carry(
            carry.z_H.to(x.dtype), carry.z_L.to(x.dtype)
        )  # compute in the weights' dtype (bf16 runs)
        ctx = SeqContext(ropes={"global": self.rotary() if self.rotary is not None else None})
        first_only = q_only and self.config.q_head != "cells" and self.config.token_mixer != "mlp"
        z_H, new_carry = self.cycle(
            x, carry, ctx, cycles=self.config.h_cycles, positions=slice(0, 1) if first_only else None
        )
        if first_only:
            q = self.q_head(z_H[:, 0]).float()
            return QValues(q[:, 0], q[:, 1])
        logits = self.lm_head(z_H)[:, self.prefix_len :]
        if self.config.q_head == "cells":
            cells = self.cell_head(z_H[:, self.prefix_len :].detach()).squeeze(-1).float()
            log_p = F.logsigmoid(cells).sum(-1)  # log P(every cell is right)
            q_halt = log_p - torch.log((-torch.expm1(log_p)).clamp_min(1e-30))  # its logit, stably
            out = SegmentOutput(new_carry, logits, q_halt, torch.zeros_like(q_halt), cells)
        else:
            q = self.q_head(z_H[:, 0]).float()
            out = SegmentOutput(new_carry, logits, q[:, 0], q[:, 1])
        return QValues(out.q_halt, out.q_continue) if q_only else out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, per top-level module; buffers (e.g. the puzzle-embedding table) apart."""
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            counts[name] = n
    if isinstance(model, RecursiveReasoner) and model.puzzle_emb is not None:
        counts["puzzle_emb (buffer)"] = model.puzzle_emb.numel()
    return counts
