"""Weighted mixtures of datasets (`data.sources`): one SampleStream per source, and a deterministic choice
of source for every sample a batch row takes.

Each source is read, shuffled, partitioned and resumed exactly as a dataset of its own (stream.py); the
mixture only decides where each sample comes from. Global batch row r's k-th sample is sample number
n = k * B + r of the run (B the global batch), and its source is the bucket of the cumulative weights
that u(n) = frac(seed_offset + n * (sqrt(5) - 1) / 2) falls in. That golden-ratio (Weyl) sequence is
equidistributed with discrepancy O(log N / N): over any N consecutive samples each source's share is
within a few samples of N x its weight, a step's B rows are spread over the sources in proportion, and a
row's own samples (n = r, r + B, ...) form a Weyl sequence too, so no row is stuck on one source. The
choice depends on (seed, r, k) alone: identical at any data-parallel size, and a resume needs only each
row's count k next to the sources' own states.

A curriculum replaces the fixed weights by stages over k (a language model's rows take one sample per
step, so k is the step): stage i holds below its `until` step, switching at the boundary or annealing
linearly from the previous stage's weights. Still a function of (seed, r, k): a resume across a stage
boundary is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hrm_mega.data.collate import gather_rows
from hrm_mega.data.stream import SampleStream

STATE_FORMAT = "hrm-mega/mixture/1"
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    stream: SampleStream


@dataclass(frozen=True)
class Stage:
    until: int  # the stage holds for k < until (0: to the end)
    weights: tuple[float, ...]  # one per source
    linear: bool = False  # anneal from the previous stage's weights across this stage


def source_of(n: np.ndarray, cumulative: np.ndarray, seed: int) -> np.ndarray:
    """The source index of global sample numbers `n` (int64), given each sample's cumulative weights
    (rows of `cumulative`, each ending at 1)."""
    offset = (seed * GOLDEN) % 1.0
    # n * GOLDEN in float64 loses the fraction for n beyond 2**52; reducing n first keeps it exact enough.
    u = (offset + (n % (1 << 40)) * GOLDEN) % 1.0
    return np.minimum((cumulative <= u[:, None]).sum(axis=1), cumulative.shape[1] - 1)


def weights_at(stages: Sequence[Stage], k: int) -> np.ndarray:
    """The normalised source weights at step k."""
    start, previous = 0, None
    for stage in stages:
        if stage.until == 0 or k < stage.until:
            w = np.array(stage.weights, dtype=np.float64)
            if stage.linear and previous is not None and stage.until:
                frac = (k - start) / (stage.until - start)
                w = (1 - frac) * previous + frac * w
            return w / w.sum()
        start, previous = stage.until, np.array(stage.weights, dtype=np.float64)
    return previous / previous.sum()


class MixtureStream:
    """SampleStream's interface over weighted sources: `take(rows)`, `first_batch`, `progress`,
    `state_dict` / `load_state_dict`, `merge_state_dicts`, `close`. Batches carry a `source` index per
    row; beside an image-text source, rows of text sources hold no images (num_images 0; collate.py). Every source stream must have this stream's global batch, partitions and DP layout."""

    def __init__(
        self, sources: Sequence[Source], *, seed: int, global_batch: int, dp_rank: int, dp_size: int,
        curriculum: Sequence[Stage] = (),
        stop_at_end: bool = False,
    ):  # fmt: skip
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if len(sources) == 0 or not np.all(weights >= 0) or weights.sum() <= 0:
            raise ValueError("a mixture needs sources with non-negative weights that sum to more than 0")
        self.sources = list(sources)
        self.names = [s.name for s in sources]
        self.stages = list(curriculum) or [Stage(0, tuple(weights.tolist()))]
        self.stop_at_end = stop_at_end
        self.seed, self.global_batch = seed, global_batch
        self.local_batch = global_batch // dp_size
        self.first_row = dp_rank * self.local_batch  # global index of local row 0
        self.taken = np.zeros(self.local_batch, dtype=np.int64)  # k per local row
        self.tokens = [0] * len(sources)  # labelled tokens handed out per source (this rank)

    def take(self, rows: Iterable[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [int(r) for r in (rows.reshape(-1).tolist() if isinstance(rows, torch.Tensor) else rows)]
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.local_batch for r in rows):
            raise ValueError(f"take(rows): rows must be distinct and within [0, {self.local_batch})")
        local = np.array(rows, dtype=np.int64)
        k = self.taken[local]
        cumulative = np.stack([np.cumsum(weights_at(self.stages, int(step))) for step in k.tolist()])
        chosen = source_of(k * self.global_batch + self.first_row + local, cumulative, self.seed)
        self.taken[local] += 1
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for index in np.unique(chosen).tolist():
            subset = [r for r, c in zip(rows, chosen.tolist()) if c == index]
            parts[index] = self.sources[index].stream.take(subset)
            if "labels" in parts[index]:
                self.tokens[index] += int((parts[index]["labels"][:, 1:] != -100).sum())
        position = {}  # row -> (source, index in that source's batch)
        for index, batch in parts.items():
            for i, r in enumerate(batch["rows"].tolist()):
                position[r] = (index, i)
        order = [r for r in rows if r in position]
        out = gather_rows([(parts[position[r][0]], position[r][1]) for r in order])  # images ride along
        out["rows"] = torch.tensor(order, dtype=torch.long)
        out["source"] = torch.tensor([position[r][0] for r in order], dtype=torch.long)
        return out

    def first_batch(self) -> dict[str, torch.Tensor]:
        return self.take(range(self.local_batch))

    @property
    def ran_out(self) -> bool:
        """With stop_at_end: a source has handed out its whole split on this rank (the Trainer ends the run
        when any rank says so); sources repeat otherwise, and this stays False."""
        return self.stop_at_end and any(s.stream.progress["epoch"] >= 1.0 for s in self.sources)

    @property
    def progress(self) -> dict[str, float | int]:
        """The sources' progress summed, and each source's own under `NAME/...` (epochs count repeats)."""
        out: dict[str, float | int] = {"samples": 0, "skipped_samples": 0, "skipped_shards": 0}
        for source in self.sources:
            own = source.stream.progress
            for key in ("samples", "skipped_samples", "skipped_shards"):
                out[key] += own[key]
            out |= {f"{source.name}/{k}": v for k, v in own.items()}
        out |= {f"{name}/tokens": n for name, n in zip(self.names, self.tokens)}
        return out

    def close(self) -> None:
        for source in self.sources:
            source.stream.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "names": self.names,
            "stages": [[s.until, list(s.weights), s.linear] for s in self.stages],
            "first_row": self.first_row,
            "taken": self.taken.tolist(),
            "tokens": list(self.tokens),
            "sources": {s.name: s.stream.state_dict() for s in self.sources},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: format is not {STATE_FORMAT!r} (a mixture's)")
        if state["names"] != self.names:
            raise ValueError(f"loader state: sources {state['names']} but this run has {self.names}")
        taken = state["taken"]
        start = self.first_row - int(state["first_row"])
        if start < 0 or start + self.local_batch > len(taken):
            raise ValueError("loader state: its rows do not cover this rank's rows")
        self.taken = np.array(taken[start : start + self.local_batch], dtype=np.int64)
        # A merged state (another DP layout) holds every rank's token counts summed: rank 0 keeps them.
        merged = len(taken) != self.local_batch or int(state["first_row"]) != self.first_row
        keep = not merged or self.first_row == 0
        self.tokens = [int(v) if keep else 0 for v in state["tokens"]]
        for source in self.sources:
            source.stream.load_state_dict(state["sources"][source.name])

    @staticmethod
    def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """All DP ranks' states (in rank order) as one that any DP layout loads."""
        first = states[0]
        return {
            **first,
            "first_row": 0,
            "taken": [k for state in states for k in state["taken"]],
            "tokens": [sum(s["tokens"][i] for s in states) for i in range(len(first["names"]))],
            "sources": {
                name: SampleStream.merge_state_dicts([s["sources"][name] for s in states])
                for name in first["names"]
            },
        }
