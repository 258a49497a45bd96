"""Checkpoints: DeepSpeed engine state plus our client state, published atomically.

Layout of `RUN/checkpoints/`:

    step-00000100/                  one complete checkpoint
        mp_rank_00_model_states.pt  ... DeepSpeed's files (module, optimizer, ZeRO partitions)
        client/rank-00000.json      step, loader state, resolved config, counters (one per rank)
        client/rank-00000.safetensors  ACT carry and current rows, RNG state, EMA weights
        universal/tp00-pp00.safetensors  full weights, Adam moments, EMA by model name (any layout)
        tokenizer.model             the dataset's tokenizer, when it has one (generate and export need it)
        checksums.json              size and sha256 of every other file, written last
    latest                          the name of the newest complete checkpoint
    .staging/                       a checkpoint being written

A checkpoint is written into `.staging/`, then renamed into place, and only then does `latest` change
(write a temp file, `os.replace`). A run killed at any moment leaves `latest` naming a complete
checkpoint. Our client state is JSON and safetensors only; DeepSpeed's own files are written and read by
DeepSpeed (they contain pickles, so only load checkpoints you or your cluster wrote).

Format version: every rank's client JSON says `"format": "hrm-mega/checkpoint/N"` (the layout of this
directory and of the client state), and the universal/ files `hrm-mega/universal/N` in their metadata.
A reader refuses an N newer than it knows with one line, and reads a checkpoint without one (written
before versions were recorded, in the same layout) as version 1, saying so in one line
(`check_checkpoint_format`).

A file damaged after publication (a truncated copy, a flipped bit on disk) is found by its checksum
before anything reads it: `--resume auto` then takes the newest intact checkpoint, or the damaged one's
layout-free copy when only DeepSpeed's files are hit, and says so in one line (`pick_intact`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hrm_mega.checkpoint.integrity import damaged_files, file_digests, write_checksums
from hrm_mega.checkpoint.model_dir import CheckpointError, format_version
from hrm_mega.checkpoint.universal import UNIVERSAL

STAGING, LATEST = ".staging", "latest"
CHECKPOINT_FORMAT = 1  # the newest `hrm-mega/checkpoint/N` this code writes and reads
CHECKPOINT_TAG = f"hrm-mega/checkpoint/{CHECKPOINT_FORMAT}"
_migration_noted: set[Path] = set()  # checkpoints this process has already said it reads as version 1


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, rank: int, keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep = rank, keep

    # --- writing -------------------------------------------------------------------------------

    def save(
        self,
        engine: Any,
        step: int,
        client: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        write_universal: Callable[[Path], None] | None = None,
        files: dict[str, Path] | None = None,
    ) -> Path:
        """Collective: every rank calls it. write_universal(dir) adds the layout-free copy
        (checkpoint/universal.py); `files` are copied in under their names (rank 0). Returns the
        published checkpoint directory."""
        tag, staging = tag_for(step), self.root / STAGING
        if self.rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        if write_universal is not None:
            write_universal(staging / tag / UNIVERSAL)
        client_dir = staging / tag / "client"
        client_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank-{self.rank:05d}"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, client_dir / f"{name}.safetensors"
        )
        (client_dir / f"{name}.json").write_text(
            json.dumps({**client, "format": CHECKPOINT_TAG}, sort_keys=True)
        )
        if self.rank == 0:
            for target, source in (files or {}).items():
                shutil.copyfile(source, staging / tag / target)
        fault_point("checkpoint-staged")
        _barrier()
        digests = file_digests(staging / tag)  # every rank hashes its share
        final = self.root / tag
        if self.rank == 0:
            write_checksums(staging / tag, digests)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging / tag, final)
            _write_atomic(self.root / LATEST, tag)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # --- reading -------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def published(self) -> list[Path]:
        """The complete checkpoints, newest first: `latest` and the older ones still kept."""
        newest = self.latest()
        if newest is None:
            return []
        older = sorted(
            (p for p in self.root.glob("step-*") if p.is_dir() and p.name < newest.name), reverse=True
        )
        return [newest, *older]

    def load(self, engine: Any, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Loads engine state (DeepSpeed's files: same layout only) and this rank's client state."""
        path = Path(path)
        client = read_client_state(path, self.rank)
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        return client


