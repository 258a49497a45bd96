"""ARC shards: an import of ARC-AGI task folders with dihedral x colour augmentation.

Each task is a JSON file {"train": [{"input": grid, "output": grid}, ...], "test": [...]}, grids being
lists of rows of colours 0-9, at most 30x30. Tasks under `--from-json` put all their pairs in the train
split; tasks under `--eval-json` put their train pairs (demonstrations) in the train split and their test
pairs in the test split.

Encoding (HRM's): a 30x30 canvas, 0 PAD, 1 EOS, colours 0-9 as 2-11 (vocab 12, seq_len 900); the grid
at the top-left (or at a seeded random offset with `--translate`, train split only), an EOS row below it
and an EOS column right of it. Labels are the output canvas with PAD as -100 (no loss).

Every (task, augmentation) is one puzzle identifier (0 is reserved for "blank"); the group is the task.
Augmentation 0 is the task itself; `--num-aug K` adds up to K distinct variants (a dihedral transform
and a colour permutation keeping colour 0), skipping variants whose content repeats an earlier one.
meta.json records task, dihedral, colour_perm and offset, so predictions can be mapped back with
hrm_mega.data.augment.arc_canvas_to_grid and arc_unaugment_grid. The train split is written in a
seeded random order (common.write_order); the test split in (task, augmentation, pair) order.

    python -m hrm_mega.prep arc --out data/arc --from-json ARC-AGI/data/training --eval-json \
        ARC-AGI/data/evaluation --num-aug 1000 --translate
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrm_mega.data.augment import (
    ARC_CANVAS,
    arc_augment_grid,
    arc_grid_to_canvas,
    random_colour_permutation,
)
from hrm_mega.data.shards import read_json
from hrm_mega.prep.common import (
    DataPrepError,
    DatasetWriter,
    Sample,
    add_common_arguments,
    item_rng,
    keyed_rng,
    non_negative_int,
    ordered_map,
    positive_int,
    progress,
    write_order,
)

TASK = "arc"
BUILDER_VERSION = "1"
VOCAB_SIZE = 12
SEQ_LEN = ARC_CANVAS * ARC_CANVAS
IDENTITY_COLOURS = list(range(10))
_KINDS = {"train": 0, "test": 1}
_OFFSET = 7  # keyed_rng domain of translation offsets

Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Spec:
    seed: int
    num_aug: int
    retries_factor: int


@dataclass(frozen=True)
class TaskFile:
    index: int  # the task's group_id
    name: str
    path: Path
    is_eval: bool


# ---- loading --------------------------------------------------------------------------------------------


def _grid(value: Any, path: Path, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise DataPrepError(f"{path}: {where} is not a non-empty list of rows")
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value):
        raise DataPrepError(f"{path}: {where} has empty or ragged rows")
    if len(value) > ARC_CANVAS or width > ARC_CANVAS:
        raise DataPrepError(f"{path}: {where} is {len(value)}x{width}, larger than {ARC_CANVAS}x{ARC_CANVAS}")
    if not all(type(v) is int and 0 <= v <= 9 for row in value for v in row):
        raise DataPrepError(f"{path}: {where} has a cell that is not a colour 0-9")
    return np.array(value, dtype=np.int64)


def load_task(path: Path) -> dict[str, list[Pair]]:
    """{"train": pairs, "test": pairs} of one task file, validated."""
    task = read_json(path, DataPrepError)
    if (
        not isinstance(task, dict)
        or not isinstance(task.get("train"), list)
        or not isinstance(task.get("test"), list)
    ):
        raise DataPrepError(f"{path}: expected an object with 'train' and 'test' lists")
    pairs: dict[str, list[Pair]] = {}
    for kind in ("train", "test"):
        pairs[kind] = []
        for k, example in enumerate(task[kind]):
            if not isinstance(example, dict) or "input" not in example or "output" not in example:
                raise DataPrepError(f"{path}: {kind}[{k}] needs 'input' and 'output'")
            inp = _grid(example["input"], path, f"{kind}[{k}].input")
            out = _grid(example["output"], path, f"{kind}[{k}].output")
            pairs[kind].append((inp, out))
    return pairs


def find_tasks(train_dirs: list[Path], eval_dirs: list[Path]) -> list[TaskFile]:
    """Task files under the given folders (recursively, sorted), train folders first; names must be unique."""
    tasks: list[TaskFile] = []
    seen: dict[str, Path] = {}
    for dirs, is_eval, option in ((train_dirs, False, "--from-json"), (eval_dirs, True, "--eval-json")):
        for d in dirs:
            if not d.exists():
                raise DataPrepError(f"{option} {d}: no such file or directory")
            files = [d] if d.is_file() else sorted(d.rglob("*.json"))
            if not files:
                raise DataPrepError(f"{option} {d}: no *.json task files found")
            for f in files:
                if f.stem in seen:
                    raise DataPrepError(f"task name {f.stem!r} appears twice: {seen[f.stem]} and {f}")
                seen[f.stem] = f
                tasks.append(TaskFile(len(tasks), f.stem, f, is_eval))
    return tasks


# ---- augmentation and encoding ----------------------------------------------------------------------


def content_key(pairs: list[Pair]) -> str:
    """A digest of a task's grids that ignores pair order, to spot augmentations that repeat content."""
    digests = []
    for inp, out in pairs:
        h = hashlib.sha256()
        for g in (inp, out):
            h.update(np.asarray(g.shape, dtype=np.int64).tobytes() + g.astype(np.uint8).tobytes())
        digests.append(h.hexdigest())
    return hashlib.sha256("|".join(sorted(digests)).encode()).hexdigest()


