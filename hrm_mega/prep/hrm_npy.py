"""Import of the official HRM `.npy` datasets (built by HRM's dataset/build_*_dataset.py).

Layout of DIR: `train/` and `test/`, each with `dataset.json` (seq_len, vocab_size, pad_id,
ignore_label_id, num_puzzle_identifiers, sets, ...) and per set name S: `S__inputs.npy` and
`S__labels.npy` ([examples, seq_len]), `S__puzzle_identifiers.npy` ([puzzles]), `S__puzzle_indices.npy`
(example offsets per puzzle, [puzzles + 1]) and `S__group_indices.npy` (puzzle offsets per group,
[groups + 1]). HRM's token layouts are ours, so tokens are copied; labels equal to ignore_label_id become
-100. Each example becomes one sample with puzzle_id = its puzzle's identifier and group_id = its group
(numbered across sets). Arrays are memory-mapped and never unpickled. The train split is written in a
seeded random order (HRM's files keep a puzzle's augmentations together); test keeps file order.

    python -m hrm_mega.prep hrm-npy --from data/sudoku-extreme-1k-aug-1000 --out data/sx-1k
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.shards import read_json
from hrm_mega.prep.common import (
    SPLITS,
    DataPrepError,
    DatasetWriter,
    add_common_arguments,
    progress,
    write_order,
)

BUILDER_VERSION = "1"
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
_REQUIRED_META = ("seq_len", "vocab_size", "pad_id", "ignore_label_id", "num_puzzle_identifiers", "sets")
_TASK_BY_SHAPE = {(11, 81): "sudoku", (12, 900): "arc"}  # (vocab_size, seq_len) of HRM's builders


def read_metadata(split_dir: Path) -> dict[str, Any]:
    path = split_dir / "dataset.json"
    if not path.is_file():
        raise DataPrepError(f"{path}: missing (expected HRM's train/ and test/ folders with dataset.json)")
    meta = read_json(path, DataPrepError, _REQUIRED_META)
    if meta["pad_id"] != 0:
        raise DataPrepError(f"{path}: pad_id {meta['pad_id']} is not 0, the PAD id of hrm-mega datasets")
    return meta


def load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataPrepError(f"{path}: missing")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise DataPrepError(f"{path}: not a plain numeric .npy ({e})") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        raise DataPrepError(f"{path}: expected an integer array, got {getattr(array, 'dtype', type(array))}")
    return array


def _check_offsets(offsets: np.ndarray, end: int, path: Path) -> None:
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != end:
        raise DataPrepError(f"{path}: must be 1-D offsets from 0 to {end}")
    if (np.diff(offsets) < 0).any():
        raise DataPrepError(f"{path}: offsets must not decrease")


def load_set(split_dir: Path, name: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The five arrays of one set, checked against each other and against dataset.json."""
    paths = {f: split_dir / f"{name}__{f}.npy" for f in FIELDS}
    arrays = {f: load_array(p) for f, p in paths.items()}
    inputs, labels = arrays["inputs"], arrays["labels"]
    if inputs.ndim != 2 or inputs.shape[1] != meta["seq_len"]:
        raise DataPrepError(
            f"{paths['inputs']}: shape {inputs.shape}, expected [examples, {meta['seq_len']}]"
        )
    if labels.shape != inputs.shape:
        raise DataPrepError(f"{paths['labels']}: shape {labels.shape} differs from inputs {inputs.shape}")
    identifiers = arrays["puzzle_identifiers"]
    _check_offsets(arrays["puzzle_indices"], len(inputs), paths["puzzle_indices"])
    if identifiers.shape != (len(arrays["puzzle_indices"]) - 1,):
        raise DataPrepError(f"{paths['puzzle_identifiers']}: needs one entry per puzzle")
    _check_offsets(arrays["group_indices"], len(identifiers), paths["group_indices"])
    if len(identifiers) and (identifiers.min() < 0 or identifiers.max() >= meta["num_puzzle_identifiers"]):
        raise DataPrepError(
            f"{paths['puzzle_identifiers']}: ids outside [0, num_puzzle_identifiers={meta['num_puzzle_identifiers']})"
        )
    vocab = meta["vocab_size"]
    for field in ("inputs", "labels"):
        a = arrays[field]
        if a.size and (a.min() < 0 or a.max() >= vocab):
            raise DataPrepError(f"{paths[field]}: token ids outside [0, vocab_size={vocab})")
    return arrays


