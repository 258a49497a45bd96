"""Transformer block with post, pre or sandwich norm placement, and a stack of blocks.

- post (HRM): h = norm(h + attn(h)); h = norm(h + mlp(h))
- pre: h = h + attn(norm(h)); h = h + mlp(norm(h))
- sandwich (Gemma 3): h = h + norm(attn(norm(h))); h = h + norm(mlp(norm(h)))

The token mixer is attention, or TRM's "mlp_t": a gated MLP applied across the sequence axis, which
in post-norm form is normalised over that axis too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hrm_mega.models.attention import Attention, DocumentRuns, KVCacheSlot
from hrm_mega.models.layers import GatedMLP, RMSNorm


@dataclass
class SeqContext:
    """Per-forward tensors shared by all blocks: RoPE tables and masks, keyed by attention kind."""

    ropes: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    masks: dict[str, torch.Tensor | DocumentRuns | None] = field(default_factory=dict)


class TransformerBlock(nn.Module):
    decode_plan: Any = None  # a fast_layers.LayerPlan while fast_layers(...).active() runs

    def __init__(
        self,
        mixer: nn.Module,
        mlp: nn.Module,
        hidden_size: int,
        *,
        norm_placement: str = "post",
        norm_weight: str = "none",
        eps: float = 1e-5,
        kind: str = "global",
        mixes_sequence: bool = False,
    ) -> None:
        super().__init__()
        if norm_placement not in ("post", "pre", "sandwich"):
            raise ValueError(f"norm_placement={norm_placement!r} must be post, pre or sandwich")
        self.norm_placement, self.kind, self.mixes_sequence = norm_placement, kind, mixes_sequence
        self.mixer, self.mlp = mixer, mlp
        mixer_dim = hidden_size if not mixes_sequence else None
        n_norms = {"post": 2, "pre": 2, "sandwich": 4}[norm_placement]
        dims = [mixer_dim, hidden_size, hidden_size, hidden_size][:n_norms]
        self.norms = nn.ModuleList(RMSNorm(d or 1, eps, norm_weight if d else "none") for d in dims)

    def _mix(
        self, x: torch.Tensor, ctx: SeqContext, kv_cache: KVCacheSlot | None, positions: slice | None
    ) -> torch.Tensor:
        if self.mixes_sequence:
            return self.mixer(x.transpose(1, 2)).transpose(1, 2)
        rope, mask = ctx.ropes.get(self.kind), ctx.masks.get(self.kind)
        if positions is None:
            return self.mixer(x, rope, mask, kv_cache=kv_cache)
        return self.mixer(x, rope, mask, kv_cache=kv_cache, positions=positions)

    def forward(
        self,
        x: torch.Tensor,
        ctx: SeqContext,
        kv_cache: KVCacheSlot | None = None,
        positions: slice | None = None,
    ) -> torch.Tensor:
        """kv_cache (attention blocks only): keys/values of earlier positions, see attention.KVCacheSlot.
        positions (attention blocks only): the output at these positions alone, e.g. the one a head reads;
        attention still takes its keys and values from every position."""
        if (kv_cache is not None or positions is not None) and self.mixes_sequence:
            raise ValueError(
                "a sequence-MLP block mixes whole sequences: no KV cache, no subset of positions"
            )
        # cached generation: the same block as one flat function (fast_layers.py), where the mask is
        # explicit (without one, flash-attn applies it)
        plan = self.decode_plan if kv_cache is not None and not torch.is_grad_enabled() else None
        if plan is not None and isinstance(ctx.masks.get(self.kind), torch.Tensor):
            return plan(x, ctx, kv_cache)
        n = self.norms
        residual = x if positions is None else x[:, positions]
        if self.norm_placement == "post":
            if self.mixes_sequence:  # TRM mlp_t: residual and norm along the sequence axis
                xt = x.transpose(1, 2)
                x = n[0](add_residual(self.mixer(xt), xt)).transpose(1, 2)
            else:
                x = n[0](add_residual(self._mix(x, ctx, kv_cache, positions), residual))
            return n[1](add_residual(self.mlp(x), x))
        if self.norm_placement == "pre":
            x = add_residual(self._mix(n[0](x), ctx, kv_cache, positions), residual)
            return add_residual(self.mlp(n[1](x)), x)
        x = add_residual(n[1](self._mix(n[0](x), ctx, kv_cache, positions)), residual)
        return add_residual(n[3](self.mlp(n[2](x))), x)


def add_residual(out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + out, written over out when that changes nothing: the two share shape, dtype and
    layout (the plain sum takes the residual's layout, and a norm over a transposed one rounds
    differently), and autograd is off or out is a tensor of its own (not a view, such as a custom
    Function's returned input) that its maker did not save (linears and norms save their inputs).
    Equal bit for bit to the sum. On the CPU each fresh activation-sized tensor costs page faults: with
    this, GatedMLP's in-place activation and the in-place score scaling, the paper-scale sudoku HRM's
    fp32 step went from 4512 to 4219 ms (mean of six, bench/official_hrm_mfu.py) and its minor page
    faults from ~90K to ~12K per step."""
    same = out.shape == residual.shape and out.stride() == residual.stride() and out.dtype == residual.dtype
    if same and (out._base is None or not torch.is_grad_enabled()):
        return out.add_(residual)
    return residual + out


class BlockStack(nn.Module):
    """A sequence of blocks; `forward(h, injection)` runs them on h + injection (HRM's input injection)."""

    def __init__(self, blocks: list[TransformerBlock]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(
        self,
        hidden: torch.Tensor,
        injection: torch.Tensor | None,
        ctx: SeqContext,
        positions: slice | None = None,
    ) -> torch.Tensor:
        """positions: the last block computes its output at these positions only (TransformerBlock)."""
        if injection is not None:
            hidden = hidden + injection
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = (
                layer(hidden, ctx)
                if positions is None or i < last
                else layer(hidden, ctx, positions=positions)
            )
        return hidden


def attention_block(
    hidden_size: int,
    num_heads: int,
    intermediate: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    norm_placement: str = "post",
    norm_weight: str = "none",
    eps: float = 1e-5,
    causal: bool = False,
    window: int | None = None,
    qk_norm: bool = False,
    scale: float | None = None,
    activation: str = "silu",
    kind: str = "global",
) -> TransformerBlock:
    head_dim = head_dim or hidden_size // num_heads
    attn = Attention(
        hidden_size, num_heads, num_kv_heads or num_heads, head_dim, causal=causal, window=window,
        qk_norm=qk_norm, scale=scale, norm_eps=eps, norm_weight=norm_weight,
    )  # fmt: skip
    mlp = GatedMLP(hidden_size, intermediate, activation)
    return TransformerBlock(
        attn, mlp, hidden_size, norm_placement=norm_placement, norm_weight=norm_weight, eps=eps, kind=kind
    )


def sequence_mlp_block(
    hidden_size: int, seq_len: int, seq_intermediate: int, intermediate: int, *, eps: float = 1e-5
) -> TransformerBlock:
    """TRM's attention-free block: a SwiGLU across the sequence axis, then one across features."""
    return TransformerBlock(
        GatedMLP(seq_len, seq_intermediate), GatedMLP(hidden_size, intermediate), hidden_size,
        norm_placement="post", norm_weight="none", eps=eps, mixes_sequence=True,
    )  # fmt: skip
