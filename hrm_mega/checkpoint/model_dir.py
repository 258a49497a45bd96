"""A self-contained model directory: `model.safetensors` (full fp32 state dict) + `config.yaml`.

This is what `hrm-mega import-hrm` writes and what consolidation of a sharded training checkpoint
produces. Loading reads safetensors only, so no pickled code is ever executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hrm_mega.config import Config, ConfigError, load_config, save_resolved
from hrm_mega.models import build_model

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its model; the message is one line."""


def save_model_dir(state_dict: dict[str, torch.Tensor], config: Config, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": "hrm-mega/model/1"})
    save_resolved(config, out / CONFIG)
    return out


def load_model_dir(model_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """Builds the model described by `config.yaml` and loads `model.safetensors` into it, strictly."""
    d = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: missing {name}; expected a directory written by hrm-mega")
    try:
        config = load_config(d / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    model = build_model(config.model)
    load_state_dict_strict(model, load_file(d / WEIGHTS), source=str(d / WEIGHTS))
    return model, config


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
