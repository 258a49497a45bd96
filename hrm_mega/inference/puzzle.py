"""Puzzle inference in the two evaluation modes.

- fixed: every row runs exactly halt_max_steps segments, as the HRM and TRM papers report;
- adaptive: batched per-row halting. A row leaves as soon as its Q-head says halt (or at
  halt_max_steps), and a new sample takes its place, so the batch stays full while samples remain.

Both return one record per sample; `puzzle_metrics` turns records into the reported numbers.

`run_trajectories` runs every row for all halt_max_steps segments and keeps what each segment gave;
since rows do not interact, it answers "fixed at k segments" and "adaptive at threshold t" for every
k and t from one pass (`Trajectories.fixed`, `Trajectories.adaptive`): the accuracy-against-segments
table of `hrm-mega eval --mode table` and `make demo`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hrm_mega.config import PuzzleModelConfig
from hrm_mega.models.act import IGNORE_LABEL, halt_logit, q_says_halt
from hrm_mega.models.recurrence import Carry
from hrm_mega.models.vocab import gather_vocab

_ROW_KEYS = ("inputs", "labels", "puzzle_identifiers", "sample_id")


@dataclass
class PuzzleRecord:
    sample_id: int
    prediction: torch.Tensor  # [seq_len] argmax tokens of the final segment
    labels: torch.Tensor  # [seq_len]
    segments: int
    q_halt: float  # final q_halt logit


def _records(
    batch: dict[str, torch.Tensor], logits: torch.Tensor, segments: torch.Tensor, q_halt: torch.Tensor
) -> Iterator[PuzzleRecord]:
    """One record per row; padding rows (`valid` False, as loaders emit to keep batches full) are dropped."""
    pred = gather_vocab(logits).argmax(-1).cpu()  # the full vocabulary under TP
    ids = batch.get("sample_id", torch.full((pred.shape[0],), -1))
    valid = batch.get("valid", torch.ones(pred.shape[0], dtype=torch.bool))
    for i in range(pred.shape[0]):
        if valid[i]:
            yield PuzzleRecord(
                int(ids[i]), pred[i], batch["labels"][i].cpu(), int(segments[i]), float(q_halt[i])
            )


@torch.no_grad()
def run_fixed(
    model: torch.nn.Module, config: PuzzleModelConfig, batches: Iterable[dict[str, torch.Tensor]]
) -> Iterator[PuzzleRecord]:
    """Runs every row for exactly halt_max_steps segments."""
    for batch in batches:
        b = batch["inputs"].shape[0]
        carry = model.initial_carry(b)
        for _ in range(config.halt_max_steps):
            out = model(carry, batch)
            carry = out.carry
        yield from _records(batch, out.logits, torch.full((b,), config.halt_max_steps), out.q_halt)


@torch.no_grad()
def run_adaptive(
    model: torch.nn.Module,
    config: PuzzleModelConfig,
    samples: Iterable[dict[str, torch.Tensor]],
    batch_size: int,
) -> Iterator[PuzzleRecord]:
    """Per-row halting: finished rows leave the batch and new samples join until the source is empty.

    `samples` yields batches of any size (e.g. from a loader); rows are taken from them one by one.
    """
    source = _rows(samples)
    batch = _take(source, batch_size)
    if batch is None:
        return
    device = batch["inputs"].device
    carry, steps = (
        model.initial_carry(batch["inputs"].shape[0]),
        torch.zeros(batch["inputs"].shape[0], device=device),
    )
    while batch is not None:
        out = model(carry, batch)
        steps = steps + 1
        done = q_says_halt(config, out) | (steps >= config.halt_max_steps)
        if done.any():
            idx = done.nonzero().squeeze(-1)
            yield from _records(_index(batch, idx), out.logits[idx], steps[idx], out.q_halt[idx])
        keep = (~done).nonzero().squeeze(-1)
        batch, carry, steps = (
            _index(batch, keep),
            Carry(out.carry.z_H[keep], out.carry.z_L[keep]),
            steps[keep],
        )
        new = _take(source, int(done.sum()))
        if new is not None:
            n = new["inputs"].shape[0]
            fresh = model.initial_carry(n)
            batch = {k: torch.cat([batch[k], new[k].to(batch[k].device)]) for k in batch}
            carry = Carry(torch.cat([carry.z_H, fresh.z_H]), torch.cat([carry.z_L, fresh.z_L]))
            steps = torch.cat([steps, torch.zeros(n, device=device)])
        if batch["inputs"].shape[0] == 0:
            batch = None


def _rows(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        valid = batch.get("valid", torch.ones(batch["inputs"].shape[0], dtype=torch.bool))
        for i in range(batch["inputs"].shape[0]):
            if valid[i]:
                yield {k: batch[k][i] for k in _ROW_KEYS if k in batch}


def _take(rows: Iterator[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor] | None:
    taken = [row for _, row in zip(range(n), rows)]
    if not taken:
        return None
    return {k: torch.stack([r[k] for r in taken]) for k in taken[0]}


def _index(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in batch.items()}


METRIC_SUMS = ("samples", "exact", "token", "q_right", "segments")


def metric_sums(records: Iterable[PuzzleRecord]) -> torch.Tensor:
    """Sums over records, in the order of METRIC_SUMS (a tensor, so ranks can all-reduce it). Records
    with no labels (every label ignored) are left out, as HRM's loss head leaves them out of its
    metrics: there is nothing to be right or wrong about."""
    sums = torch.zeros(len(METRIC_SUMS), dtype=torch.float64)
    for r in records:
        valid = r.labels != IGNORE_LABEL
        if not valid.any():
            continue
        correct = (r.prediction == r.labels) & valid
        solved = bool(correct.sum() == valid.sum())
        token = float(correct.sum()) / max(1, int(valid.sum()))
        sums += torch.tensor([1, solved, token, (r.q_halt >= 0) == solved, r.segments], dtype=torch.float64)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """exact_accuracy, token_accuracy, q_halt_accuracy (q_halt >= 0 iff solved) and mean_segments over
    the `samples` labelled samples."""
    n = float(sums[0])
    if n == 0:
        raise ValueError("no labelled samples were evaluated; is the eval split empty or without labels?")
    exact, token, q_right, segments = (float(v) / n for v in sums[1:])
    return {
        "samples": int(n),
        "exact_accuracy": exact,
        "token_accuracy": token,
        "q_halt_accuracy": q_right,
        "mean_segments": segments,
    }


def puzzle_metrics(records: Iterable[PuzzleRecord]) -> dict[str, float]:
    return metrics_from_sums(metric_sums(records))


@dataclass
class Trajectories:
    """Labelled rows run for all S = halt_max_steps segments; column s holds what segment s+1 gave."""

    solved: torch.Tensor  # [n, S] bool: every labelled cell right
    token: torch.Tensor  # [n, S] fp64: the share of labelled cells right
    halt_prob: torch.Tensor  # [n, S] fp64: sigmoid(q_halt)
    rule_halts: torch.Tensor  # [n, S] bool: the q_target's own rule (model.halt_threshold = 0) halts

    def fixed(self, segments: int) -> torch.Tensor:
        """metric_sums (METRIC_SUMS order) of running every row `segments` segments."""
        return self._sums(torch.full((self.solved.shape[0],), segments - 1, dtype=torch.long))

    def adaptive(self, threshold: float) -> torch.Tensor:
        """metric_sums of per-row halting: a row stops after the first segment where sigmoid(q_halt) >
        threshold (threshold 0: the q_target's own rule), and after the last one at the latest."""
        halts = self.rule_halts.clone() if threshold == 0 else self.halt_prob > threshold
        halts[:, -1] = True
        return self._sums(halts.long().argmax(dim=1))  # the first segment that halts

    def _sums(self, stop: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(stop.shape[0])
        solved = self.solved[rows, stop]
        q_right = (self.halt_prob[rows, stop] >= 0.5) == solved  # as metric_sums: q_halt >= 0 iff solved
        values = (
            float(stop.shape[0]),
            solved.sum(),
            self.token[rows, stop].sum(),
            q_right.sum(),
            (stop + 1).sum(),
        )
        return torch.tensor([float(v) for v in values], dtype=torch.float64)


@torch.no_grad()
def run_trajectories(
    model: torch.nn.Module, config: PuzzleModelConfig, batches: Iterable[dict[str, torch.Tensor]]
) -> Trajectories:
    """Runs every valid, labelled row for halt_max_steps segments, recording each segment (Trajectories)."""
    columns: list[list[torch.Tensor]] = [[], [], [], []]
    for batch in batches:
        keep = batch.get("valid", torch.ones(batch["inputs"].shape[0], dtype=torch.bool)).bool()
        labels = batch["labels"]
        valid = labels != IGNORE_LABEL
        keep = (keep & valid.any(dim=1)).cpu()
        carry = model.initial_carry(labels.shape[0])
        per_segment: list[list[torch.Tensor]] = [[], [], [], []]
        for _ in range(config.halt_max_steps):
            out = model(carry, batch)
            carry = out.carry
            correct = (gather_vocab(out.logits).argmax(-1) == labels) & valid
            solved = correct.sum(-1) == valid.sum(-1)
            token = correct.sum(-1).double() / valid.sum(-1).clamp_min(1)
            values = (solved, token, torch.sigmoid(out.q_halt.double()), halt_logit(config, out, 0.0) > 0)
            for column, v in zip(per_segment, values):
                column.append(v.cpu()[keep])
        for column, parts in zip(columns, per_segment):
            column.append(torch.stack(parts, dim=1))
    return Trajectories(*(torch.cat(c) for c in columns))
