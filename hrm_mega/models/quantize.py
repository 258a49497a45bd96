"""Weight-only quantization of HRMGemma with torchao (int8, int4), in place.

    model = quantize_model(model, "int8")   # or "int4"; returns the model

Schemes (torchao's IntxWeightOnlyConfig; every nn.Linear, the halting and value heads included, and the
token embedding, which is also the tied LM head, are quantized; norms and gates stay in floating point):
- int8: symmetric int8 per output row (PerAxis(0));
- int4: int4 in groups of 32 input features (PerGroup(32)), one scale and zero point per group.

Why these: IntxUnpackedToInt8Tensor (one int4 value per int8 byte) serializes to safetensors through
torchao's flatten_tensor_state_dict, the format transformers' TorchAoHfQuantizer reads, so the quantized
model directory (checkpoint/quantized.py, which stores two int4 values per byte) and the Hugging Face
export (convert/quantize.py) carry the same tensors.

int4 in memory on CPU (`pack_int4_linears`): torchao 0.18's packed int4 tensors of its stable API do not
run on this CPU with torch 2.13.0 (Int4WeightOnlyConfig: "plain" and "preshuffled" need the CUDA-only
mslk kernels, "tile_packed_to_4d" wants CUDA, "plain_int32" has no CPU support; IntxWeightOnlyConfig
takes no packed format, and the opaque ones of Int8DynamicActivationIntxWeightConfig need KleidiAI or
torchao's C++ kernels, and quantize activations). Its prototype Int4OpaqueTensor does: two values per
byte, laid out for ATen's CPU int4 kernel (_weight_int4pack_mm_for_cpu), with an fp32 scale and offset
per group. `pack_int4_linears` (load_quantized(pack_int4=True)) replaces every int4 Linear weight by an
Int4OpaqueTensor made from the same values: w = q * scale exactly as before (symmetric, zero point 0),
only the matmul kernel differs. The token embedding, looked up by index and read by the tied head, stays
unpacked. It is opt-in: on this AVX2 CPU, ATen's int4 kernel in fp32 is 14x slower than dequantize +
GEMM for 8 rows and 40x for 1024 (bf16: 2.5x and 2x), so it trades speed for resident bytes.
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


def pack_int4_linears(model: nn.Module) -> int:
    """Replaces every int4 Linear weight on the CPU (IntxUnpackedToInt8Tensor, groups of INT4_GROUP,
    zero point 0: what quantize_model makes) by torchao's Int4OpaqueTensor holding the same values two
    per byte (module docstring); returns how many. Other weights are left as they are."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    packed = 0
    for module in model.modules():
        w = module.weight if type(module) is nn.Linear else None
        if not (isinstance(w, IntxUnpackedToInt8Tensor) and w.target_dtype == torch.int4):
            continue
        if w.device.type != "cpu" or tuple(w.block_size) != (1, INT4_GROUP) or bool(w.zero_point.any()):
            continue
        if w.shape[0] % 16:  # ATen's CPU int4 layout takes output features in multiples of 16
            continue
        # ATen's layout: unsigned values u = q + 8 in [0, 15], dequantized as (u - 8) * scale + offset
        unsigned = w.qdata.to(torch.int32) + 8
        scale = w.scale.float()
        weight = Int4OpaqueTensor(
            qdata=torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1),
            scale_and_zero=pack_tinygemm_scales_and_zeros(scale, torch.zeros_like(scale), torch.float32),
            block_size=[1, INT4_GROUP],
            shape=w.shape,
        )
        module.weight = nn.Parameter(weight, requires_grad=False)
        packed += 1
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held (quantized tensors count their data, scales and zero
    points, packed or not); RoPE tables, which are recomputed, excluded."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".cos", ".sin"))}
    return sum(_held_bytes(t) for t in state.values())


def _held_bytes(t: torch.Tensor) -> int:
    """A plain tensor's bytes, or the sum over a torchao tensor's inner tensors."""
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    optional = getattr(t, "optional_tensor_data_names", None) or []
    inner = [getattr(t, n, None) for n in [*names, *optional]]
    return sum(_held_bytes(x) for x in inner if x is not None)
