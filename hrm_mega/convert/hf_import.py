"""Hugging Face import (`hrm-mega import-hf`): a Gemma 3 checkpoint directory -> an hrm-mega model directory.

Reads config.json (model_type gemma3_text, or gemma3: the multimodal model, whose SigLIP vision tower
and projector become model.vision; `--set model.vision=null` imports its text decoder alone) and the weights, from model.safetensors or from the shards listed in
model.safetensors.index.json. Pickled weights (pytorch_model.bin and the like) are refused, never
unpickled. The result is `model.safetensors` + `config.yaml` (checkpoint/model_dir.py) holding an HRMGemma
that computes exactly the Gemma 3: its gates start at zero, so `--set model.h_cycles=4` (or l_cycles)
gives the same logits until training opens them. A tokenizer.model in the directory is copied along,
and, for a model with images, Gemma 3's image processor settings (preprocessor_config.json, or the
image_processor section of processor_config.json as transformers 5 saves it) become the model
directory's preprocessor_config.json, which export-hf writes back.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hrm_mega.checkpoint.integrity import damaged_files
from hrm_mega.checkpoint.model_dir import CheckpointError, save_model_dir
from hrm_mega.config import Config, load_config
from hrm_mega.convert.hf_gemma import (
    IMAGE_PROCESSOR_FILE,
    config_from_hf,
    from_hf_state_dict,
    multimodal_state_dict,
)
from hrm_mega.data.shards import TOKENIZER_FILE, read_json

TEXT_TYPES = ("gemma3_text", "gemma3")
PROCESSOR_FILE = "processor_config.json"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, overrides: list[str] | None = None
) -> tuple[Path, Config]:
    """Converts the checkpoint in hf_dir into an hrm-mega model directory at out_dir (which must not exist
    or be empty). overrides are `--set` items applied on top of the Gemma 3 shape, e.g. model.h_cycles=2."""
    src, out = Path(hf_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not an empty directory; choose a new output directory"
        )
    hf_config = read_hf_config(src)
    if src.is_dir() and (damaged := damaged_files(src)):  # an hrm-mega export carries checksums.json
        raise CheckpointError(f"{src} is damaged: {'; '.join(damaged)}")
    config = _hrm_config(hf_config, overrides or [], src)
    hf_state = read_hf_weights(src)
    if getattr(hf_config, "model_type", "") == "gemma3":
        hf_state = multimodal_state_dict(hf_state, vision=config.model.vision is not None)
    try:
        state = from_hf_state_dict(hf_state, config.model)
    except ValueError as e:
        raise CheckpointError(f"{src}: {str(e).removeprefix('from_hf_state_dict: ')}") from None
    tokenizer = src / TOKENIZER_FILE
    files = {TOKENIZER_FILE: tokenizer} if tokenizer.is_file() else {}
    settings = image_processor_settings(src) if config.model.vision is not None else None
    with tempfile.TemporaryDirectory() as scratch:
        if settings is not None:
            files[IMAGE_PROCESSOR_FILE] = Path(scratch) / IMAGE_PROCESSOR_FILE
            files[IMAGE_PROCESSOR_FILE].write_text(json.dumps(settings, indent=2) + "\n")
        save_model_dir(state, config, out, files=files)
    return out, config


def image_processor_settings(hf_dir: Path) -> dict[str, Any] | None:
    """The image processor config of a multimodal checkpoint directory: preprocessor_config.json
    (transformers 4 layout), else the `image_processor` section of processor_config.json (transformers 5);
    None when there is neither."""
    if (hf_dir / IMAGE_PROCESSOR_FILE).is_file():
        settings = read_json(hf_dir / IMAGE_PROCESSOR_FILE, CheckpointError)
    elif (hf_dir / PROCESSOR_FILE).is_file():
        settings = read_json(hf_dir / PROCESSOR_FILE, CheckpointError)
        settings = settings.get("image_processor") if isinstance(settings, dict) else None
    else:
        return None
    if settings is not None and not isinstance(settings, dict):
        raise CheckpointError(f"{hf_dir}: its image processor config is not a JSON object")
    return settings


def read_hf_config(hf_dir: Path) -> Any:
    """The Gemma3TextConfig (or multimodal Gemma3Config) of a checkpoint directory."""
    from transformers import Gemma3Config, Gemma3TextConfig

    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such directory (expected a Hugging Face checkpoint directory)")
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; expected a Hugging Face checkpoint directory")
    raw = read_json(path, CheckpointError)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in TEXT_TYPES:
        raise CheckpointError(
            f"{path}: model_type={model_type!r} is not Gemma 3; import-hf reads gemma3_text (Gemma3ForCausalLM) "
            "or gemma3 checkpoints"
        )
    try:
        return (Gemma3TextConfig if model_type == "gemma3_text" else Gemma3Config).from_pretrained(hf_dir)
    except Exception as e:  # transformers' config validation: name what it says, in one line
        reason = " ".join(line.strip() for line in str(e).splitlines())
        raise CheckpointError(f"{path}: not a valid {model_type} config ({reason})") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{hf_dir / INDEX}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        pickled = next((name for name in PICKLED if (hf_dir / name).is_file()), None)
        if pickled is not None:
            raise CheckpointError(
                f"{hf_dir / pickled}: pickled weights are refused (loading them can run arbitrary code); "
                "convert the checkpoint to safetensors first"
            )
        raise CheckpointError(f"{hf_dir}: no {SINGLE} or {INDEX}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise CheckpointError(f"{hf_dir / INDEX} lists {name}, which does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    state[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if weight_map is not None:
        missing = next((k for k, file in weight_map.items() if k not in state), None)
        if missing is not None:
            raise CheckpointError(
                f"{hf_dir / weight_map[missing]}: missing tensor {missing} listed in {INDEX}"
            )
    return state


def _hrm_config(hf_config: Any, overrides: list[str], src: Path) -> Config:
    """The Gemma 3 shape as an hrm-mega config (h_cycles = l_cycles = 1), then the user's overrides."""
    try:
        model = config_from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{src / 'config.json'}: {str(e).removeprefix('config_from_hf: ')}") from None
    shape = [f"model.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(model).items()]
    return load_config(None, [*shape, *overrides])
