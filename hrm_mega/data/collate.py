"""Stacking decoded samples (dicts of numpy arrays and ints) into a batch of torch tensors, and taking rows
of a batch.

Every field has one entry per row, except `pixels`: the views (images and crops) of all rows, row after
row, [sum of num_images, 3, S, S] uint8, with `num_images` [B] saying how many each row holds (0..k).
Rows with images and rows without (a text source of a mixture) so share one batch without padding
images; `select_rows` and `gather_rows` keep the two in step.
"""

from __future__ import annotations

from dataclasses import replace
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
        if "pixels" in layout:
            batch["pixels"] = torch.from_numpy(layout["pixels"])
        for name in extra:
            batch[name] = torch.zeros(0, dtype=torch.bool if name == "valid" else torch.long)
        return batch
    names = samples[0].keys()
    if any(s.keys() != names for s in samples):
        raise ValueError(f"cannot batch samples with different fields (first has {sorted(names)})")
    batch = {name: _stack(name, [s[name] for s in samples]) for name in names if name != "pixels"}
    if "pixels" in names:  # ragged: every row's views, concatenated
        batch["pixels"] = torch.from_numpy(np.concatenate([s["pixels"] for s in samples]))
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
    if spec.kind == "image_text":
        assert spec.image is not None
        size = spec.image.processing.size
        no_images = {"pixels": np.zeros((0, 3, size, size), dtype=np.uint8), "num_images": 0}
        return {**pad_sample(replace(spec, kind="text")), **no_images}
    if spec.kind == "text":
        return {
            "input_ids": np.full(spec.seq_len, spec.pad_id, dtype=np.int64),
            "labels": np.full(spec.seq_len, spec.ignore_label_id, dtype=np.int64),
            "position_ids": np.arange(spec.seq_len, dtype=np.int64),
            "doc_ids": np.zeros(spec.seq_len, dtype=np.int64),
            "answer": np.zeros(spec.seq_len, dtype=np.int64),
            "answer_spans": 0,
            "due": np.zeros(spec.seq_len, dtype=np.int64),
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


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
    """The batch's rows `rows` (a list or a long tensor), in that order, with their views in `pixels`."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v[rows.to(v.device)] for k, v in batch.items() if k != "pixels"}
    if "pixels" in batch:
        counts = batch["num_images"].cpu()
        starts = (counts.cumsum(0) - counts).tolist()
        index = [i for r in rows.tolist() for i in range(starts[r], starts[r] + int(counts[r]))]
        out["pixels"] = batch["pixels"][torch.tensor(index, dtype=torch.long, device=batch["pixels"].device)]
    return out


def gather_rows(pieces: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """One batch of rows taken from several batches: pieces[i] = (batch, row) is the new row i. Batches
    without images (a text source beside an image-text one) contribute rows with num_images 0. Fields
    are those of the first piece's batch, plus the image fields if any batch has them."""
    with_images = next((b for b, _ in pieces if "pixels" in b), None)
    keys = [k for k in pieces[0][0] if k != "pixels"]
    if with_images is not None and "num_images" not in keys:
        keys.append("num_images")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [
            b[key][r] if key in b else torch.zeros((), dtype=torch.long)  # only num_images may be missing
            for b, r in pieces
        ]
        out[key] = torch.stack(values)
    if with_images is not None:
        views = [select_rows(b, [r])["pixels"] for b, r in pieces if "pixels" in b]
        out["pixels"] = torch.cat(views) if views else with_images["pixels"][:0]
    return out
