"""Weight-only quantization of HRMGemma with torchao (int8, int4), in place.

    model = quantize_model(model, "int8")   # or "int4"; returns the model

Schemes (torchao's IntxWeightOnlyConfig; every nn.Linear and the token embedding, which is also the tied
LM head, are quantized; norms, gates and halting heads stay in floating point):
- int8: symmetric int8 per output row (PerAxis(0));
- int4: int4 in groups of 32 input features (PerGroup(32)), one scale and zero point per group.

Why these: with torch 2.13.0 on CPU, torchao 0.18's packed int4 tensors do not run (Int4WeightOnlyConfig:
"plain" needs the CUDA-only mslk kernels, "tile_packed_to_4d" wants bfloat16 and CUDA, "plain_int32" has
no CPU support), so int4 values are computed as IntxUnpackedToInt8Tensor, one value per int8 byte in
memory; the quantized model directory (checkpoint/quantized.py) stores two per byte. IntxUnpackedToInt8Tensor
serializes to safetensors through torchao's flatten_tensor_state_dict, the format transformers'
TorchAoHfQuantizer reads, so the Hugging Face export (convert/quantize.py) carries the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8", "int4")
INT4_GROUP = 32


class QuantizeError(ValueError):
    """A model or directory that cannot be quantized or read as asked; the message is one line."""


def torchao_config(scheme: str):  # -> torchao AOBaseConfig
    try:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise QuantizeError(f"quantization needs torchao ({e}): pip install 'hrm-mega[quantize]'") from None
    if scheme == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if scheme == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    raise QuantizeError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _quantizable(module: nn.Module, fqn: str) -> bool:
    return type(module) in (nn.Linear, nn.Embedding)


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantizes `model`'s Linear and Embedding weights in place (module docstring); returns it."""
    from torchao.quantization import quantize_

    config = torchao_config(scheme)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding) and not _quantizable(module, name):
            raise QuantizeError(
                f"{name} is a {type(module).__name__}; quantize a single-process model (TP=1)"
            )
        if _quantizable(module, name) and module.weight.shape[-1] % INT4_GROUP and scheme == "int4":
            raise QuantizeError(
                f"{name} has {module.weight.shape[-1]} input features, not a multiple of the int4 group "
                f"size {INT4_GROUP}"
            )
    quantize_(model, config, filter_fn=_quantizable)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held (quantized tensors count their data, scales and zero
    points); RoPE tables, which are recomputed, excluded."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".cos", ".sin"))}
    flat, _ = flatten_tensor_state_dict(state)
    return sum(t.numel() * t.element_size() for t in flat.values())
