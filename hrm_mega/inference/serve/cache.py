"""The attention state of the running batch, behind the four calls the scheduler makes.

    part_logits, part_cycles, part = cache.prefill(ids, max_cycles, halt_threshold)  # one prompt alone
    cache.join([part, ...])          # its row(s) join the batch, after the rows already there
    cache.select(rows)               # only these rows (indices, in order) stay
    logits, cycles = cache.step(tokens, positions, max_cycles, halt_threshold)    # one token per row

`BatchCache` is that interface. `PagedCache` implements it with the paged KV cache of
hrm_mega/models/paged_kv_cache.py (blocks of positions in a shared pool, a block table per row; a
resident budget offloads cold blocks): a prefilled row joins by moving its block tables, a row that
leaves frees its blocks, nothing is copied. `RectangularCache` implements it with the rectangular KVCache
of hrm_mega/models/kv_cache.py (one [rows, heads, length, head_dim] tensor per layer and cycle step).

Rows are the scheduler's rows in its order. Halting limits are per row: max_cycles [b] long, and
halt_threshold [b] fp32 or None (no early halting for any row); NaN in it means no early halting for
that row (p_halt >= NaN is never true, and HRMGemma.halting_limits lets NaN through).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.lm import HRMGemma
from hrm_mega.models.paged_kv_cache import BlockPool, PagedKVCache, pool_for


class BatchCache(Protocol):
    @property
    def rows(self) -> int:
        """Rows in the batch."""
        ...

    def prefill(
        self,
        ids: torch.Tensor,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Runs one prompt ids [1, P] alone at positions 0..P-1 (pixel_values: its images). Returns the
        next-token logits [1, V], the H cycles per block of its last position [1, G], and its state."""
        ...

    def join(self, parts: list[Any]) -> None:
        """Appends prefilled sequences (states from `prefill`) to the batch, as its last rows."""
        ...

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (indices into the batch, in order); an empty selection empties it."""
        ...

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds one token per row, tokens [b] at positions [b]: next-token logits [b, V] and the H
        cycles per block of the fed position [b, G]."""
        ...

    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        ...

    def for_model(self, model: HRMGemma) -> BatchCache:
        """An empty cache of the same kind and settings for another model (a hot swap)."""
        ...


class _DecodeStep:
    """The decoding step and byte count both caches share: one token per row through model.infer
    against `self.cache` (a KVCache or a PagedKVCache)."""

    model: HRMGemma
    cache: Any
    rows: int

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cache is not None and self.rows == tokens.shape[0]
        ids = tokens[:, None]
        logits, cycles = self.model.infer(
            ids, attention_mask=torch.ones_like(ids), position_ids=positions[:, None], max_cycles=max_cycles,
            halt_threshold=halt_threshold, cache=self.cache,
        )  # fmt: skip
        return logits[:, -1].float(), cycles[:, :, -1].T

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()


class RectangularCache(_DecodeStep):
    """BatchCache on KVCache: joining left-pads and concatenates (KVCache.concat), leaving selects rows
    and drops the padding columns no row needs any more (KVCache.trim_padding). A step costs the
    longest row's length for every row: the price of the rectangle, which a paged cache avoids."""

    def __init__(self, model: HRMGemma) -> None:
        self.model = model
        self.cache: KVCache | None = None

    @property
    def rows(self) -> int:
        return 0 if self.cache is None or self.cache.valid is None else self.cache.valid.shape[0]

    def prefill(
        self,
        ids: torch.Tensor,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        part = KVCache()
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        logits, cycles = self.model.infer(
            ids, attention_mask=torch.ones_like(ids), position_ids=positions, max_cycles=max_cycles,
            halt_threshold=halt_threshold, cache=part, pixel_values=pixel_values,
        )  # fmt: skip
        return logits[:, -1].float(), cycles[:, :, -1].T, part

    def join(self, parts: list[KVCache]) -> None:
        if parts:
            self.cache = KVCache.concat(([self.cache] if self.rows else []) + parts)

    def select(self, rows: torch.Tensor) -> None:
        if self.cache is None:
            return
        if rows.numel() == 0:
            self.cache = None
            return
        self.cache.select(rows)
        self.cache.trim_padding()

    def for_model(self, model: HRMGemma) -> RectangularCache:
        return RectangularCache(model)


class PagedCache(_DecodeStep):
    """BatchCache on PagedKVCache: every row's blocks come from one BlockPool (models/paged_kv_cache.py).
    A step gathers each row's own positions, so a short row next to a long one costs its own length in
    the pool (the attention call still pads the view to the longest row)."""

    def __init__(self, model: HRMGemma, pool: BlockPool) -> None:
        self.model, self.pool = model, pool
        self.cache: PagedKVCache | None = None

    @property
    def rows(self) -> int:
        return 0 if self.cache is None else self.cache.rows

    def prefill(
        self,
        ids: torch.Tensor,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, PagedKVCache]:
        part = PagedKVCache(self.pool)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        try:
            logits, cycles = self.model.infer(
                ids, attention_mask=torch.ones_like(ids), position_ids=positions, max_cycles=max_cycles,
                halt_threshold=halt_threshold, cache=part, pixel_values=pixel_values,
            )  # fmt: skip
        except BaseException:
            part.release()
            raise
        return logits[:, -1].float(), cycles[:, :, -1].T, part

    def join(self, parts: list[PagedKVCache]) -> None:
        if parts:
            self.cache = PagedKVCache.concat(([self.cache] if self.rows else []) + parts)

    def select(self, rows: torch.Tensor) -> None:
        if self.cache is None:
            return
        self.cache.select(rows)
        if rows.numel() == 0:
            self.cache = None

    def for_model(self, model: HRMGemma) -> PagedCache:
        p = self.pool
        return PagedCache(model, pool_for(model, block_size=p.block_size, resident_blocks=p.resident_blocks,
                                          offload_dir=p.offload_dir, kv_dtype=p.kv_dtype))  # fmt: skip
