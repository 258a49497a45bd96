"""Multi-head attention: bidirectional or causal, global or sliding-window, GQA, optional QK-norm.

Backends: flash-attn when it is importable, the tensors are on a GPU in fp16/bf16 and no custom mask
is needed; otherwise torch's scaled_dot_product_attention with an explicit boolean mask. Both compute
the same function, so the choice never changes results beyond kernel rounding.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed
from hrm_mega.models.layers import RMSNorm, apply_rope, column_linear, fused_linear, row_linear


@functools.cache
def flash_attn_func():  # -> Callable | None
    """flash-attn's kernel when it is installed and a GPU is present; None otherwise."""
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_func as kernel  # optional extra: pip install hrm-mega[gpu]
    except ImportError:
        return None
    return kernel


def attention_mask(
    q_len: int, k_len: int, *, causal: bool, window: int | None, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean [q_len, k_len] mask (True = may attend), or None when every pair may attend.

    Queries are the last q_len positions of the k_len keys (the KV-cache convention). A window of w
    lets a query see keys at distance < w: behind it when causal, on both sides otherwise.
    """
    if not causal and window is None:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos).abs() < window
    return allowed


class KVCacheSlot(Protocol):
    """Keys and values of earlier positions for one attention call site (e.g. one layer at one cycle step).

    `update` takes the new positions' k, v [b, kv, q_len, d], remembers them, and returns the keys and
    values to attend to: the cached earlier positions followed by the new ones, [b, kv, k_len, d]. The
    caller's mask must then follow the KV-cache convention (queries are the last q_len keys)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    """softmax(q k^T * scale) v over num_heads query heads sharing num_kv_heads key/value heads."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        causal: bool = False,
        window: int | None = None,
        qk_norm: bool = False,
        scale: float | None = None,
        norm_eps: float = 1e-6,
        norm_weight: str = "gemma",
    ) -> None:
        super().__init__()
        tp = distributed.tp_size()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
        if num_heads % tp or num_kv_heads % tp:
            raise ValueError(
                f"parallel.tp={tp} must divide num_heads={num_heads} and num_kv_heads={num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads = num_heads // tp, num_kv_heads // tp  # this rank's share
        self.head_dim, self.causal, self.window = head_dim, causal, window
        self.scale = scale if scale is not None else head_dim**-0.5
        self.q_proj = column_linear(hidden_size, num_heads * head_dim)
        self.k_proj = column_linear(hidden_size, num_kv_heads * head_dim)
        self.v_proj = column_linear(hidden_size, num_kv_heads * head_dim)
        self.o_proj = row_linear(num_heads * head_dim, hidden_size)
        # one weight for all heads, which TP splits: gradients add up over the TP group
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_weight, shared_across_tp=True) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_weight, shared_across_tp=True) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCacheSlot | None = None,
    ) -> torch.Tensor:
        """x: [batch, seq, hidden]; rope: (cos, sin) for the seq positions; mask: overrides the default;
        kv_cache: earlier positions' keys/values to attend to as well (and to extend with this call's)."""
        b, s, _ = x.shape
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [b, h, s, d]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [b, kv, s, d]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # [b, kv, k_len, d]: cached positions, then these
        out = self.attend(q, k, v, mask)  # [b, h, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [b, h, q_len, d]; k, v: [b, kv, k_len, d] -> [b, h, q_len, d]."""
        kernel = flash_attn_func()
        if kernel is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            window = (
                (-1, -1) if self.window is None else (self.window - 1, -1 if self.causal else self.window - 1)
            )
            out = kernel(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                softmax_scale=self.scale, causal=self.causal, window_size=window,
            )  # fmt: skip
            return out.transpose(1, 2)
        if mask is None:
            mask = attention_mask(
                q.shape[2], k.shape[2], causal=self.causal, window=self.window, device=q.device
            )
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
