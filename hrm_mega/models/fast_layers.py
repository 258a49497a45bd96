"""Flat attention blocks for cached no-grad forwards (KV-cached generation and RL rollouts).

A decoding step of HRMGemma is one token per row run through every layer N x T times: at batch 8 on a
CPU each operation touches a few kilobytes, so the step's cost is the number of operations and Python
calls, not arithmetic. A TransformerBlock as written for training makes about 120 of them per layer
call: eleven module calls (norms, projections, MLP), q/k/v and gate/up weights concatenated anew on
every call (`fused_linear`), six RMSNorms each with dtype round trips and its (1 + w) recomputed, the
rotary embedding applied to q and k apart, and K/V repeated for grouped-query attention.

`LayerPlan` is the same block as one function over weights prepared once per generation: the q/k/v
and gate/up weights concatenated, each norm's scale computed, q and k normalised and rotated as one
tensor (the q and k heads side by side, each head with its own norm scale), torch's fused
`F.rms_norm` for every norm, and grouped-query attention left to SDPA (`enable_gqa`) rather than
copying K/V per query head. About 35 operations per layer call. Every one computes what the block's
own operations compute, element for element: the same reductions over the same rows, the same
products in the same order, SDPA over the same keys, so the logits and the samples drawn from them
are bit-identical to the module path's (tests/test_generate.py checks logits bit for bit, with
halting, padding and windows). The module path stays the reference, and the one that trains.

`fast_layers(model)` returns the plans for a model's eligible blocks: attention blocks with plain
bias-free linears on a single tensor-parallel rank (under TP the projections are megatron-core's
layers, which keep their own path), unquantized. `plans.active()` lets the blocks use them for the
duration of one forward, only where that forward runs without gradients, with a KV cache slot and an
explicit mask (TransformerBlock.forward checks; a mask left to flash-attn keeps the module path); the weights are read when the plans are made, so make them when a
generation starts. They hold a second copy of the q/k/v and gate/up weights for as long as they live.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed


class _Norm:
    """An RMSNorm module's forward: fp32 normalisation, then its scale ((1 + w) for gemma weights)."""

    def __init__(self, norm: nn.Module) -> None:
        self.eps = norm.eps
        if norm.form == "none":
            self.scale = None
        else:
            weight = norm.weight.detach().float()
            self.scale = weight + 1.0 if norm.form == "gemma" else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.scale, self.eps)
        return torch.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


