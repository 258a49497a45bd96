"""Paged KV cache for HRMGemma: fixed-size blocks in a shared pool, a block table per (layer, step, row).

`PagedKVCache` keeps the semantics of the rectangular `KVCache` (models/kv_cache.py: one slot per
(layer, cycle step), the frontier rule for steps a token never ran, local layers keep window-1
positions) and the calls HRMGemma.infer makes (`valid`, `start`, `slot`, `fill_unrun`), so cached
generation computes what the rectangular cache computes. What changes is where keys/values live:

- A `BlockPool` holds blocks of `block_size` positions (keys and values of every kv head). Each slot
  row has a block table: the list of its blocks, in position order. Rows store only their own tokens
  (no padding columns), so a row that joins a batch copies nothing and a row that leaves frees its blocks.
- Blocks are reference counted and shared: a slot created for a cycle step no earlier token ran starts
  as the layer's last slot (the frontier rule) by sharing that slot's blocks; the first write into a
  shared block copies it (copy on write).
- Local (sliding-window) slots release the blocks wholly outside the window.
- Offload: the pool keeps at most `resident_blocks` blocks in its resident frames (on the model's
  device); the others live in a second tier (pinned host memory for an accelerator, memory-mapped files
  on CPU) and are brought back, least recently used first out, when an attention call needs them.

- int8 storage (`kv_dtype="int8"`): every position's key (and value) vector of each kv head is stored
  as int8 with its own fp32 scale, absmax / 127 (symmetric, per token and head), in the 4 bytes after
  its head_dim int8 values in the same frame row; so blocks, copies and offload move rows as they are,
  and a block takes (head_dim + 4) / (head_dim * 4) of an fp32 block's bytes (0.28 at head_dim 32,
  0.254 at Gemma 3's 256). Keys/values are quantized when written and dequantized to the model's dtype
  when an attention call gathers them; the positions of the current forward attend to each other
  unquantized. Tokens then differ from an fp32 cache's only where a greedy choice is that close
  (bench/paged_kv.py --kv-int8 measures it).

Attention here is torch's SDPA over a contiguous tensor, so each attention call gathers its slot's
blocks into one left-padded [rows, kv_heads, length, head_dim] view (the rectangle the model's masks
expect) for the duration of that call; a paged-attention kernel would read the blocks in place. The
resident budget bounds the pool, not that transient view (bench/paged_kv.py prints both).

Rows follow left padding: once a row has a token, every later position of that row is a token (the
callers guarantee it: generation and the serving engine drop finished rows with `select`).
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Sequence

import torch


class OffloadError(RuntimeError):
    """The resident budget cannot hold what one attention call needs; the message is one line."""


KV_DTYPES = ("model", "int8")  # how a pool stores keys/values: the model's dtype, or int8 + a scale


class BlockPool:
    """Blocks of keys/values [block_size, 2, kv_heads, row_width], resident frames + a second tier.

    Block ids are stable handles; a resident block sits in a frame (row range of `frames`), an offloaded
    one in its home in the second tier. resident_blocks None: every block stays resident (the frames
    grow as needed). A block id's refcount counts the slot rows that hold it. A frame row holds one
    position's head_dim values per (k/v, kv head): in `dtype`, or with kv_dtype="int8" as int8 values
    followed by their fp32 scale's 4 bytes (row_width = head_dim + 4; module docstring)."""

    def __init__(
        self,
        *,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = 16,
        resident_blocks: int | None = None,
        offload_dir: str | None = None,
        kv_dtype: str = "model",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if resident_blocks is not None and resident_blocks < 1:
            raise ValueError(f"resident_blocks={resident_blocks} must be >= 1 (or None: no offload)")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} must be one of {', '.join(KV_DTYPES)}")
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)  # dtype: what attention reads back
        self.kv_dtype = kv_dtype
        self.quantized = kv_dtype == "int8"
        self.storage_dtype = torch.int8 if self.quantized else dtype
        self.row_width = head_dim + 4 if self.quantized else head_dim  # int8 values, then an fp32 scale
        self.resident_blocks = resident_blocks
        self.offload_dir = offload_dir
        capacity = 64 if resident_blocks is None else resident_blocks
        self.frames = torch.zeros(
            (capacity * block_size, 2, kv_heads, self.row_width), dtype=self.storage_dtype, device=device
        )
        self._free_frames = list(range(capacity - 1, -1, -1))
        self.refs: list[int] = []  # per block id
        self.frame: list[int] = []  # per block id: its frame, or -1 when offloaded (or free)
        self.home: list[int] = []  # per block id: its place in the second tier, or -1
        self._free_ids: list[int] = []
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # resident, oldest first
        self._pinned: set[int] = set()  # blocks the current operation needs resident
        self._tier: list[torch.Tensor] = []  # second-tier chunks [chunk_blocks * block_size, 2, kv, d]
        self._free_homes: list[int] = []
        self._chunk_blocks = 64
        self.counters = collections.Counter(
            {"offloaded": 0, "reloaded": 0, "copied_on_write": 0, "peak_blocks": 0, "peak_resident": 0}
        )

    # ----------------------------------------------------------------------------------------------
    # Sizes

    @property
    def block_bytes(self) -> int:
        return self.block_size * 2 * self.kv_heads * self.row_width * self.frames.element_size()

    @property
    def blocks_in_use(self) -> int:
        return len(self.refs) - len(self._free_ids)

    @property
    def resident_in_use(self) -> int:
        return len(self._lru)

    def resident_bytes(self) -> int:
        """Bytes of the resident frames (allocated, used or not): what the budget bounds."""
        return self.frames.numel() * self.frames.element_size()

    # ----------------------------------------------------------------------------------------------
    # Stored form

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys/values [..., head_dim] -> frame rows [..., row_width] in the storage dtype."""
        if not self.quantized:
            return kv.to(self.storage_dtype)
        x = kv.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / 127  # [..., 1]: one per position and head
        q = (x / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-127, 127).to(torch.int8)
        return torch.cat((q, scale.contiguous().view(torch.int8)), dim=-1)  # the scale's 4 bytes last

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Frame rows [..., row_width] -> keys/values [..., head_dim] in the model's dtype."""
        if not self.quantized:
            return rows
        d = self.head_dim
        scale = rows[..., d:].contiguous().view(torch.float32)  # [..., 1]
        return (rows[..., :d].float() * scale).to(self.dtype)

    # ----------------------------------------------------------------------------------------------
    # Blocks

    def allocate(self) -> int:
        """A new private block (refcount 1), resident."""
        if self._free_ids:
            block = self._free_ids.pop()
            self.refs[block], self.frame[block], self.home[block] = 1, -1, -1
        else:
            block = len(self.refs)
            self.refs.append(1)
            self.frame.append(-1)
            self.home.append(-1)
        self.frame[block] = self._take_frame()
        self._lru[block] = None
        self._pinned.add(block)
        self.counters["peak_blocks"] = max(self.counters["peak_blocks"], self.blocks_in_use)
        self.counters["peak_resident"] = max(self.counters["peak_resident"], self.resident_in_use)
        return block

    def share(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.frame[block] >= 0:
                    self._free_frames.append(self.frame[block])
                    del self._lru[block]
                if self.home[block] >= 0:
                    self._free_homes.append(self.home[block])
                self.frame[block] = self.home[block] = -1
                self._pinned.discard(block)
                self._free_ids.append(block)

    def shared(self, block: int) -> bool:
        return self.refs[block] > 1

    def copy(self, block: int) -> int:
        """A private copy of `block` (which the caller then releases)."""
        source = self.resident(block)
        new = self.allocate()
        bs = self.block_size
        self.frames[self.frame[new] * bs : (self.frame[new] + 1) * bs] = self.frames[
            source * bs : (source + 1) * bs
        ]
        self.counters["copied_on_write"] += 1
        return new

    def resident(self, block: int) -> int:
        """The frame of `block`, reloading it from the second tier if needed; it stays pinned (not
        offloaded) until `unpin`."""
        frame = self.frame[block]
        if frame < 0:
            frame = self._take_frame()
            self.frames[frame * self.block_size : (frame + 1) * self.block_size] = self._home_rows(block)
            self.frame[block] = frame
            self._lru[block] = None
            self.counters["reloaded"] += 1
            self.counters["peak_resident"] = max(self.counters["peak_resident"], self.resident_in_use)
        else:
            self._lru.move_to_end(block)
        self._pinned.add(block)
        return frame

    def unpin(self) -> None:
        self._pinned.clear()

    def _take_frame(self) -> int:
        if self._free_frames:
            return self._free_frames.pop()
        if self.resident_blocks is None:  # no budget: grow the frames
            old = self.frames.shape[0] // self.block_size
            self.frames = torch.cat((self.frames, torch.zeros_like(self.frames)))
            self._free_frames = list(range(2 * old - 1, old, -1))
            return old
        for victim in self._lru:  # least recently used first
            if victim not in self._pinned:
                break
        else:
            raise OffloadError(
                f"the KV cache's resident budget of {self.resident_blocks} blocks is smaller than what one "
                f"attention call needs ({len(self._pinned)}+ blocks); raise it (--kv-resident-blocks)"
            )
        frame = self.frame[victim]
        if self.home[victim] < 0:
            self.home[victim] = self._take_home()
        self._home_rows(victim).copy_(self.frames[frame * self.block_size : (frame + 1) * self.block_size])
        del self._lru[victim]
        self.frame[victim] = -1
        self.counters["offloaded"] += 1
        return frame

    # ----------------------------------------------------------------------------------------------
    # The second tier

    def _take_home(self) -> int:
        if not self._free_homes:
            chunk = len(self._tier)
            self._tier.append(self._new_chunk())
            first = chunk * self._chunk_blocks
            self._free_homes = list(range(first + self._chunk_blocks - 1, first - 1, -1))
        return self._free_homes.pop()

    def _home_rows(self, block: int) -> torch.Tensor:
        chunk, index = divmod(self.home[block], self._chunk_blocks)
        bs = self.block_size
        return self._tier[chunk][index * bs : (index + 1) * bs]

    def _new_chunk(self) -> torch.Tensor:
        shape = (self._chunk_blocks * self.block_size, 2, self.kv_heads, self.row_width)
        if self.device.type != "cpu":
            return torch.empty(shape, dtype=self.storage_dtype, pin_memory=True)
        # CPU: a memory-mapped file, unlinked at once (the mapping keeps it until the pool is freed)
        fd, path = tempfile.mkstemp(prefix="hrm-mega-kv-", suffix=".bin", dir=self.offload_dir)
        os.close(fd)
        try:
            numel = 1
            for n in shape:
                numel *= n
            flat = torch.from_file(path, shared=True, size=numel, dtype=self.storage_dtype)
        finally:
            os.unlink(path)
        return flat.view(shape)

    def second_tier_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tier)


