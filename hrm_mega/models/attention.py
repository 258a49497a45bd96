"""Multi-head attention: bidirectional or causal, global or sliding-window, GQA, optional QK-norm.

Backends: flash-attn when it is importable, the tensors are on a GPU in fp16/bf16 and no custom mask
is needed; on the CPU, rows of up to EXPLICIT_MAX_KEYS keys as two batched matmuls and a softmax
(`explicit_attention`; unmasked rows without autograd excepted, see `takes_explicit_attention`);
otherwise torch's scaled_dot_product_attention with an explicit boolean mask.
Packed rows (several documents per row) take another form: `DocumentRuns`, which attends within each
document separately, so no [seq, seq] mask is built and no score across documents is computed (see
its docstring). All compute the same function, so the choice never changes results beyond kernel rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed
from hrm_mega.models.layers import RMSNorm, apply_rope, column_linear, fused_linear, row_linear


@functools.cache
def _flash_kernel(name: str):  # -> Callable | None
    """flash-attn's kernel `name` when flash-attn is installed and a GPU is present; None otherwise."""
    if not torch.cuda.is_available():
        return None
    try:
        import flash_attn  # optional extra: pip install hrm-mega[gpu]
    except ImportError:
        return None
    return getattr(flash_attn, name)


def flash_attn_func():  # -> Callable | None
    """flash-attn's fixed-length kernel, or None (see _flash_kernel)."""
    return _flash_kernel("flash_attn_func")


def flash_attn_varlen_func():  # -> Callable | None
    """flash-attn's variable-length kernel (packed documents), or None (see _flash_kernel)."""
    return _flash_kernel("flash_attn_varlen_func")


def flash_window(window: int | None, causal: bool) -> tuple[int, int]:
    """Our window (keys at distance < window) as flash-attn's (left, right) window_size."""
    if window is None:
        return (-1, -1)
    return (window - 1, -1 if causal else window - 1)


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


# Rows of at most this many keys take explicit_attention on the CPU. Measured on a 2-core AVX-512 CPU
# in the paper-scale sudoku HRM's training step (82 keys): bf16 eager 4262 -> 3946 ms; compiled, the
# throughput against the official HRM (bench/official_hrm_mfu.py) 1.03x -> 1.13x in bf16 and
# 1.04x -> 1.04-1.08x in fp32 (inductor turns most of it back into SDPA); fp32 eager unchanged.
# Alone, forward+backward in fp32: [16, 8, 128, 64] 21.8 ms (SDPA) against 20.3; [8, 8, 256, 64] 31.7
# against 27.7 but causal 32.1 against 33.2, and at 512 keys SDPA's flash kernel is ahead by 1.5-2.3x.
# Without autograd, unmasked rows go to SDPA: on a 2-core AMX Xeon the sudoku HRM's no-grad segment
# (the bootstrap look-ahead) took 1648 ms against 1693 in fp32 eager, 1542 against 1570 compiled and
# 619 against 700 in bf16 eager; with autograd the explicit form stays ahead in bf16 (36.7 ms against
# 64.5 for one attention layer's forward and backward at [32, 8, 82, 64]).
EXPLICIT_MAX_KEYS = 128


def takes_explicit_attention(k: torch.Tensor, masked: bool) -> bool:
    """Whether attention over keys k ([b, kv, k_len, d]) runs as explicit_attention: on the CPU, for
    rows of at most EXPLICIT_MAX_KEYS keys, unless the rows are unmasked (every query sees every key)
    and autograd is off. There SDPA's flash kernel is faster: it reads q, k and v in place, where the
    batched matmuls copy them, and the explicit form's edge is in the backward. Every caller asks
    here, so all choose alike."""
    if k.device.type != "cpu" or k.shape[2] > EXPLICIT_MAX_KEYS:
        return False
    return masked or torch.is_grad_enabled()


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the scores written out: two batched matmuls and a softmax. For
    short rows on the CPU this beats SDPA's flash kernel, whose key tiling and online softmax pay off
    only on long rows. q: [b, h, q_len, d]; k, v: [b, kv, k_len, d]; mask: bool (True = may attend)
    broadcastable to [b, h, q_len, k_len]. The softmax runs in fp32; a row with no key gives zeros, as
    SDPA does."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # query heads [g * group, (g + 1) * group) share kv head g
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # [b, h, q_len, k_len] in q's dtype (as transformers' eager); scaled in place, the product being
    # a fresh tensor that autograd does not keep: one activation-sized allocation fewer
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None:  # a row with no key came out uniform: zero it
        probs = probs.masked_fill(~mask, 0.0)
    return probs.to(v.dtype) @ v