def _plain(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None and type(layer.weight) is nn.Parameter


def eligible(block: nn.Module) -> bool:
    """Whether a TransformerBlock has a plan: attention with plain linears, one TP rank."""
    from hrm_mega.models.attention import Attention
    from hrm_mega.models.layers import GatedMLP

    a, m = getattr(block, "mixer", None), getattr(block, "mlp", None)
    return (
        distributed.tp_size() == 1
        and not block.mixes_sequence
        and isinstance(a, Attention)
        and isinstance(m, GatedMLP)
        and all(_plain(p) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        and all(_plain(p) for p in (m.gate_proj, m.up_proj, m.down_proj))
        and (a.q_norm is None) == (a.k_norm is None)
        and (a.q_norm is None or a.q_norm.form == a.k_norm.form)
    )


class LayerPlan:
    """One TransformerBlock (attention + gated MLP) as a flat function; see the module docstring."""

    def __init__(self, block: nn.Module) -> None:
        a, m = block.mixer, block.mlp
        self.placement, self.kind = block.norm_placement, block.kind
        self.norms = [_Norm(n) for n in block.norms]
        self.scales = [n.scale for n in self.norms]
        self.dims = (block.mixer.q_proj.in_features,)
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.scale
        with torch.no_grad():
            self.w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            self.w_gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        self.w_o, self.w_down = a.o_proj.weight.detach(), m.down_proj.weight.detach()
        self.intermediate = m.gate_proj.out_features
        self.act = m.act
        self.qk_eps = a.q_norm.eps if a.q_norm is not None else 0.0
        self.qk_scale = None  # [heads + kv_heads, 1, head_dim]: each q head's scale, then each k head's
        if a.q_norm is not None:
            q, k = _Norm(a.q_norm).scale, _Norm(a.k_norm).scale
            if q is not None and k is not None:
                rows = [q.expand(self.heads, -1), k.expand(self.kv_heads, -1)]
                self.qk_scale = torch.cat(rows).unsqueeze(1)
        self.qk_norm = a.q_norm is not None
        self.ropes = RopeCache()  # the active forward's (LayerPlans.active)

    def __call__(self, x: torch.Tensor, ctx: Any, kv_cache: Any) -> torch.Tensor:
        n, ropes = self.norms, self.ropes
        if self.placement == "sandwich" and x.dtype == torch.float32:  # the norms inline: the common case
            (s0, s1, s2, s3), eps, dims = self.scales, n[0].eps, self.dims
            x = x + torch.rms_norm(
                self._attention(torch.rms_norm(x, dims, s0, eps), ctx, kv_cache, ropes), dims, s1, eps
            )
            return x + torch.rms_norm(self._mlp(torch.rms_norm(x, dims, s2, eps)), dims, s3, eps)
        if self.placement == "sandwich":
            x = x + n[1](self._attention(n[0](x), ctx, kv_cache, ropes))
            return x + n[3](self._mlp(n[2](x)))
        if self.placement == "pre":
            x = x + self._attention(n[0](x), ctx, kv_cache, ropes)
            return x + self._mlp(n[1](x))
        x = n[0](x + self._attention(x, ctx, kv_cache, ropes))
        return n[1](x + self._mlp(x))

    def _attention(self, x: torch.Tensor, ctx: Any, kv_cache: Any, ropes: RopeCache) -> torch.Tensor:
        b, s, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = F.linear(x, self.w_qkv).view(b, s, h + 2 * kv, d).transpose(1, 2)  # [b, h + 2kv, s, d]
        qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
        fp32 = qk.dtype == torch.float32  # below fp32 the module path rounds after the norm and the rope
        if self.qk_norm:  # Attention's q_norm / k_norm: per head over d, then each head's scale
            normed = torch.rms_norm(qk if fp32 else qk.float(), (d,), None, self.qk_eps)
            if self.qk_scale is not None:
                normed = normed * self.qk_scale
            qk = normed if fp32 else normed.to(qkv.dtype)
        rope = ctx.ropes.get(self.kind)
        if rope is not None:  # layers.apply_rope on q and k at once
            cos, sin = ropes.get(rope)
            x = qk if fp32 else qk.float()
            x = x * cos + x.roll(d // 2, -1) * sin
            qk = x if fp32 else x.to(qkv.dtype)
        q, k = qk[:, :h], qk[:, h:]
        k, v = kv_cache.update(k, v)
        mask = ctx.masks.get(self.kind)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=kv != h)
        return F.linear(out.transpose(1, 2).reshape(b, s, h * d), self.w_o)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.w_gate_up)
        i = self.intermediate
        return F.linear(self.act(gate_up[..., :i]) * gate_up[..., i:], self.w_down)


class RopeCache:
    """One forward's rotary tables in the form every plan uses: cos and sin [b, 1, s, d] (or [s, d]), sin
    with the first half negated, so that rotate_half(x) * sin = roll(x, d/2) * sin' (a sign flip is
    exact). Made once per table, not once per layer; emptied when the plans stop being active."""

    def __init__(self) -> None:
        self.tables: dict[int, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]] = {}

    def get(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.tables.get(id(rope))
        if entry is None or entry[0] is not rope:  # (the tuple is kept, so its id is not reused)
            cos, sin = rope
            if cos.dim() == 3:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            entry = self.tables[id(rope)] = (rope, cos, sin)
        return entry[1], entry[2]


class LayerPlans:
    """The plans of a model's eligible blocks (`fast_layers`)."""

    def __init__(self, plans: dict[nn.Module, LayerPlan]) -> None:
        self.plans = plans

    @contextmanager
    def active(self) -> Iterator[None]:
        """The blocks use their plans for cached no-grad forwards until the block exits."""
        ropes = RopeCache()
        for block, plan in self.plans.items():
            block.decode_plan, plan.ropes = plan, ropes
        try:
            yield
        finally:
            for block in self.plans:
                block.decode_plan = None


def fast_layers(model: nn.Module) -> LayerPlans:
    """Plans for every eligible TransformerBlock of `model` (none where none is eligible)."""
    from hrm_mega.models.block import TransformerBlock

    return LayerPlans(
        {m: LayerPlan(m) for m in model.modules() if isinstance(m, TransformerBlock) and eligible(m)}
    )
