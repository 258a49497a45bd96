"""The quantized model directory (`hrm-mega quantize`): what `serve`, `generate` and `eval` load.

    save_quantized(model, config, "out/", scheme="int8", tokenizer=...)   # model quantized in place before
    model, config = load_quantized("out/")

model.safetensors holds torchao's flattened tensors (flatten_tensor_state_dict; int4 qdata packed two
values per byte), its metadata torchao's plus `format: hrm-mega/quantized/N`, the scheme and the packed
keys; config.yaml and the tokenizer sit beside it, with checksums. Reading never unpickles anything, and
a newer format version is refused with one line. `load_quantized(dir, pack_int4=True)` holds int4 Linear
weights two values per byte in memory too (models/quantize.py: pack_int4_linears).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hrm_mega.checkpoint.integrity import damaged_files, write_checksums
from hrm_mega.checkpoint.model_dir import CONFIG, WEIGHTS, CheckpointError, format_version, read_safetensors
from hrm_mega.config import Config, ConfigError, load_config, save_resolved
from hrm_mega.models.quantize import SCHEMES, pack_int4_linears, quantize_model

QUANTIZED_FORMAT = 1
QUANTIZED_TAG = f"hrm-mega/quantized/{QUANTIZED_FORMAT}"


def save_quantized(
    model: nn.Module, config: Config, out_dir: str | Path, scheme: str, tokenizer: str | Path | None = None
) -> Path:
    """Writes a quantized model directory (module docstring) and its checksums."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".cos", ".sin"))}
    flat, meta = flatten_tensor_state_dict(state)
    packed = []
    if scheme == "int4":
        for key in [k for k in flat if k.endswith("_weight_qdata")]:
            flat[key] = pack_int4(flat[key])
            packed.append(key)
    meta = {**meta, "format": QUANTIZED_TAG, "scheme": scheme, "packed_int4": json.dumps(packed)}
    save_file({k: v.contiguous() for k, v in flat.items()}, out / WEIGHTS, metadata=meta)
    save_resolved(config, out / CONFIG)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    write_checksums(out)
    return out


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / WEIGHTS).is_file()):
        return False
    return read_safetensors_metadata(p / WEIGHTS).get("format", "").startswith("hrm-mega/quantized/")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable: the regular reader reports it
        return {}


def load_quantized(model_dir: str | Path, pack_int4: bool = False) -> tuple[nn.Module, Config]:
    """The quantized model of a directory written by save_quantized, and its config. pack_int4: hold
    int4 Linear weights two values per byte (models/quantize.py: pack_int4_linears; CPU only, and on
    an AVX2 CPU in fp32 its matmul is far slower than the unpacked one, so it is opt-in)."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from hrm_mega.models import build_model

    d = Path(model_dir)
    if damaged := damaged_files(d):
        raise CheckpointError(f"{d} is damaged: {'; '.join(damaged)}")
    try:
        config = load_config(d / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    flat, meta = read_safetensors(d / WEIGHTS)
    format_version(meta.get("format"), "quantized", QUANTIZED_FORMAT, d / WEIGHTS)
    scheme = meta.get("scheme", "")
    if scheme not in SCHEMES:
        raise CheckpointError(f"{d / WEIGHTS}: unknown quantization scheme {scheme!r}")
    for key in json.loads(meta.get("packed_int4", "[]")):
        flat[key] = unpack_int4(flat[key])
    torchao_meta = {k: v for k, v in meta.items() if k not in ("format", "scheme", "packed_int4")}
    state, leftover = unflatten_tensor_state_dict(flat, torchao_meta)
    if leftover:
        raise CheckpointError(f"{d / WEIGHTS}: tensors of no parameter, e.g. {sorted(leftover)[0]}")
    model = quantize_model(build_model(config.model), scheme)
    expected = {k for k in model.state_dict() if not k.endswith((".cos", ".sin"))}
    if missing := sorted(expected - set(state)):
        raise CheckpointError(f"{d / WEIGHTS}: missing key {missing[0]} ({len(missing)} missing in all)")
    if unexpected := sorted(set(state) - expected):
        raise CheckpointError(f"{d / WEIGHTS}: unexpected key {unexpected[0]}")
    model.load_state_dict(state, strict=False, assign=True)
    if pack_int4 and scheme == "int4":
        pack_int4_linears(model)
    return model.eval(), config


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] [..., k] (k even) -> uint8 [..., k/2], two values per byte."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse."""
    low, high = (p & 0xF).to(torch.int8), (p >> 4).to(torch.int8)
    out = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(out > 7, out - 16, out)
