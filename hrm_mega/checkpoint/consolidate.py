"""Consolidation: a (possibly ZeRO-sharded, TP- or PP-split) training checkpoint -> one full fp32 state dict.

Checkpoints carry a layout-free copy (universal/, checkpoint/universal.py) that is read whatever the
layout. For checkpoints written before it existed: ZeRO stages 0-2 keep full module weights in `mp_rank_00_model_states.pt`, which loads with
`torch.load(weights_only=True)`. Stage 3 partitions parameters; DeepSpeed's zero_to_fp32 merges the
partitions, and the buffers (puzzle-embedding table, H_init/L_init) come from the module states file.
The output is a safetensors file whose metadata carries the resolved config, so it is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from hrm_mega.checkpoint.atomic import check_checkpoint_format
from hrm_mega.checkpoint.integrity import damaged_files, tensors_digest
from hrm_mega.checkpoint.model_dir import (
    CONFIG,
    FORMAT_TAG,
    WEIGHTS,
    CheckpointError,
    check_format,
    load_state_dict_strict,
    read_safetensors,
)
from hrm_mega.checkpoint.universal import UNIVERSAL, UniversalCheckpoint
from hrm_mega.config import Config, config_from_dict
from hrm_mega.models import build_model

MODEL_STATES = "mp_rank_00_model_states.pt"


def checkpoint_config(checkpoint: Path) -> Config:
    client = checkpoint / "client" / "rank-00000.json"
    if not client.is_file():
        raise CheckpointError(
            f"{checkpoint}: not an hrm-mega training checkpoint (no client/rank-00000.json)"
        )
    state = json.loads(client.read_text())
    check_checkpoint_format(state, checkpoint)
    return config_from_dict(state["config"]).validate()


def consolidate_checkpoint(
    checkpoint: str | Path, use_ema: bool = True
) -> tuple[dict[str, torch.Tensor], Config]:
    """Full fp32 weights and buffers. With EMA enabled in the run, its weights replace the raw ones
    (they are what the run evaluated), unless use_ema=False."""
    checkpoint = Path(checkpoint)
    damaged = damaged_files(checkpoint)
    if damaged and not (
        all(f.split(":")[0].endswith(".pt") for f in damaged) and (checkpoint / UNIVERSAL).is_dir()
    ):
        raise CheckpointError(
            f"{checkpoint} is damaged: {'; '.join(damaged)}"
        )  # DeepSpeed's *.pt alone: unread
    config = checkpoint_config(checkpoint)
    if (checkpoint / UNIVERSAL).is_dir():  # any TP/PP/DP layout and ZeRO stage
        ema = use_ema and config.optim.ema_decay > 0
        return UniversalCheckpoint(checkpoint / UNIVERSAL).state_dict(use_ema=ema), config
    states_file = checkpoint / MODEL_STATES
    if not states_file.is_file():
        raise CheckpointError(f"{checkpoint}: missing {MODEL_STATES}; the checkpoint is incomplete")
    states = torch.load(states_file, map_location="cpu", weights_only=True)
    module = states["module"]
    if config.parallel.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        params = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        buffers = {k: module[k] for k in states.get("buffer_names", []) if k in module}
        module = {**buffers, **params}
    state = {k: v.float().contiguous() for k, v in module.items()}
    client_tensors = checkpoint / "client" / "rank-00000.safetensors"
    if use_ema and config.optim.ema_decay > 0 and client_tensors.is_file():
        with safe_open(str(client_tensors), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.startswith("ema."):
                    state[key[len("ema.") :]] = f.get_tensor(key).float()
    return state, config


def save_consolidated(state: dict[str, torch.Tensor], config: Config, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT_TAG, "config": config.to_yaml(), "sha256": tensors_digest(state)}
    save_file(state, out, metadata=metadata)
    return out


def load_model(path: str | Path) -> tuple[torch.nn.Module, Config]:
    """Loads a model from a training checkpoint, a model directory (also a quantized one: hrm-mega
    quantize), or a consolidated .safetensors file."""
    if Path(path).is_dir() and (Path(path) / WEIGHTS).is_file():
        from hrm_mega.checkpoint.quantized import is_quantized_dir, load_quantized

        if is_quantized_dir(path):
            return load_quantized(path)
        from hrm_mega.checkpoint.model_dir import load_model_dir

        return load_model_dir(path)
    state, config = load_state(path)
    model = build_model(config.model)
    load_state_dict_strict(model, state, source=str(path))
    return model, config


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The full fp32 weights (by the single-process model's names) and the config of what load_model
    reads, without building the model: a caller under tensor or pipeline parallelism takes its share."""
    path = Path(path)
    if path.is_dir() and (path / "client").is_dir():
        state, config = consolidate_checkpoint(path)
    elif path.is_dir() and (path / WEIGHTS).is_file():
        from hrm_mega.checkpoint.model_dir import read_model_dir

        return read_model_dir(path)
    elif path.is_file() and path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        check_format(meta, path)
        if "config" not in meta:
            raise CheckpointError(
                f"{path}: no config in its metadata; was it written by hrm-mega consolidate?"
            )
        if "sha256" in meta and tensors_digest(state) != meta["sha256"]:
            raise CheckpointError(f"{path} is damaged: its tensors' sha256 differs from when it was written")
        try:
            config = config_from_dict(yaml.safe_load(meta["config"])).validate()
        except (yaml.YAMLError, ValueError) as e:
            raise CheckpointError(
                f"{path}: the config in its metadata is damaged ({str(e).splitlines()[0]})"
            ) from None
    else:
        raise CheckpointError(
            f"{path}: expected a training checkpoint (step-*/), a model directory ({WEIGHTS} + {CONFIG}) "
            "or a .safetensors file from hrm-mega consolidate"
        )
    return state, config