def convert_split(
    writer: DatasetWriter, split: str, split_dir: Path, meta: dict[str, Any], seed: int, quiet: bool
) -> None:
    """Writes every example of every set of one split, in common.write_order (shuffled for train)."""
    ignore = meta["ignore_label_id"]
    sets = [load_set(split_dir, name, meta) for name in meta["sets"]]
    # Per example (over all sets): its set, row, puzzle index in the set and global group id.
    set_of, row_of, puzzle_of, group_of = [], [], [], []
    group_base = 0
    for s, a in enumerate(sets):
        n_puzzles, n_groups = len(a["puzzle_identifiers"]), len(a["group_indices"]) - 1
        puzzles = np.repeat(np.arange(n_puzzles), np.diff(a["puzzle_indices"]))
        groups = np.repeat(np.arange(n_groups), np.diff(a["group_indices"]))
        set_of.append(np.full(len(puzzles), s))
        row_of.append(np.arange(len(puzzles)))
        puzzle_of.append(puzzles)
        group_of.append(group_base + groups[puzzles])
        group_base += n_groups
    if not sets:
        return
    set_of, row_of, puzzle_of, group_of = (
        np.concatenate(x).tolist() for x in (set_of, row_of, puzzle_of, group_of)
    )
    bar = progress(len(row_of), f"writing {split}", quiet)
    for position in write_order(seed, split, len(row_of)).tolist():
        a, row, puzzle = sets[set_of[position]], row_of[position], puzzle_of[position]
        inputs = np.array(a["inputs"][row], dtype=np.int16)  # a copy, never a view of the memmap
        labels = np.array(a["labels"][row], dtype=np.int16)
        if ignore is not None:
            labels[labels == ignore] = -100
        sample_meta = {
            "puzzle_id": int(a["puzzle_identifiers"][puzzle]),
            "group_id": group_of[position],
            "set": meta["sets"][set_of[position]],
            "puzzle": puzzle,
            "example": row,
        }
        writer.write(split, inputs, labels, sample_meta)
        bar.update()
    bar.close()


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("hrm-npy", help="import an official HRM .npy dataset directory")
    add_common_arguments(p)
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DIR", help="HRM dataset dir")
    p.add_argument("--task", help="task name for the manifest (default: from vocab/seq_len, else 'hrm-npy')")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    if not args.source.is_dir():
        raise DataPrepError(f"--from {args.source}: not a directory")
    metas = {split: read_metadata(args.source / split) for split in SPLITS}
    train = metas["train"]
    for key in ("seq_len", "vocab_size"):
        if metas["test"][key] != train[key]:
            raise DataPrepError(f"{args.source}/test/dataset.json: {key} differs from train's")
    vocab, seq_len = train["vocab_size"], train["seq_len"]
    if args.task is not None:
        task = args.task
    elif vocab == 6:
        task = "maze"
    else:
        task = _TASK_BY_SHAPE.get((vocab, seq_len), "hrm-npy")
    writer = DatasetWriter(args.out, vocab, seq_len, args.samples_per_shard, args.overwrite)
    for split in SPLITS:
        convert_split(writer, split, args.source / split, metas[split], args.seed, args.quiet)
    return writer.finish(
        task=task,
        builder_version=BUILDER_VERSION,
        seed=args.seed,
        command=command,
        num_puzzle_identifiers=max(m["num_puzzle_identifiers"] for m in metas.values()),
        extra={"source": "hrm-npy", "dir": str(args.source), "hrm_metadata": metas},
    )
