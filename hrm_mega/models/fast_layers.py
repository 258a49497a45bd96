"""Flat attention blocks for cached no-grad forwards (KV-cached generation and RL rollouts).

A decoding step of HRMGemma is one token per row run through every layer N x T times: at batch 8 on a
CPU each operation touches a few kilobytes, so the step's cost is the number of operations and Python
calls, not arithmetic. A TransformerBlock as written for training makes about 120 of them per layer
call: eleven module calls (norms, projections, MLP), q/k/v and gate/up weights concatenated anew on
every call (`fused_linear`), six RMSNorms each with dtype round trips and its (1 + w) recomputed, the
rotary embedding applied to q and k apart, and K/V repeated for grouped-query attention.

`LayerPlan` is the same block as one function over weights prepared once per generation: the q/k/v and
gate/up weights concatenated, each norm's scale computed, the activations kept as [rows, hidden] so that
every projection is one `torch.mm` (the call F.linear makes), q and k normalised and rotated as one
tensor (the q and k heads side by side, each head with its own norm scale), each RMSNorm as the module's
forward (ATen's `_fused_rms_norm` on the CPU and CUDA), and, for the rows SDPA attends, masks turned
into its additive form once per forward rather than by SDPA in every layer call and grouped-query
attention left to it (`enable_gqa`) rather than copying K/V per query head. About 60 operations per
layer call, views included. Every one computes what the block's own operations compute, element for
element: the same reductions over the same rows, the same products in the same order, the same attention
kernel over the same keys (Attention.attend's choice: explicit on short CPU rows, SDPA otherwise), so
the logits and the samples drawn from them are bit-identical to the module path's
(tests/test_generate.py checks logits bit for bit, with halting, padding and windows). The module path
stays the reference, and the one that trains.

`fast_layers(model)` returns the plans for a model's eligible blocks: attention blocks with plain
bias-free linears on a single tensor-parallel rank (under TP the projections are megatron-core's
layers, which keep their own path), unquantized. `plans.active()` lets the blocks use them for the
duration of one forward, only where that forward runs without gradients, with a KV cache slot and an
explicit mask (TransformerBlock.forward checks; a mask left to flash-attn keeps the module path); the
weights are read when the plans are made, so make them when a generation starts. They hold a second
copy of the q/k/v and gate/up weights for as long as they live.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed
from hrm_mega.models import attention, layers


def _rms(x: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """layers.rms_norm's forward: fp32 normalisation over the last dim, then the fp32 scale; ATen's
    `_fused_rms_norm` on the CPU and CUDA (as the module), the same operations written out elsewhere."""
    x32 = x if x.dtype == torch.float32 else x.float()
    if layers.fuses_rms_norm(x):
        out = layers.FUSED_RMS_NORM(x32, [x.shape[-1]], scale, eps)[0]
    else:
        out = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        if scale is not None:
            out = out.mul_(scale)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _scale(norm: nn.Module) -> torch.Tensor | None:
    """An RMSNorm module's fp32 scale: (1 + w) for gemma weights, w for plain ones, None for none."""
    if norm.form == "none":
        return None
    weight = norm.weight.detach().float()
    return weight + 1.0 if norm.form == "gemma" else weight


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
        self.scales = [_scale(n) for n in block.norms]
        self.eps = [n.eps for n in block.norms]
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.scale
        # [in, out] views of the weights: F.linear's own matmul (input @ weight.t()), called directly on
        # [rows, in] activations
        with torch.no_grad():
            self.w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t()
            self.w_gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).t()
        self.w_o, self.w_down = a.o_proj.weight.detach().t(), m.down_proj.weight.detach().t()
        self.intermediate = m.gate_proj.out_features
        self.act = m.act
        self.qk_eps = a.q_norm.eps if a.q_norm is not None else 0.0
        self.qk_scale = None  # [heads + kv_heads, 1, head_dim]: each q head's scale, then each k head's
        if a.q_norm is not None:
            q, k = _scale(a.q_norm), _scale(a.k_norm)
            if q is not None and k is not None:
                rows = [q.expand(self.heads, -1), k.expand(self.kv_heads, -1)]
                self.qk_scale = torch.cat(rows).unsqueeze(1)
        self.qk_norm = a.q_norm is not None
        self.sdpa_masks = ForwardMasks()  # the active forward's (LayerPlans.active)

    def __call__(self, x: torch.Tensor, ctx: Any, kv_cache: Any) -> torch.Tensor:
        b, s, width = x.shape
        x = x.reshape(b * s, width)  # [rows, hidden]: every matmul is one mm, as F.linear's would be
        (s0, s1, *rest), (e0, e1, *_) = self.scales, self.eps
        if self.placement == "sandwich":
            s2, s3 = rest
            e2, e3 = self.eps[2:]
            x = x + _rms(self._attention(_rms(x, s0, e0), b, s, ctx, kv_cache), s1, e1)
            x = x + _rms(self._mlp(_rms(x, s2, e2)), s3, e3)
        elif self.placement == "pre":
            x = x + self._attention(_rms(x, s0, e0), b, s, ctx, kv_cache)
            x = x + self._mlp(_rms(x, s1, e1))
        else:
            x = _rms(x + self._attention(x, b, s, ctx, kv_cache), s0, e0)
            x = _rms(x + self._mlp(x), s1, e1)
        return x.view(b, s, width)

    def _attention(self, x: torch.Tensor, b: int, s: int, ctx: Any, kv_cache: Any) -> torch.Tensor:
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = torch.mm(x, self.w_qkv).view(b, s, h + 2 * kv, d).transpose(1, 2)  # [b, h + 2kv, s, d]
        qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
        fp32 = qk.dtype == torch.float32  # below fp32 the module path rounds after the norm and the rope
        if self.qk_norm:  # Attention's q_norm / k_norm: per head over d, then each head's scale
            qk = _rms(qk, self.qk_scale, self.qk_eps)
        rope = ctx.ropes.get(self.kind)
        if rope is not None:  # layers.apply_rope on q and k at once
            cos, sin = rope
            if cos.dim() == 3:  # per-row tables [b, s, d]
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            x = layers.rotate(qk, cos, sin)
            qk = x if fp32 else x.to(qkv.dtype)
        k, v = kv_cache.update(qk[:, h:], v)
        mask = ctx.masks.get(self.kind)
        if attention.takes_explicit_attention(k, mask is not None):  # Attention.attend's choice
            out = attention.explicit_attention(qk[:, :h], k, v, self.scale, mask)
        else:
            out = F.scaled_dot_product_attention(
                qk[:, :h],
                k,
                v,
                attn_mask=self.sdpa_masks.mask(mask, qk.dtype),
                scale=self.scale,
                enable_gqa=kv != h,
            )
        return torch.mm(out.transpose(1, 2).reshape(b * s, h * d), self.w_o)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.mm(x, self.w_gate_up)
        i = self.intermediate
        return torch.mm(self.act(gate_up[:, :i]).mul_(gate_up[:, i:]), self.w_down)