def augmentations(pairs: list[Pair], spec: Spec, rng: np.random.Generator) -> list[tuple[int, list[int]]]:
    """(dihedral id, colour perm) per variant: the identity first, then up to num_aug distinct ones."""
    variants = [(0, IDENTITY_COLOURS)]
    keys = {content_key(pairs)}
    for _ in range(spec.retries_factor * spec.num_aug):
        if len(variants) > spec.num_aug:
            break
        tid = int(rng.integers(8))
        perm = random_colour_permutation(rng)
        key = content_key(
            [(arc_augment_grid(i, tid, perm), arc_augment_grid(o, tid, perm)) for i, o in pairs]
        )
        if key not in keys:
            keys.add(key)
            variants.append((tid, perm.tolist()))
    return variants


def plan_job(job: tuple[Spec, TaskFile]) -> tuple[dict[str, list[Pair]], list[tuple[int, list[int]]]]:
    """Loads one task and chooses its variants: (pairs by kind, [(dihedral id, colour perm), ...])."""
    spec, task = job
    pairs = load_task(task.path)
    variants = augmentations(pairs["train"] + pairs["test"], spec, item_rng(spec.seed, "train", task.index))
    return pairs, variants


def encode(
    spec: Spec, task: TaskFile, pair: Pair, tid: int, perm: list[int], key: tuple, translate: bool
) -> Sample:
    """(inputs, labels, meta) of one augmented pair; the translation offset is keyed by `key` alone."""
    inp, out = arc_augment_grid(pair[0], tid, perm), arc_augment_grid(pair[1], tid, perm)
    offset = (0, 0)
    if translate:  # a random offset at which both grids fit
        rng = keyed_rng(spec.seed, _OFFSET, *key)
        offset = (
            int(rng.integers(ARC_CANVAS - max(inp.shape[0], out.shape[0]) + 1)),
            int(rng.integers(ARC_CANVAS - max(inp.shape[1], out.shape[1]) + 1)),
        )
    inputs, labels = arc_grid_to_canvas(inp, offset), arc_grid_to_canvas(out, offset)
    labels[labels == 0] = -100  # PAD: no loss
    meta = {
        "group_id": task.index,
        "task": task.name,
        "dihedral": tid,
        "colour_perm": list(perm),
        "offset": list(offset),
    }
    return inputs, labels, meta


# ---- the builder -----------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("arc", help="ARC-AGI task folders, augmented")
    add_common_arguments(p)
    p.add_argument(
        "--from-json", type=Path, nargs="+", default=[], metavar="DIR", help="training task folders"
    )
    p.add_argument(
        "--eval-json", type=Path, nargs="+", default=[], metavar="DIR", help="evaluation task folders"
    )
    p.add_argument("--num-aug", type=non_negative_int, default=0, help="augmented variants per task")
    p.add_argument("--translate", action="store_true", help="random grid offsets in the train split")
    p.add_argument(
        "--aug-retries", type=positive_int, default=5, help="draws per wanted variant before giving up"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    if not args.from_json and not args.eval_json:
        raise DataPrepError("--from-json/--eval-json: give at least one ARC task folder")
    tasks = find_tasks(args.from_json, args.eval_json)
    spec = Spec(args.seed, args.num_aug, args.aug_retries)
    plans = list(ordered_map(plan_job, [(spec, t) for t in tasks], args.workers, "arc tasks", args.quiet))

    # One entry per sample: (task, aug, pair kind, pair index, puzzle_id); ids count (task, aug) from 1.
    entries: dict[str, list[tuple[int, int, str, int, int]]] = {"train": [], "test": []}
    next_id = 1  # 0 = blank
    for task, (pairs, variants) in zip(tasks, plans):
        for aug in range(len(variants)):
            for kind in ("train", "test"):
                split = "test" if kind == "test" and task.is_eval else "train"
                entries[split] += [(task.index, aug, kind, k, next_id + aug) for k in range(len(pairs[kind]))]
        next_id += len(variants)

    writer = DatasetWriter(args.out, VOCAB_SIZE, SEQ_LEN, args.samples_per_shard, args.overwrite)
    for split in ("train", "test"):
        bar = progress(len(entries[split]), f"writing {split}", args.quiet)
        for position in write_order(args.seed, split, len(entries[split])).tolist():
            t, aug, kind, k, puzzle_id = entries[split][position]
            pairs, variants = plans[t]
            tid, perm = variants[aug]
            key = (t, aug, _KINDS[kind], k)
            inputs, labels, meta = encode(
                spec, tasks[t], pairs[kind][k], tid, perm, key, args.translate and split == "train"
            )
            writer.write(
                split, inputs, labels, {"puzzle_id": puzzle_id, "aug": aug, "pair": f"{kind}/{k}", **meta}
            )
            bar.update()
        bar.close()
    extra = {
        "train_dirs": [str(d) for d in args.from_json],
        "eval_dirs": [str(d) for d in args.eval_json],
        "tasks": sum(not t.is_eval for t in tasks),
        "eval_tasks": sum(t.is_eval for t in tasks),
        "num_aug": args.num_aug,
        "translate": args.translate,
        "tasks_with_fewer_variants": sum(len(v) < args.num_aug + 1 for _, v in plans),
        "dihedral_ids": "hrm_mega.data.augment.dihedral_transform",
    }
    return writer.finish(
        task=TASK,
        builder_version=BUILDER_VERSION,
        seed=args.seed,
        command=command,
        num_puzzle_identifiers=next_id,
        extra=extra,
    )
