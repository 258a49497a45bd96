"""Integrity of what hrm-mega writes: a checksums.json beside the files of a checkpoint or model
directory, and a digest of the tensors inside a single .safetensors file's metadata.

A truncated copy or a flipped bit on disk is then found before anything reads the file, and reported in
one line naming it, instead of a loader's traceback or, worse, silently different weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from hrm_mega.data.shards import sha256_file

CHECKSUMS = "checksums.json"


def file_digests(directory: Path) -> dict[str, list[Any]]:
    """{relative path: [size, sha256]} of every file under `directory` but checksums.json. Collective when
    a process group is up: rank r hashes every world-th file, and every rank gets the whole table."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    rank, world = _rank_and_world()
    mine = {
        p.relative_to(directory).as_posix(): [p.stat().st_size, sha256_file(p)]
        for i, p in enumerate(files)
        if i % world == rank
    }
    if world == 1:
        return mine
    shares: list[Any] = [None] * world
    torch.distributed.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in share.items()}


def write_checksums(directory: Path, digests: dict[str, list[Any]] | None = None) -> None:
    """Writes directory/checksums.json (from `digests` when the caller has them already), with a digest
    of its own list, so that damage to the list itself is told apart from damage to a file."""
    digests = file_digests(directory) if digests is None else digests
    record = {"files": digests, "sha256": _list_digest(digests)}
    (directory / CHECKSUMS).write_text(json.dumps(record, indent=0, sort_keys=True))


def _list_digest(digests: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def damaged_files(directory: Path) -> list[str]:
    """The files of `directory` that differ from its checksums.json, as "FILE: why" (collective like
    file_digests); [] when all match, or when the directory has no checksums.json (written before them)."""
    listed = directory / CHECKSUMS
    if not listed.is_file():
        return []
    try:
        record = json.loads(listed.read_text())
        expected = record["files"]
        assert isinstance(expected, dict) and record["sha256"] == _list_digest(expected)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        return [f"{CHECKSUMS}: damaged itself (not the list that was written)"]
    actual = file_digests(directory)
    damaged = []
    for name, entry in sorted(expected.items()):
        size, digest = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if name not in actual:
            damaged.append(f"{name}: missing")
        elif actual[name][0] != size:
            damaged.append(f"{name}: {actual[name][0]} bytes, {size} when written")
        elif actual[name][1] != digest:
            damaged.append(f"{name}: its sha256 differs from when it was written")
    return damaged


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict, in name order: what a single
    .safetensors file keeps in its metadata to find damage to its data."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
