"""Evaluation on the eval split, shared by the tasks: eval mode, the EMA weights, this rank's share of
the split as device batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from hrm_mega.config import Config
from hrm_mega.data.reader import iterate_split
from hrm_mega.optim import EMA
from hrm_mega.training import engine as ds


def limit_rows(
    batches: Iterable[dict[str, torch.Tensor]], max_rows: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Marks rows past the first max_rows (0 = no limit) as not valid, keeping the batch count equal
    across ranks."""
    if not max_rows:
        yield from batches
        return
    seen = 0
    for b in batches:
        if seen >= max_rows:
            b = {**b, "valid": torch.zeros_like(b["valid"])}
        yield b
        seen += b["valid"].shape[0]


def eval_batch_size(config: Config, world: ds.World) -> int:
    return max(1, config.train.global_batch // world.dp_size)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode for the duration, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def evaluation(
    model: torch.nn.Module, config: Config, world: ds.World, ema: EMA | None = None
) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Eval mode, and the EMA weights if the run keeps them, for the duration; yields this rank's share
    of the eval split as device batches (rows past train.eval_max_samples marked not valid)."""
    d, t = config.data, config.train
    with eval_mode(model), ema.swapped(model) if ema is not None else contextlib.nullcontext():
        batches = iterate_split(
            d.path, d.eval_split, batch_size=eval_batch_size(config, world), dp_rank=world.dp_rank,
            dp_size=world.dp_size, corrupt_policy=d.corrupt_policy, shard_url=d.shard_url,
            read_retries=d.read_retries,
        )  # fmt: skip
        batches = limit_rows(batches, t.eval_max_samples // world.dp_size if t.eval_max_samples else 0)
        yield ({k: v.to(world.device) for k, v in b.items()} for b in batches)
