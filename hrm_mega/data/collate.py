"""Stacking decoded samples (dicts of numpy arrays and ints) into a batch of torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hrm_mega.data.decode import SampleSpec


def collate(samples: list[dict[str, Any]], spec: SampleSpec, **extra: list[Any]) -> dict[str, torch.Tensor]:
    """Stacks samples field by field: integer arrays and ints become int64, floats float32, bools bool.

    `extra` adds per-row fields (e.g. `rows=[...]`). With no samples, returns empty tensors with the
    fields and shapes of the dataset's layout (those of pad_sample: [0, seq_len] arrays, [0] ids).
    """
    if not samples:
        layout = pad_sample(spec)
        batch = {name: torch.zeros(0, *np.shape(value), dtype=torch.long) for name, value in layout.items()}
        for name in extra:
            batch[name] = torch.zeros(0, dtype=torch.bool if name == "valid" else torch.long)
        return batch
    names = samples[0].keys()
    if any(s.keys() != names for s in samples):
        raise ValueError(f"cannot batch samples with different fields (first has {sorted(names)})")
    batch = {name: _stack(name, [s[name] for s in samples]) for name in names}
    for name, values in extra.items():
        batch[name] = _stack(name, values)
    return batch


def _stack(name: str, values: list[Any]) -> torch.Tensor:
    try:
        array = np.stack([np.asarray(v) for v in values])
    except ValueError as exn:
        raise ValueError(f"cannot batch sample field {name!r}: {exn}") from None
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64, copy=False))
    if array.dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float32, copy=False))
    if array.dtype.kind == "b":
        return torch.from_numpy(array)
    raise ValueError(f"cannot batch sample field {name!r} of dtype {array.dtype}; only numbers and arrays")


def pad_sample(spec: SampleSpec) -> dict[str, Any]:
    """A filler row for fixed-size evaluation batches: pad inputs, no loss anywhere, sample_id -1.

    A text filler row is one padding run, as decode_text makes it: doc_ids 0, position_ids 0..seq_len-1.
    """
    if spec.kind == "text":
        return {
            "input_ids": np.full(spec.seq_len, spec.pad_id, dtype=np.int64),
            "labels": np.full(spec.seq_len, spec.ignore_label_id, dtype=np.int64),
            "position_ids": np.arange(spec.seq_len, dtype=np.int64),
            "doc_ids": np.zeros(spec.seq_len, dtype=np.int64),
            "answer": np.zeros(spec.seq_len, dtype=np.int64),
            "answer_spans": 0,
            "sample_id": -1,
            "epoch": 0,
        }
    return {
        "inputs": np.full(spec.seq_len, spec.pad_id, dtype=np.int64),
        "labels": np.full(spec.seq_len, spec.ignore_label_id, dtype=np.int64),
        "puzzle_identifiers": 0,
        "group_id": -1,
        "sample_id": -1,
        "epoch": 0,
    }