@dataclass(frozen=True)
class DocumentRuns:
    """Attention of packed rows, one document at a time: the mask of a training row that holds several
    documents, without the [seq, seq] tensor.

    A document only attends to itself, so the row's attention is that of each document alone. The
    documents of the batch are grouped by length; each group is gathered into [n, heads, L, d] and runs
    as one causal attention call (with a [n, 1, L, L] mask only where a sliding window cuts the document
    or an image's tokens see each other both ways), and the outputs are put back in place. Memory and
    work grow with the sum of squared document lengths instead of batch x seq^2.

    A sliding window (without images) takes a banded form instead of the groups: the flattened
    positions are cut into chunks of c queries (`band_chunk`: half the window), each chunk attending to
    its own and the m - 1 previous chunks' keys (m*c, a strided view of the keys, no copy) under a
    [chunks, 1, c, m*c] mask of same document, causal and within the window. Scores, mask and saved
    tensors grow with batch x seq x window, not with the squared document lengths; no gather either.

    On a GPU in fp16/bf16 with flash-attn installed, rows without images run flash-attn's
    variable-length kernel over the same documents instead (cu_seqlens, with the window).

    groups: (index [n, L] into the flattened batch x seq positions, mask [n or 1, 1, L, L] or None for
    plain causal attention) per document length; inverse: the permutation that puts the concatenated
    group outputs back in batch x seq order; cu_seqlens [docs + 1] int32: document boundaries in the
    flattened positions; max_length: the longest document; window: as `attention_mask`; images: whether
    any document holds an image (a mask flash-attn cannot express); band: the banded form's mask
    [chunks, 1, c, m*c] when it replaces the groups (which are then empty), else None.
    """

    groups: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    window: int | None
    images: bool
    band: torch.Tensor | None = None

    @staticmethod
    def build(
        doc_starts: torch.Tensor, *, window: int | None, image_ids: torch.Tensor | None = None
    ) -> DocumentRuns:
        """doc_starts [b, s] (True where a document begins); window as `attention_mask`; image_ids [b, s]
        (>= 0 on an image's tokens, the image's index in the row; -1 elsewhere) for Gemma 3's image spans."""
        b, s = doc_starts.shape
        starts = doc_starts.clone()
        starts[:, 0] = True
        flat_starts = starts.flatten().nonzero().squeeze(1)  # [docs]: flat start position
        # every row begins a document, so the next start also ends a row's last document
        lengths = torch.diff(flat_starts, append=flat_starts.new_tensor([b * s]))
        cu_seqlens = torch.cat((flat_starts, flat_starts.new_tensor([b * s]))).int()
        max_length = int(lengths.max())
        if window is not None and (image_ids is None or not bool((image_ids >= 0).any())):
            empty = torch.zeros(0, dtype=torch.long, device=starts.device)
            band = _band_mask(starts.flatten(), window)
            return DocumentRuns((), empty, cu_seqlens, max_length, window, False, band)
        groups, order, images = [], [], False
        for length in lengths.unique().tolist():
            first = flat_starts[lengths == length]
            index = first[:, None] + torch.arange(length, device=first.device)  # [n, L]
            mask = attention_mask(length, length, causal=True, window=window, device=index.device)
            cut = window is not None and length > window
            if image_ids is not None:
                img = image_ids.flatten()[index]  # [n, L]
                if bool((img >= 0).any()):
                    both_ways = (img[:, :, None] == img[:, None, :]) & (img >= 0)[:, :, None]
                    if window is not None:  # keys at most window-1 back; later keys of the image stay
                        pos = torch.arange(length, device=index.device)
                        both_ways = both_ways & (pos[None, :] > pos[:, None] - window)
                    groups.append((index, (mask | both_ways).unsqueeze(1)))
                    order.append(index.flatten())
                    images = True
                    continue
            groups.append((index, mask[None, None] if cut else None))
            order.append(index.flatten())
        inverse = torch.cat(order).argsort()
        return DocumentRuns(tuple(groups), inverse, cu_seqlens, max_length, window, images)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [b, h, s, d]; k, v: [b, kv, s, d] -> [b, h, s, d]."""
        b, h, s, d = q.shape
        kernel = flash_attn_varlen_func()
        if (
            kernel is not None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and not self.images
        ):
            q, k, v = (t.transpose(1, 2).reshape(b * s, -1, d) for t in (q, k, v))  # [b*s, heads, d]
            out = kernel(
                q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_length, self.max_length,
                softmax_scale=scale, causal=True, window_size=flash_window(self.window, causal=True),
            )  # fmt: skip
            return out.view(b, s, h, d).transpose(1, 2)
        kv = k.shape[1]  # grouped-query attention: SDPA lets each kv head serve h / kv query heads
        flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]  # [b*s, heads, d]
        if self.band is not None:
            return self._attend_band(*flat, scale).view(b, s, h, d).transpose(1, 2)
        outs = []
        for index, mask in self.groups:
            qg, kg, vg = (t[index].transpose(1, 2) for t in flat)  # [n, heads, L, d]
            out = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=kv != h
            )
            outs.append(out.transpose(1, 2).reshape(-1, h, d))  # [n*L, h, d]
        out = torch.cat(outs)[self.inverse]  # [b*s, h, d] in batch order
        return out.view(b, s, h, d).transpose(1, 2)

    def _attend_band(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """The banded form: q [n, h, d], k, v [n, kv, d] over the flattened positions -> [n, h, d]."""
        n, h, d = q.shape
        chunks, _, c, span = self.band.shape  # c queries per chunk, span = c * m keys
        tail = chunks * c - n
        qc = F.pad(q, (0, 0, 0, 0, 0, tail)).view(chunks, c, h, d).transpose(1, 2)  # [chunks, h, c, d]
        # keys with m - 1 chunks of zeros in front: chunk j's keys are padded rows j*c .. j*c + span (the
        # m - 1 previous chunks and its own), overlapping windows of one tensor: a view, no copy
        kc, vc = (
            F.pad(t, (0, 0, 0, 0, span - c, tail)).unfold(0, span, c).permute(0, 1, 3, 2) for t in (k, v)
        )
        out = F.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=self.band, scale=scale, enable_gqa=k.shape[1] != h
        )  # [chunks, h, c, d]
        return out.transpose(1, 2).reshape(chunks * c, h, d)[:n]


# The banded form's least queries per chunk: windows below it waste few scores, and calls stay large.
BAND_CHUNK = 16


def band_chunk(window: int) -> tuple[int, int]:
    """(c, m): the banded form's queries per chunk and key chunks per query chunk (its own and the m - 1
    before it, enough to reach window - 1 positions back). c is half the window: a query scores c * m =
    1.5 x window keys, where c = window (m = 2) scores 2 x window. Local layers of the Gemma benchmark
    config (window 128, 4096 positions) took 22.8 ms forward and backward at c = 64 against 27.6 at 128
    (c = 32: 22.2, smaller calls eat the rest of the saving)."""
    c = max(-(-window // 2), BAND_CHUNK)
    return c, 1 + -(-(window - 1) // c)


def _band_mask(flat_starts: torch.Tensor, window: int) -> torch.Tensor:
    """[chunks, 1, c, m*c] bool, (c, m) = band_chunk(window): query i of chunk j (position j*c + i) may
    attend to key t of the chunk's keys (position (j-m+1)*c + t) when both are in one document and the
    key is at most window-1 positions behind. Padding past the end is one document of its own (each of
    its queries sees itself, so no row of scores is empty); the keys before the start are in none."""
    n, (c, m) = flat_starts.numel(), band_chunk(window)
    chunks, span = -(-n // c), m * c
    doc = torch.cumsum(flat_starts.long(), 0)  # [n]: document number, from 1
    doc = F.pad(doc, (0, chunks * c - n), value=-1)  # [chunks * c]
    keys = F.pad(doc, (span - c, 0), value=-2).unfold(0, span, c)  # [chunks, span]
    i = torch.arange(c, device=doc.device)[:, None] + span - c  # query i's own place among the keys
    t = torch.arange(span, device=doc.device)[None, :]
    near = (t > i - window) & (t <= i)  # key position in (query - window, query]
    return (near & (doc.view(chunks, c)[:, :, None] == keys[:, None, :])).unsqueeze(1)


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
        mask: torch.Tensor | DocumentRuns | None = None,
        kv_cache: KVCacheSlot | None = None,
        positions: slice | None = None,
    ) -> torch.Tensor:
        """x: [batch, seq, hidden]; rope: (cos, sin) for the seq positions; mask: overrides the default;
        kv_cache: earlier positions' keys/values to attend to as well (and to extend with this call's);
        positions: queries at these positions only (keys and values from all), for a caller that reads
        the output there alone (full bidirectional attention: no mask, window or cache)."""
        q_rope = rope
        if positions is None:
            q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            if self.causal or self.window is not None or mask is not None or kv_cache is not None:
                raise ValueError(
                    "Attention(positions=...) needs full bidirectional attention: no mask, window or cache"
                )
            q, (k, v) = self.q_proj(x[:, positions]), fused_linear(x, (self.k_proj, self.v_proj))
            if rope is not None:
                q_rope = tuple(table[..., positions, :] for table in rope)
        b, s, _ = q.shape
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [b, h, s, d]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [b, kv, k_len, d]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *q_rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # [b, kv, k_len, d]: cached positions, then these
        out = self.attend(q, k, v, mask)  # [b, h, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | DocumentRuns | None
    ) -> torch.Tensor:
        """q: [b, h, q_len, d]; k, v: [b, kv, k_len, d] -> [b, h, q_len, d]."""
        if isinstance(mask, DocumentRuns):
            return mask.attend(q, k, v, self.scale)
        # (the device test first: looking the kernel up under torch.compile warns about its lru_cache)
        half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        kernel = flash_attn_func() if half and mask is None else None
        if kernel is not None:
            out = kernel(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                softmax_scale=self.scale, causal=self.causal, window_size=flash_window(self.window, self.causal),
            )  # fmt: skip
            return out.transpose(1, 2)
        q_len, k_len = q.shape[2], k.shape[2]
        if takes_explicit_attention(k, mask is not None or self.causal or self.window is not None):
            if mask is None:
                mask = attention_mask(q_len, k_len, causal=self.causal, window=self.window, device=q.device)
            return explicit_attention(q, k, v, self.scale, mask)
        gqa = self.num_kv_heads != self.num_heads  # SDPA lets each kv head serve its query heads
        if mask is None and self.causal and q_len == k_len:  # a whole sequence, no cache before it
            if self.window is None or k_len <= self.window:  # the kernel skips the blocks above the diagonal
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa
                )
            # the window cuts: banded, each query chunk against m chunks of keys, not the [s, s] square
            starts = torch.zeros(q.shape[0], q_len, dtype=torch.bool, device=q.device)
            return DocumentRuns.build(starts, window=self.window).attend(q, k, v, self.scale)
        if mask is None:
            mask = attention_mask(q_len, k_len, causal=self.causal, window=self.window, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