def read_client_state(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The client state (JSON, tensors) that `rank` saved into checkpoint `path`."""
    name = f"rank-{rank:05d}"
    client_json = path / "client" / f"{name}.json"
    client_tensors = path / "client" / f"{name}.safetensors"
    if not client_json.is_file() or not client_tensors.is_file():
        raise CheckpointError(f"{path}: no client state for rank {rank}; the checkpoint is incomplete")
    client = json.loads(client_json.read_text())
    check_checkpoint_format(client, path)
    return client, load_file(client_tensors)


def check_checkpoint_format(client: dict[str, Any], path: Path) -> int:
    """The format version of training checkpoint `path` from a rank's client state: one line refuses a
    newer one; one without (written before versions were recorded) is read as version 1, which this
    process says once per checkpoint (on global rank 0)."""
    tag = client.get("format")
    if tag is not None:
        return format_version(tag, "checkpoint", CHECKPOINT_FORMAT, path)
    if path not in _migration_noted:
        _migration_noted.add(path)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(
                f"note: {path} records no format version (written before versions were recorded); "
                f"reading it as {CHECKPOINT_TAG}",
                file=sys.stderr,
            )
    return 1


def resolve_resume(spec: str | None, manager: CheckpointManager) -> list[Path]:
    """The checkpoints `--resume` may continue from, in order of preference: auto -> the complete ones,
    newest first (none: start fresh); a path -> that checkpoint; none -> []."""
    if not spec or spec == "none":
        return []
    if spec == "auto":
        return manager.published()
    path = Path(spec)
    if path.is_dir() and (path / LATEST).is_file():  # a checkpoints/ directory: take its latest
        path = path / (path / LATEST).read_text().strip()
    if not (path / "client").is_dir():
        raise CheckpointError(f"--resume {spec}: not a checkpoint directory (no client/ inside)")
    return [path]


@dataclass(frozen=True)
class Resume:
    path: Path
    layout_free: bool  # only DeepSpeed's files are damaged: load the universal/ copy instead
    notes: tuple[str, ...]  # one line per damaged checkpoint passed over


def pick_intact(candidates: list[Path], explicit: bool) -> Resume | None:
    """The first candidate whose files match their checksums (collective: every rank hashes a share).
    A candidate whose damage is confined to DeepSpeed's files resumes from its layout-free copy. An
    explicit checkpoint must be intact; with none intact, a one-line CheckpointError lists why."""
    notes: list[str] = []
    for path in candidates:
        damaged = damaged_files(path)
        if not damaged:
            return Resume(path, False, tuple(notes))
        deepspeed_only = all(f.split(":")[0].endswith(".pt") for f in damaged)  # DeepSpeed writes *.pt
        if deepspeed_only and (path / UNIVERSAL).is_dir():
            notes.append(f"{path} is damaged ({damaged[0]}); resuming from its layout-free copy {UNIVERSAL}/")
            return Resume(path, True, tuple(notes))
        if explicit:
            raise CheckpointError(f"{path} is damaged: {'; '.join(damaged)}")
        notes.append(f"{path} is damaged ({'; '.join(damaged)}); trying the next older checkpoint")
    if notes:
        raise CheckpointError(
            f"no intact checkpoint to resume: {' | '.join(n.split('; trying')[0] for n in notes)}; "
            "restore a copy, or start over with --resume none"
        )
    return None


def fault_point(name: str) -> None:
    """Fault injection for crash tests: HRM_MEGA_FAULT=<name> kills this process here with SIGKILL."""
    if os.environ.get("HRM_MEGA_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
