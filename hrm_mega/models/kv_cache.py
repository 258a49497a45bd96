"""KV cache for HRMGemma: one slot of keys/values per (layer, cycle step).

A CycleBlock runs its layers many times per token: the local layers of group g at L step k = n*T + t
(H cycle n, L cycle t), its global layer at H step n. Each run sees the other positions' keys/values
*of the same run*, so the cache keeps one slot per (layer, step) and a decode step reads, for every
layer at every step, the earlier positions' keys/values of that same (layer, step).

Halting makes tokens run different numbers of steps. A token that stopped before step k contributes
its last computed keys/values of that layer instead (HRMGemma's halting semantics, see models/lm.py),
so every slot covers every position and all slots of a layer have the same length ("rectangular"):

- a slot for a step no earlier token ever ran is created from the layer's last slot as it stood before
  the current forward (`start`), i.e. from the earlier positions' last keys/values;
- when a forward stops before steps that earlier tokens ran, `fill_unrun` appends the new positions'
  keys/values of their last run step to those slots.

Local (sliding-window) layers keep only the last window-1 positions: a query sees keys at distance
< window, so the next query needs no more than that.

Storage: a slot writes its keys and values into a buffer it preallocates ([2, b, kv_heads, capacity,
head_dim], capacity doubling as it fills; a local slot's buffer holds a few windows and starts a new
one, with the window carried over, when full), so a decoding step copies only its new positions, not
every earlier one as concatenation did. A buffer is only ever written past the positions already in
it, and a slot made from another's tensors (the frontier rule, `select`, `concat`, `trim_padding`)
holds them as they are until its first write, which copies them into a buffer of its own; so creating
a slot from another copies nothing, and no write reaches another slot's keys.

Rows join and leave (continuous batching, hrm_mega/inference/serve): `select` keeps some rows (a
slot's own buffers keep their room, so the next write copies nothing old);
`concat` puts several caches' rows into one, left-padding the shorter ones with positions flagged
invalid (masked like prompt padding) and giving a cache the slots of steps it never ran by the same
frontier rule; `trim_padding` drops leading positions that are padding in every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class KVSlot:
    """Keys and values [b, kv_heads, length, head_dim] of earlier positions for one (layer, step): views
    of this slot's buffers, or tensors it was given (module docstring)."""

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, window: int | None) -> None:
        self.keep = None if window is None else window - 1  # positions a later query can still see
        self.adopt(k, v)

    def adopt(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Holds k, v as they are (shared, never written: the next update copies them first)."""
        self._given = (k, v)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._start = self._end = 0  # the buffers' positions that are this slot's keys/values

    @property
    def k(self) -> torch.Tensor | None:
        if self._buffers is None:
            return self._given[0]
        return self._buffers[0].narrow(2, self._start, self._end - self._start)

    @property
    def v(self) -> torch.Tensor | None:
        if self._buffers is None:
            return self._given[1]
        return self._buffers[1].narrow(2, self._start, self._end - self._start)

    @property
    def length(self) -> int:
        if self._buffers is not None:
            return self._end - self._start
        return 0 if self._given[0] is None else self._given[0].shape[2]

    def snapshot(self) -> tuple:
        """What the slot holds now, cheaply (buffers are never written below their end): a slot made from
        it later (`from_snapshot`) holds these keys/values, whatever this one appends meanwhile."""
        return (self._buffers, self._start, self._end) if self._buffers is not None else (None, *self._given)

    @classmethod
    def from_snapshot(cls, snapshot: tuple | None, window: int | None) -> KVSlot:
        if snapshot is None:
            return cls(None, None, window)
        buffers, a, b = snapshot
        if buffers is None:
            return cls(a, b, window)
        return cls(buffers[0].narrow(2, a, b - a), buffers[1].narrow(2, a, b - a), window)

    def tensors(self) -> list[torch.Tensor]:
        """What holds this slot's keys and values: its buffers, or the tensors it was given."""
        if self._buffers is not None:
            return list(self._buffers)
        return [t for t in self._given if t is not None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new positions; returns earlier + new keys/values for this call's attention."""
        new, end = k.shape[2], self._end + k.shape[2]
        buffers = self._buffers
        if buffers is None or end > buffers[0].shape[2] or buffers[0].shape[0] != k.shape[0]:
            buffers = self._reserve(k, new)
            end = self._end + new
        buffers[0].narrow(2, self._end, new).copy_(k)
        buffers[1].narrow(2, self._end, new).copy_(v)
        keys = buffers[0].narrow(2, self._start, end - self._start)
        values = buffers[1].narrow(2, self._start, end - self._start)
        self._end = end
        if self.keep is not None and end - self._start > self.keep:
            self._start = end - self.keep
        return keys, values

    def select_buffers(self, rows: torch.Tensor) -> bool:
        """Keeps `rows` of the slot's own buffers, room and all, so the next write need not copy them
        again; False (nothing done) for a slot that holds given tensors."""
        if self._buffers is None:
            return False
        self._buffers = (self._buffers[0].index_select(0, rows), self._buffers[1].index_select(0, rows))
        return True

    def _reserve(self, k: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers with room for `new` more positions after the current ones (copied in)."""
        held = self.length
        if self.keep is None:
            capacity = max(2 * (held + new), 16)
        else:  # a few windows: the window is carried over once per that many positions
            capacity = max(held, self.keep) + max(new, 4 * self.keep, 16)
        b, heads, _, dim = k.shape
        buffers = (k.new_empty((b, heads, capacity, dim)), k.new_empty((b, heads, capacity, dim)))
        if held:
            buffers[0].narrow(2, 0, held).copy_(self.k)
            buffers[1].narrow(2, 0, held).copy_(self.v)
        self._buffers, self._given, self._start, self._end = buffers, (None, None), 0, held
        return buffers

    def append_last(self, other: KVSlot, count: int) -> None:
        """Appends `other`'s last `count` positions (fewer if `other` keeps fewer: they were trimmed away
        because they are out of every later query's window)."""
        assert other.k is not None and other.v is not None
        take = min(count, other.length)
        self.update(other.k[:, :, other.length - take :], other.v[:, :, other.length - take :])


def _identity(t: torch.Tensor) -> tuple:
    """The same tensor data (one view of a buffer, however often taken): storage, offset, shape, strides."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


class KVCache:
    """All slots of one model, keyed by (layer name, step), plus which cached positions are real tokens.

    Use: `start(valid)` at the beginning of every forward over new positions (it returns the key-padding
    mask of all positions so far), then `slot(layer, step, window)` for each attention call, and
    `fill_unrun(layer, last_step, count)` once a layer's loop is over.
    """

    def __init__(self) -> None:
        self.slots: dict[str, list[KVSlot]] = {}
        self.valid: torch.Tensor | None = None  # [b, length] bool: False at padding positions
        self._frontier: dict[str, tuple] = {}  # layer -> its last slot's snapshot at `start`

    @property
    def length(self) -> int:
        """Positions seen so far (including the current forward's, once `start` was called)."""
        return 0 if self.valid is None else self.valid.shape[1]

    def start(self, valid: torch.Tensor) -> torch.Tensor:
        """Begins a forward over new positions with key-padding flags `valid` [b, q_len] (True = token).
        Returns the flags of all positions so far [b, length]."""
        if self.valid is not None and self.valid.shape[0] != valid.shape[0]:
            raise ValueError(
                f"the KV cache holds {self.valid.shape[0]} rows but the input has {valid.shape[0]}"
            )
        self.valid = valid if self.valid is None else torch.cat((self.valid, valid), dim=1)
        # Each layer's last slot as it stands now: what earlier positions contribute to a step they never ran.
        self._frontier = {layer: s[-1].snapshot() for layer, s in self.slots.items()}
        return self.valid

    def slot(self, layer: str, step: int, window: int | None) -> KVSlot:
        """The slot of `layer` at cycle step `step`, created (with every earlier step) if new."""
        slots = self.slots.setdefault(layer, [])
        while len(slots) <= step:
            slots.append(KVSlot.from_snapshot(self._frontier.get(layer), window))
        return slots[step]

    def fill_unrun(self, layer: str, last_step: int, count: int) -> None:
        """The current forward ran `layer` up to `last_step`: give every later slot the new `count`
        positions' keys/values of that step (their last computed ones)."""
        slots = self.slots[layer]
        for later in slots[last_step + 1 :]:
            later.append_last(slots[last_step], count)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (indices into the batch, in order) of every slot and of the padding flags:
        a decoder drops finished rows so that later steps compute only the running ones. Slots that
        shared a tensor share its selection."""
        picked: dict[tuple, torch.Tensor] = {}

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if _identity(t) not in picked:
                picked[_identity(t)] = t.index_select(0, rows)
            return picked[_identity(t)]

        for slots in self.slots.values():
            for slot in slots:
                if not slot.select_buffers(rows):
                    slot.adopt(take(slot.k), take(slot.v))
        self.valid = take(self.valid)

    @classmethod
    def concat(cls, caches: Sequence[KVCache]) -> KVCache:
        """A new cache holding the rows of `caches` in order (each must have seen a forward): how a
        sequence prefilled alone joins a running batch.

        Positions are aligned at the right: a cache shorter than the longest is left-padded with zero
        keys/values at positions flagged invalid, which every query masks, as it masks prompt padding
        (a local slot is padded only up to the window-1 positions it keeps). Where one cache has more
        cycle steps of a layer than another, the other's missing steps are its layer's last slot: the
        frontier rule (module docstring) by which `slot` would create them, since every earlier position
        offers its last computed keys/values to a step it never ran. The inputs are not changed; slots
        that share tensors in every input share the result."""
        if not caches:
            raise ValueError("KVCache.concat needs at least one cache")
        if any(c.valid is None for c in caches):
            raise ValueError("KVCache.concat: every cache must have seen a forward (start)")
        layers = list(caches[0].slots)
        for c in caches[1:]:
            if set(c.slots) != set(layers):
                raise ValueError("KVCache.concat: the caches hold different layers (different models?)")
        length = max(c.length for c in caches)
        out = cls()
        out.valid = torch.cat([F.pad(c.valid, (length - c.length, 0), value=False) for c in caches])
        joined: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in layers:
            steps = max(len(c.slots[layer]) for c in caches)
            out.slots[layer] = []
            for step in range(steps):
                parts = [c.slots[layer][min(step, len(c.slots[layer]) - 1)] for c in caches]
                keep = parts[0].keep
                target = length if keep is None else min(length, keep)
                key = tuple(_identity(p.k) for p in parts)
                if key not in joined:
                    joined[key] = (
                        torch.cat([_left_pad(p.k, target) for p in parts]),
                        torch.cat([_left_pad(p.v, target) for p in parts]),
                    )
                slot = KVSlot(*joined[key], None)
                slot.keep = keep
                out.slots[layer].append(slot)
        return out

    def trim_padding(self) -> int:
        """Drops the leading positions that are padding in every row (left behind when the rows that
        had tokens there leave the batch) and returns how many. No query attends to them, so later
        forwards compute the same; a local slot keeps its last min(window-1, length) positions."""
        if self.valid is None:
            return 0
        leading = int((~self.valid.any(dim=0)).long().cumprod(dim=0).sum())
        if leading == 0:
            return 0
        self.valid = self.valid[:, leading:]
        length = self.valid.shape[1]
        cut: dict[tuple, torch.Tensor] = {}

        def trim(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.shape[2] <= length:
                return t
            if _identity(t) not in cut:  # a copy, so the dropped ones are freed
                cut[_identity(t)] = t[:, :, t.shape[2] - length :].clone()
            return cut[_identity(t)]

        for slots in self.slots.values():
            for slot in slots:
                slot.adopt(trim(slot.k), trim(slot.v))
        return leading

    def steps(self, layer: str) -> int:
        return len(self.slots.get(layer, []))

    def nbytes(self) -> int:
        """Bytes held for keys and values: every buffer (its whole capacity) and every tensor a slot holds,
        once however many slots share it."""
        seen: dict[int, int] = {}
        for slots in self.slots.values():
            for s in slots:
                for t in s.tensors():
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def _left_pad(t: torch.Tensor | None, length: int) -> torch.Tensor:
    """Keys or values [b, heads, n, d] with zeros prepended up to `length` positions."""
    assert t is not None and t.shape[2] <= length, "a slot longer than its cache"
    return F.pad(t, (0, 0, length - t.shape[2], 0))
