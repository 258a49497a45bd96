"""Deterministic WebDataset shard writing and manifest handling.

The on-disk layout is documented in docs/data_format.md. Tar headers carry fixed metadata (mtime 0,
uid/gid 0, no user names) so that the same samples always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "hrm-mega/1"
SHARD_PATTERN = "shard-%06d.tar"
TOKENIZER_FILE = "tokenizer.model"  # a text dataset's SentencePiece model, next to manifest.json


class DataFormatError(ValueError):
    """A dataset directory, manifest or shard that does not follow docs/data_format.md."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples, "sha256": self.sha256}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_member(value: Any) -> tuple[str, bytes]:
    """Returns (extension, bytes) for one sample field: numpy arrays as .npy, everything else as .json."""
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return "npy", buffer.getvalue()
    return "json", json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class ShardWriter:
    """Writes samples into `split_dir/shard-%06d.tar`, `samples_per_shard` samples per shard.

    Sample keys are `%09d`, counting from `first_key`; shard numbers count from `first_shard`. Those two
    offsets let several processes write disjoint, deterministic parts of one split in parallel.
    """

    def __init__(
        self, split_dir: str | Path, samples_per_shard: int, first_shard: int = 0, first_key: int = 0
    ) -> None:
        if samples_per_shard < 1:
            raise DataFormatError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.next_shard = first_shard
        self.next_key = first_key
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Writes one sample: a dict of field name -> numpy array or JSON-serialisable value, or bytes
        written as they are under a name that carries its extension (an encoded image: "img0.png")."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        key = f"{self.next_key:09d}"
        for field in sorted(sample):
            if isinstance(sample[field], bytes):
                name, payload = f"{key}.{field}", sample[field]
            else:
                ext, payload = encode_member(sample[field])
                name = f"{key}.{field}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self.next_key += 1
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        self._path = self.split_dir / (SHARD_PATTERN % self.next_shard)
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _finish)
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        self.shards.append(ShardInfo(self._path.name, self._count, sha256_file(self._path)))
        self._tar, self._path = None, None
        self.next_shard += 1


def write_manifest(
    out_dir: str | Path,
    *,
    task: str,
    builder_version: str,
    seed: int,
    command: str,
    vocab_size: int,
    seq_len: int,
    num_puzzle_identifiers: int,
    splits: dict[str, list[ShardInfo]],
    num_groups: dict[str, int] | None = None,
    pad_id: int = 0,
    ignore_label_id: int = -100,
    extra: dict[str, Any] | None = None,
    top_level: dict[str, Any] | None = None,
) -> Path:
    """Writes `out_dir/manifest.json` describing the given splits (plus a task's own `top_level` fields,
    e.g. a text dataset's tokenizer and special ids) and returns its path. Written to a temporary file
    and renamed: a half-built dataset has no manifest."""
    manifest = {
        "format": FORMAT,
        "task": task,
        "builder_version": builder_version,
        "seed": seed,
        "command": command,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_puzzle_identifiers": num_puzzle_identifiers,
        "pad_id": pad_id,
        "ignore_label_id": ignore_label_id,
        "splits": {
            name: {
                "num_samples": sum(s.num_samples for s in shards),
                "num_groups": (num_groups or {}).get(name, sum(s.num_samples for s in shards)),
                "shards": [s.to_json() for s in shards],
            }
            for name, shards in splits.items()
        },
        "extra": extra or {},
        **(top_level or {}),
    }
    manifest["sha256"] = manifest_digest(manifest)
    path = Path(out_dir) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's fields but its own "sha256": a flipped bit in manifest.json is found."""
    fields = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def read_json(path: Path, error: type[Exception], required: Sequence[str] = ()) -> Any:
    """The JSON value in `path` (UTF-8), holding every key in `required`; else `error` with one line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text (damaged?)") from None
    missing = [k for k in required if k not in value]
    if missing:
        raise error(f"{path}: missing field(s) {', '.join(missing)}")
    return value


_REQUIRED_KEYS = ("format", "task", "vocab_size", "seq_len", "num_puzzle_identifiers", "splits")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Reads and checks `data_dir/manifest.json`; raises DataFormatError with a one-line message."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataFormatError(f"{path}: no manifest.json; build the dataset with `hrm-mega prep ...` first")
    manifest = read_json(path, DataFormatError, _REQUIRED_KEYS)
    if "sha256" in manifest and manifest["sha256"] != manifest_digest(manifest):  # absent: an older dataset
        raise DataFormatError(f"{path} is damaged: its fields no longer match the sha256 written with them")
    if manifest["format"] != FORMAT:
        raise DataFormatError(f"{path}: format {manifest['format']!r} is not {FORMAT!r}")
    return manifest


def split_shards(
    data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None, check_files: bool = True
) -> list[Path]:
    """Paths of the shards of one split, in manifest order; each must exist (with check_files)."""
    manifest = manifest or read_manifest(data_dir)
    if split not in manifest["splits"]:
        known = ", ".join(sorted(manifest["splits"]))
        raise DataFormatError(f"{data_dir}: no split {split!r} in manifest.json (has: {known})")
    paths = [Path(data_dir) / split / s["name"] for s in manifest["splits"][split]["shards"]]
    for p in paths if check_files else ():
        if not p.is_file():
            raise DataFormatError(f"{p}: shard listed in manifest.json is missing")
    return paths


def verify_shards(data_dir: str | Path, split: str) -> None:
    """Checks every shard of `split` against the sha256 recorded in the manifest."""
    manifest = read_manifest(data_dir)
    paths = split_shards(data_dir, split, manifest)  # checks that the split exists
    for entry, path in zip(manifest["splits"][split]["shards"], paths):
        if sha256_file(path) != entry["sha256"]:
            raise DataFormatError(f"{path}: sha256 does not match manifest.json (corrupt or modified shard)")


def dataset_tokenizer(data_dir: str | Path, manifest: dict[str, Any] | None = None) -> Path | None:
    """data_dir/tokenizer.model, checked against the sha256 that `prep text` recorded in the manifest
    (extra.tokenizer_sha256); None when the dataset has no tokenizer."""
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    expected = manifest.get("extra", {}).get("tokenizer_sha256")
    if expected and sha256_file(path) != expected:
        raise DataFormatError(f"{path} is damaged: its sha256 differs from the one manifest.json recorded")
    return path
