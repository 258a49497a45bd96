"""A self-contained model directory: `model.safetensors` (full fp32 state dict) + `config.yaml`.

This is what `hrm-mega import-hrm` writes and what consolidation of a sharded training checkpoint
produces. Loading reads safetensors only, so no pickled code is ever executed.

Format versions: the weights' metadata says `format: hrm-mega/model/N` (consolidated .safetensors files
too). A reader refuses an N newer than MODEL_FORMAT with one line, and reads a file without one (written
before versions were recorded) as version 1, saying so once.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hrm_mega.checkpoint.integrity import damaged_files, write_checksums
from hrm_mega.config import Config, ConfigError, load_config, save_resolved
from hrm_mega.data.shards import TOKENIZER_FILE, dataset_tokenizer
from hrm_mega.models import build_model

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
MODEL_FORMAT = 1  # the newest `hrm-mega/model/N` this code writes and reads
FORMAT_TAG = f"hrm-mega/model/{MODEL_FORMAT}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its model; the message is one line."""


def save_model_dir(
    state_dict: dict[str, torch.Tensor],
    config: Config,
    out_dir: str | Path,
    files: dict[str, Path] | None = None,
) -> Path:
    """Writes model.safetensors, config.yaml, the `files` (e.g. the tokenizer) under their names, and the
    checksums of them all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": FORMAT_TAG})
    save_resolved(config, out / CONFIG)
    for name, source in (files or {}).items():
        shutil.copyfile(source, out / name)
    write_checksums(out)
    return out


def load_model_dir(model_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """Builds the model described by `config.yaml` and loads `model.safetensors` into it, strictly."""
    state, config = read_model_dir(model_dir)
    model = build_model(config.model)
    load_state_dict_strict(model, state, source=str(Path(model_dir) / WEIGHTS))
    return model, config


def read_model_dir(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The full weights of `model.safetensors` and the config of `config.yaml`, checked for damage."""
    d = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: missing {name}; expected a directory written by hrm-mega")
    if damaged := damaged_files(d):
        raise CheckpointError(f"{d} is damaged: {'; '.join(damaged)}")
    try:
        config = load_config(d / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    state, meta = read_safetensors(d / WEIGHTS)
    check_format(meta, d / WEIGHTS)
    return state, config


def check_format(meta: dict[str, str], source: str | Path) -> int:
    """The format version of hrm-mega weights from their safetensors metadata; refuses a newer one."""
    tag = meta.get("format")
    if tag is None or tag == "pt":  # written before versions were recorded: read as version 1
        print(f"note: {source} records no format version; reading it as {FORMAT_TAG}", file=sys.stderr)
        return 1
    return format_version(tag, "model", MODEL_FORMAT, source)


def format_version(tag: str | None, kind: str, newest: int, source: str | Path) -> int:
    """N of an `hrm-mega/{kind}/N` format tag; one line for another kind or an N newer than `newest`."""
    match = re.fullmatch(rf"hrm-mega/{kind}/(\d+)", tag or "")
    if match is None:
        raise CheckpointError(
            f"{source}: format {tag!r} is not an hrm-mega {kind} (hrm-mega/{kind}/{newest})"
        )
    version = int(match.group(1))
    if version > newest:
        raise CheckpointError(
            f"{source}: format version {version} is newer than this hrm-mega reads ({newest}); "
            "upgrade hrm-mega to load it"
        )
    return version


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads with exact key and shape checks, naming the first offending key in a one-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected in all)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def tokenizer_for(checkpoint: str | Path, config: Config) -> Path | None:
    """The SentencePiece model that goes with a checkpoint: the copy inside it (training checkpoints of
    text runs and model directories carry one), else the one in the config's data.path. None for puzzle
    models, or when neither exists."""
    if config.model.family != "hrm_gemma":
        return None
    own = Path(checkpoint) / TOKENIZER_FILE
    if own.is_file():
        return own
    if not config.data.path:
        return None
    data = Path(config.data.path)
    if (data / "manifest.json").is_file():
        return dataset_tokenizer(data)  # checked against the sha256 the manifest recorded
    return data / TOKENIZER_FILE if (data / TOKENIZER_FILE).is_file() else None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a .safetensors file; a truncated or garbled file is one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})"
        ) from None