class ForwardMasks:
    """One forward's masks in the form every plan uses, made once per forward rather than once per layer
    call, and emptied when the plans stop being active: a boolean mask as the additive float mask
    (0 / -inf) that SDPA turns it into on every call."""

    def __init__(self) -> None:
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None or mask.dtype != torch.bool:
            return mask
        entry = self.masks.get(id(mask))
        if entry is None or entry[0] is not mask or entry[1].dtype != dtype:
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
            entry = self.masks[id(mask)] = (mask, additive)
        return entry[1]


class LayerPlans:
    """The plans of a model's eligible blocks (`fast_layers`)."""

    def __init__(self, plans: dict[nn.Module, LayerPlan]) -> None:
        self.plans = plans

    @contextmanager
    def active(self) -> Iterator[None]:
        """The blocks use their plans for cached no-grad forwards until the block exits."""
        masks = ForwardMasks()
        for block, plan in self.plans.items():  # a plain attribute: nn.Module.__setattr__'s checks skipped
            object.__setattr__(block, "decode_plan", plan)
            plan.sdpa_masks = masks
        try:
            yield
        finally:
            for block in self.plans:
                object.__setattr__(block, "decode_plan", None)


def fast_layers(model: nn.Module) -> LayerPlans:
    """Plans for every eligible TransformerBlock of `model` (none where none is eligible)."""
    from hrm_mega.models.block import TransformerBlock

    return LayerPlans(
        {m: LayerPlan(m) for m in model.modules() if isinstance(m, TransformerBlock) and eligible(m)}
    )