class _Table:
    """One row of one slot: its blocks in position order, blocks[0] holding positions from
    first * block_size on, and the row's length (positions seen, including those trimmed away)."""

    __slots__ = ("blocks", "first", "length")

    def __init__(self, blocks: list[int], first: int, length: int) -> None:
        self.blocks, self.first, self.length = blocks, first, length

    def copy(self) -> _Table:
        return _Table(list(self.blocks), self.first, self.length)


class PagedSlot:
    """Keys/values of earlier positions of one (layer, step), as block tables per row (attention.KVCacheSlot)."""

    def __init__(self, cache: PagedKVCache, tables: list[_Table], window: int | None) -> None:
        self.cache, self.tables = cache, tables
        self.keep = None if window is None else window - 1

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new positions (the rows' tokens among k, v [b, kv, s, d]); returns the earlier
        positions (left-padded to the rectangle the model's masks expect) followed by all new ones."""
        cache, pool = self.cache, self.cache.pool
        past = cache.past_width if self.keep is None else min(cache.past_width, self.keep)
        try:
            view = self._gather(past)  # [b, past, 2, kv, d]
            self._write(torch.stack((k, v), dim=2).permute(0, 3, 2, 1, 4))  # [b, s, 2, kv, d]
        finally:
            pool.unpin()
        kv = view.permute(2, 0, 3, 1, 4)  # [2, b, kv, past, d]
        return torch.cat((kv[0].to(k.dtype), k), dim=2), torch.cat((kv[1].to(v.dtype), v), dim=2)

    def _gather(self, width: int) -> torch.Tensor:
        pool, bs = self.cache.pool, self.cache.pool.block_size
        b = len(self.tables)
        if width == 0:
            return torch.zeros((b, 0, 2, pool.kv_heads, pool.head_dim), dtype=pool.dtype, device=pool.device)
        frames = [[pool.resident(block) for block in t.blocks] or [0] for t in self.tables]
        widest = max(len(f) for f in frames)
        table = torch.tensor([f + [0] * (widest - len(f)) for f in frames], device=pool.device)  # [b, nb]
        lengths = torch.tensor([t.length for t in self.tables], device=pool.device)
        firsts = torch.tensor([t.first for t in self.tables], device=pool.device)
        positions = lengths[:, None] - width + torch.arange(width, device=pool.device)[None]  # [b, width]
        lowest = lengths - (width if self.keep is None else min(width, self.keep))
        present = (positions >= lowest.clamp_min(0)[:, None]) & (positions >= 0)
        index = (positions // bs - firsts[:, None]).clamp(0, widest - 1)
        flat = table.gather(1, index) * bs + positions % bs
        view = pool.decode(pool.frames[flat.flatten()]).view(b, width, 2, pool.kv_heads, pool.head_dim)
        return view.masked_fill(~present[:, :, None, None, None], 0)

    def _write(self, kv: torch.Tensor) -> None:
        """kv [b, s, 2, kv, d]: row r's tokens are its last cache.new_counts[r] positions."""
        pool = self.cache.pool
        s = kv.shape[1]
        destinations: list[int] = []
        sources: list[int] = []
        for r, (table, count) in enumerate(zip(self.tables, self.cache.new_counts, strict=True)):
            written = self._extend(table, count)
            destinations += written
            sources += range(r * s + s - len(written), r * s + s)
        if destinations:
            flat = kv.reshape(-1, *kv.shape[2:])
            rows = torch.tensor(sources, device=kv.device)
            pool.frames[torch.tensor(destinations, device=pool.device)] = pool.encode(flat[rows])

    def _extend(self, t: _Table, count: int) -> list[int]:
        """Grows row table `t` by `count` positions; returns the frame rows to write the kept ones to."""
        pool, bs = self.cache.pool, self.cache.pool.block_size
        end = t.length + count
        low = 0 if self.keep is None else max(0, end - self.keep)
        self._trim(t, low)
        start = max(t.length, low)
        t.length = end
        if start >= end:
            return []
        if not t.blocks:
            t.first = start // bs
        if start // bs - t.first < len(t.blocks) and pool.shared(t.blocks[-1]):
            private = pool.copy(t.blocks[-1])  # copy on write
            self.cache.release_later([t.blocks[-1]])
            t.blocks[-1] = private
        written = []
        for p in range(start, end):
            i = p // bs - t.first
            if i == len(t.blocks):
                t.blocks.append(pool.allocate())
            written.append(pool.resident(t.blocks[i]) * bs + p % bs)
        return written

    def _trim(self, t: _Table, low: int) -> None:
        """Drops the blocks wholly below position `low` (released after this forward)."""
        bs = self.cache.pool.block_size
        drop = 0
        while drop < len(t.blocks) and (t.first + drop + 1) * bs <= low:
            drop += 1
        if drop:
            self.cache.release_later(t.blocks[:drop])
            del t.blocks[:drop]
            t.first += drop

    def append_last(self, other: PagedSlot, counts: list[int]) -> None:
        """Appends `other`'s last counts[r] positions of each row r (those it still keeps)."""
        pool = self.cache.pool
        try:
            width = max(counts) if counts else 0
            if width == 0:
                return
            view = other._gather(width)  # [b, width, 2, kv, d]: each row's last `width` positions
            self._write(view)
        finally:
            pool.unpin()

    def blocks(self) -> list[int]:
        return [block for t in self.tables for block in t.blocks]


class PagedKVCache:
    """HRMGemma's KV cache on a BlockPool (module docstring); the interface of kv_cache.KVCache.

    Use: `start(valid)` at the beginning of every forward over new positions, `slot(layer, step,
    window)` for each attention call, `fill_unrun(layer, last_step, count)` once a layer's loop is over;
    `select(rows)` to keep rows, `PagedKVCache.concat(caches)` to join rows (moving them), `release()`
    to give every block back."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.slots: dict[str, list[PagedSlot]] = {}
        self.lengths: list[int] = []  # per row: its tokens so far
        self.past_width = 0  # the rectangle's width before the current forward
        self.new_counts: list[int] = []  # per row: tokens in the current forward
        self._frontier: dict[str, list[_Table]] = {}
        self._deferred: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def valid(self) -> torch.Tensor | None:
        """[b, length] bool: each row's tokens right-aligned (what KVCache.valid holds after
        trim_padding); None before the first forward."""
        if not self.lengths:
            return None
        lengths = torch.tensor(self.lengths, device=self.pool.device)
        width = self.length
        return torch.arange(width, device=self.pool.device)[None] >= (width - lengths)[:, None]

    def start(self, valid: torch.Tensor) -> torch.Tensor:
        """Begins a forward over new positions flagged `valid` [b, q_len] (True = token); returns the
        flags of all positions so far [b, length]."""
        self._flush()
        b, s = valid.shape
        if self.lengths and b != self.rows:
            raise ValueError(f"the KV cache holds {self.rows} rows but the input has {b}")
        if not self.lengths:
            self.lengths = [0] * b
        if bool((valid[:, 1:].long() < valid[:, :-1].long()).any()):
            raise ValueError("the paged KV cache takes left padding only: a row's tokens must be its last")
        self.new_counts = valid.long().sum(dim=1).tolist()
        if any(n > 0 and c < s for n, c in zip(self.lengths, self.new_counts, strict=True)):
            raise ValueError("the paged KV cache takes left padding only: finished rows must leave (select)")
        before = self.valid
        self.past_width = self.length
        self._frontier = {layer: [t.copy() for t in s_[-1].tables] for layer, s_ in self.slots.items()}
        self.lengths = [n + c for n, c in zip(self.lengths, self.new_counts, strict=True)]
        return valid if before is None else torch.cat((before, valid), dim=1)

    def slot(self, layer: str, step: int, window: int | None) -> PagedSlot:
        """The slot of `layer` at cycle step `step`, created (with every earlier step) if new: from the
        layer's last slot as it stood at `start` (its blocks shared), or empty."""
        slots = self.slots.setdefault(layer, [])
        while len(slots) <= step:
            frontier = self._frontier.get(layer)
            if frontier is None:
                tables = [_Table([], 0, n - c) for n, c in zip(self.lengths, self.new_counts, strict=True)]
            else:
                tables = [t.copy() for t in frontier]
                for t in tables:
                    self.pool.share(t.blocks)
            slots.append(PagedSlot(self, tables, window))
        return slots[step]

    def fill_unrun(self, layer: str, last_step: int, count: int) -> None:
        """The current forward ran `layer` up to `last_step`: every later slot gets the new tokens'
        keys/values of that step."""
        slots = self.slots[layer]
        for later in slots[last_step + 1 :]:
            later.append_last(slots[last_step], self.new_counts)

    def release_later(self, blocks: Sequence[int]) -> None:
        """Blocks a slot no longer holds; released once the current forward is over (the frontier of
        `start` may still read them)."""
        self._deferred += blocks

    def _flush(self) -> None:
        self.pool.release(self._deferred)
        self._deferred = []
        self._frontier = {}

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (indices, in order); the blocks of the others are released."""
        self._flush()
        keep = [int(r) for r in rows.tolist()]
        kept = set(keep)
        for slots in self.slots.values():
            for slot in slots:
                for r, t in enumerate(slot.tables):
                    if r not in kept:
                        self.pool.release(t.blocks)
                seen: set[int] = set()
                for r in keep:  # a row picked twice holds its blocks twice
                    if r in seen:
                        self.pool.share(slot.tables[r].blocks)
                    seen.add(r)
                slot.tables = [slot.tables[r].copy() for r in keep]
        self.lengths = [self.lengths[r] for r in keep]
        if not keep:
            self.slots = {}

    def release(self) -> None:
        """Gives every block back; the cache is empty."""
        self.select(torch.zeros(0, dtype=torch.long))

    @classmethod
    def concat(cls, caches: Sequence[PagedKVCache]) -> PagedKVCache:
        """A new cache holding the rows of `caches` in order; their blocks move (the inputs end empty).
        No keys/values are copied: a cache lacking later cycle steps of a layer gets them as its last
        slot's blocks, shared (the frontier rule)."""
        if not caches:
            raise ValueError("PagedKVCache.concat needs at least one cache")
        pool = caches[0].pool
        if any(c.pool is not pool for c in caches):
            raise ValueError("PagedKVCache.concat: the caches use different block pools")
        if any(not c.lengths for c in caches):
            raise ValueError("PagedKVCache.concat: every cache must have seen a forward (start)")
        layers = list(caches[0].slots)
        for c in caches[1:]:
            if set(c.slots) != set(layers):
                raise ValueError("PagedKVCache.concat: the caches hold different layers (different models?)")
        out = cls(pool)
        for c in caches:
            c._flush()
            out.lengths += c.lengths
        for layer in layers:
            steps = max(len(c.slots[layer]) for c in caches)
            out.slots[layer] = []
            for step in range(steps):
                tables: list[_Table] = []
                for c in caches:
                    own = c.slots[layer]
                    if step < len(own):
                        tables += own[step].tables
                    else:
                        for t in own[-1].tables:
                            tables.append(t.copy())
                            pool.share(t.blocks)
                out.slots[layer].append(PagedSlot(out, tables, None))
                out.slots[layer][-1].keep = caches[0].slots[layer][0].keep
        for c in caches:
            c.slots, c.lengths = {}, []
        return out

    def trim_padding(self) -> int:
        """Nothing to trim: rows hold only their own tokens."""
        return 0

    def steps(self, layer: str) -> int:
        return len(self.slots.get(layer, []))

    def blocks(self) -> int:
        """Distinct blocks this cache holds."""
        return len({b for slots in self.slots.values() for s in slots for b in s.blocks()})

    def nbytes(self) -> int:
        """Bytes of the blocks this cache holds, resident or offloaded (a shared block counts once)."""
        return self.blocks() * self.pool.block_bytes


def pool_for(model: torch.nn.Module, **options: object) -> BlockPool:
    """A BlockPool shaped for `model`'s attention layers (kv heads, head dim, dtype, device)."""
    config = model.config  # type: ignore[attr-defined]
    weight = model.embed_tokens.weight  # type: ignore[attr-defined]
    from hrm_mega import distributed

    kv_heads = config.num_kv_heads // distributed.tp_size()
    return BlockPool(kv_heads=kv_heads, head_dim=config.head_dim, dtype=weight.dtype, device=weight.device,
                     **options)  # type: ignore[arg-type]  # fmt: skip
