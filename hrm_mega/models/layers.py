"""Building blocks shared by every model family: norms, RoPE, gated MLPs, and TP-aware linears.

Tensor layout is [batch, seq, hidden] throughout. Linear layers come from two factories,
`column_linear` and `row_linear`: plain `nn.Linear` when tensor parallelism is off, megatron-core
Column/RowParallelLinear when it is on; parameter names are `weight`/`bias` either way. Model code never
branches on which one it got. `vocab_embedding` is nn.Embedding or megatron-core's VocabParallelEmbedding.

Weights are not initialised in `__init__`. Each parameter carries an init rule (`set_init`), and
`init_parameters` fills every tensor from a generator seeded by (seed, parameter name), generating
the full unsharded tensor and keeping this rank's slice. So the same seed gives the same model at any
TP or PP layout, whatever order the modules were built in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed

# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Init:
    kind: str  # "trunc_normal" | "constant"
    value: float  # std for trunc_normal, the constant otherwise


def set_init(tensor: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Attaches an init rule to a parameter or buffer (call it on the nn.Parameter itself, not its data)."""
    tensor._hrm_init = Init(kind, value)  # type: ignore[attr-defined]
    return tensor


def lecun_init(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Truncated LeCun normal, as in HRM: std 1/sqrt(fan_in), truncated at 2 std."""
    return set_init(weight, "trunc_normal", 1.0 / math.sqrt(fan_in))


def trunc_normal_(
    tensor: torch.Tensor, std: float, generator: torch.Generator, bound: float = 2.0
) -> torch.Tensor:
    """Normal truncated to [-bound*std, bound*std], rescaled so the result really has std `std`.

    torch.nn.init.trunc_normal_ truncates without rescaling, so its std is smaller than asked.
    Inverse-CDF sampling: uniform in [cdf(-bound), cdf(bound)], mapped back through erfinv.
    """
    if std == 0:
        return tensor.zero_()
    lo = math.erf(-bound / math.sqrt(2))
    hi = math.erf(bound / math.sqrt(2))
    pdf_at_bound = math.exp(-0.5 * bound**2) / math.sqrt(2 * math.pi)
    z = (hi - lo) / 2
    truncated_var = 1 - 2 * bound * pdf_at_bound / z
    scale = std / math.sqrt(truncated_var)
    with torch.no_grad():
        tensor.uniform_(lo, hi, generator=generator).erfinv_().mul_(math.sqrt(2) * scale)
        tensor.clamp_(-bound * scale, bound * scale)
    return tensor


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Initialises every parameter and buffer that carries an init rule, deterministically by name."""
    params = list(module.named_parameters(prefix=prefix))
    unruled = [name for name, p in params if getattr(p, "_hrm_init", None) is None]
    if unruled:
        raise ValueError(f"parameter {unruled[0]} has no init rule; give it one with set_init()")
    for name, tensor in params + list(module.named_buffers(prefix=prefix)):
        rule: Init | None = getattr(tensor, "_hrm_init", None)
        if rule is None or tensor.is_meta:
            continue
        if rule.kind == "constant":
            tensor.fill_(rule.value)
            continue
        full_shape, dim, rank = _full_shape(tensor)
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        full = trunc_normal_(torch.empty(full_shape, dtype=torch.float32), rule.value, generator)
        if dim is not None:
            full = full.chunk(full_shape[dim] // tensor.shape[dim], dim=dim)[rank]
        tensor.copy_(full)


def _full_shape(tensor: torch.Tensor) -> tuple[list[int], int | None, int]:
    """Unsharded shape of a (possibly tensor-parallel) parameter, its split dim and this rank's index."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return list(tensor.shape), None, 0
    dim = tensor.partition_dim  # type: ignore[attr-defined]
    shape = list(tensor.shape)
    shape[dim] *= distributed.tp_size()
    return shape, dim, distributed.tp_rank()


# --------------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------------


# ATen's fused RMSNorm forward (torch >= 2.8); the GPU check runs on whatever torch a GPU machine has.
FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)


def fuses_rms_norm(x: torch.Tensor) -> bool:
    """Whether RMSNorm's forward on x runs through FUSED_RMS_NORM (CPU and CUDA, where it has kernels)."""
    return FUSED_RMS_NORM is not None and x.device.type in ("cpu", "cuda")


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * scale, in fp32, returned in x's dtype; scale None = weightless.

    Written out so that backward keeps x and the [.., 1] reciprocal RMS only: autograd through the
    plain expression keeps x and the normalised x in fp32, twice the activations of every norm (and a
    Gemma layer has six). On the CPU and CUDA the forward is ATen's `_fused_rms_norm`, which also
    returns the reciprocal RMS: on the CPU the same operations in C++, in place where it can (0.41 ms
    against the expression's 0.96 at [8, 512, 256]), bit-equal to the plain expression that runs on other
    devices (tests/test_layers.py checks the two). ATen has no CPU kernel for its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
        x32 = x.float()
        if fuses_rms_norm(x):
            out, rstd = FUSED_RMS_NORM(x32, [x.shape[-1]], scale, eps)
        else:
            rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
            out = x32 * rstd if scale is None else x32 * rstd * scale
        ctx.save_for_backward(x, rstd, scale)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # -> (grad x, grad scale, None)
        # y = x r s with r = rsqrt(mean(x^2) + eps): dx = r s g - x r^3 mean(g s x), ds = sum_rows g x r.
        # Both sums are matrix-vector products over one g * x, so the backward reads and writes each
        # [rows, d] tensor about 12 times where the written-out normalised form takes 17 (1.1 ms
        # against 1.9 at [8, 512, 256] in fp32 on the CPU; equal up to the order of the sums)
        x, rstd, scale = ctx.saved_tensors
        x32, g = x.float(), grad.float()
        gx = (g * x32).reshape(-1, x.shape[-1])  # [rows, d]
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            grad_scale = (rstd.reshape(1, -1) @ gx).view(-1)
        dot = gx.sum(-1) if scale is None else gx @ scale  # [rows]: sum_i g_i s_i x_i
        coef = dot.view(rstd.shape).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = g * rstd if scale is None else torch.mul(g, scale).mul_(rstd)
        return grad_x.addcmul_(x32, coef, value=-1).to(x.dtype), grad_scale, None


def rms_norm(x: torch.Tensor, eps: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm computed in fp32 (times an fp32 `scale` [dim] if given), returned in x's dtype."""
    return _RMSNorm.apply(x, scale, eps)


class RMSNorm(nn.Module):
    """RMSNorm in three forms: `none` (weightless, HRM), `plain` (x*w), `gemma` (x*(1+w), w starts at 0)."""

    def __init__(
        self, dim: int, eps: float = 1e-6, weight: str = "plain", shared_across_tp: bool = False
    ) -> None:
        """shared_across_tp: the norm is applied to tensor-parallel slices (e.g. per attention head), so
        each rank's gradient of the (replicated) weight is a partial sum to add up over the TP group."""
        super().__init__()
        if weight not in ("none", "plain", "gemma"):
            raise ValueError(f"RMSNorm weight={weight!r} must be none, plain or gemma")
        self.eps, self.form = eps, weight
        self.shared_across_tp = shared_across_tp
        if weight != "none":
            self.weight = set_init(
                nn.Parameter(torch.empty(dim)), "constant", 1.0 if weight == "plain" else 0.0
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "none":
            return rms_norm(x, self.eps)
        weight = self.weight.float()
        if self.shared_across_tp and distributed.tp_size() > 1:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            weight = copy_to_tensor_model_parallel_region(weight)  # backward: all-reduce over TP
        return rms_norm(x, self.eps, weight + 1.0 if self.form == "gemma" else weight)


# --------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE in the rotate-half convention; `scaling` divides positions (linear scaling)."""

    def __init__(
        self, head_dim: int, max_positions: int, base: float = 10000.0, scaling: float = 1.0
    ) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        cos, sin = self._tables(max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        )
        positions = torch.arange(n, dtype=torch.float32) / self.scaling
        freqs = torch.outer(positions, inv_freq)  # [n, head_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [n, head_dim]
        return angles.cos(), angles.sin()

    def forward(
        self, positions: torch.Tensor | None = None, length: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Returns (cos, sin) for `positions` ([seq] or [batch, seq]) or for 0..length-1."""
        if positions is None:
            n = length if length is not None else self.cos.shape[0]
            return self.cos[:n], self.sin[:n]
        if int(positions.max()) >= self.cos.shape[0]:
            cos, sin = self._tables(int(positions.max()) + 1)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self.cos[positions], self.sin[positions]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for the halves x1, x2 of the last dim,
    into a new contiguous fp32 tensor whatever x's strides (q k^T then runs without copies): one product
    over the whole, then one fused multiply-add a half at a time. The expression as written allocates
    five full-size tensors (the halves negated, concatenated, two products, their sum); this is 0.65 ms
    against 1.1 ms for one strided [32, 8, 82, 64] q on the CPU. The multiply-add rounds once where the
    expression rounds twice, so results differ from it in the last bit at most."""
    x32, half = x.float(), x.shape[-1] // 2
    y = torch.mul(x32, cos, out=torch.empty(x.shape, dtype=torch.float32, device=x.device))
    y[..., :half].addcmul_(x32[..., half:], sin[..., :half], value=-1)  # y1 = x1 cos1 - x2 sin1
    y[..., half:].addcmul_(x32[..., :half], sin[..., half:])  # y2 = x2 cos2 + x1 sin2
    return y


class _Rope(torch.autograd.Function):
    """rotate(x, cos, sin) in fp32, returned in x's dtype; backward is the transposed rotation, written
    the same way. Nothing is saved but the tables."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # -> (grad x, None, None)
        cos, sin = ctx.saved_tensors
        g, half = grad.float(), grad.shape[-1] // 2
        dx = g * cos
        dx[..., :half].addcmul_(g[..., half:], sin[..., half:])  # dx1 = g1 cos1 + g2 sin2
        dx[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1)  # dx2 = g2 cos2 - g1 sin1
        return dx.to(grad.dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention: x * cos + [-x2, x1] * sin, computed in fp32.
    x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim] or [batch, seq, head_dim]."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _Rope.apply(x, cos, sin)


# --------------------------------------------------------------------------------------------------
# Linear factories (TP-aware)
# --------------------------------------------------------------------------------------------------


def megatron_parallel_config():  # -> ModelParallelConfig
    from megatron.core.model_parallel_config import ModelParallelConfig

    # use_cpu_initialization: the full weight is created and split on the CPU (works without CUDA);
    # perform_initialization=False: init_parameters() fills weights afterwards, by name.
    return ModelParallelConfig(
        tensor_model_parallel_size=distributed.tp_size(),
        use_cpu_initialization=True,
        perform_initialization=False,
    )


def mark_split(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Marks a megatron-core weight as split over TP ranks along `dim`. megatron-core sets these
    attributes only when it initialises the weight itself, which init_parameters() does instead."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
    return weight


def skip_init(_: torch.Tensor) -> None:
    """megatron-core's init_method when init_parameters() fills the weights afterwards."""
    return None


def column_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """A linear whose output features are split across TP ranks (e.g. q/k/v, gate/up)."""
    return _tp_linear(in_features, out_features, bias, _column_parallel_class, 0, gather_output=False)


def row_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """A linear whose input features are split across TP ranks (e.g. attention output, down projection)."""
    return _tp_linear(
        in_features, out_features, bias, _row_parallel_class, 1, input_is_parallel=True, skip_bias_add=False
    )


def _tp_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    parallel_class: Callable[[], type[nn.Module]],
    split_dim: int,
    **options: Any,
) -> nn.Module:
    """nn.Linear at TP=1, else parallel_class()'s layer with its weight split along `split_dim`."""
    if distributed.tp_size() == 1:
        layer = nn.Linear(in_features, out_features, bias=bias)
    else:
        layer = parallel_class()(
            in_features, out_features, config=megatron_parallel_config(), init_method=skip_init, bias=bias,
            **options,
        )  # fmt: skip
        mark_split(layer.weight, dim=split_dim)
    _init_linear(layer, in_features)
    return layer


def _column_parallel_class() -> type[nn.Module]:
    """megatron-core's ColumnParallelLinear returning a plain tensor. A subclass, not a wrapper, so the
    parameters keep the names nn.Linear gives them (`weight`, `bias`) at every TP size."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        is_column_parallel = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return ColumnLinear


def _row_parallel_class() -> type[nn.Module]:
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return RowLinear


def _init_linear(layer: nn.Module, fan_in: int) -> None:
    for name, p in layer.named_parameters():
        if name.endswith("bias"):
            set_init(p, "constant", 0.0)
        else:
            lecun_init(p, fan_in)


def fused_linear(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Several projections of the same input. Bias-free plain Linears (TP=1) run as one matmul over their
    concatenated weights on GPUs (one kernel instead of several small ones) and one at a time on the CPU,
    where the matmuls cost the same either way and concatenating the weights (and copying the split
    outputs) on every call does not pay (bench/hf_gemma_speed.py: ~4% of a training step). Column-parallel
    ones always fuse: the input goes through one copy-to-TP region, so backward all-reduces its gradient
    once rather than once per layer. Quantized weights (torchao tensor subclasses) run one layer at a
    time, through their own kernels."""
    plain = all(type(layer.weight) in (torch.Tensor, nn.Parameter) for layer in layers)  # not quantized
    linear = all(type(layer) is nn.Linear and layer.bias is None for layer in layers)
    if plain and linear and x.device.type != "cpu":
        weight = torch.cat([layer.weight for layer in layers])
        return list(F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1))
    if plain and all(getattr(layer, "is_column_parallel", False) and layer.bias is None for layer in layers):
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        weight = torch.cat([layer.weight for layer in layers])  # this rank's rows of each
        sizes = [layer.weight.shape[0] for layer in layers]
        return list(F.linear(copy_to_tensor_model_parallel_region(x), weight).split(sizes, dim=-1))
    return [layer(x) for layer in layers]


# --------------------------------------------------------------------------------------------------
# Gated MLP
# --------------------------------------------------------------------------------------------------


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
ACTIVATIONS_INPLACE = {  # the same kernels, written over their input
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
}


def _activation_backward_(activation: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * act'(x) with the kernels autograd runs for ACTIVATIONS[activation], written over grad."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad)
    return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=grad)


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up, keeping only gate and up for backward (views of one matmul output when the
    projections are fused). Autograd through the expression also keeps act(gate), one more [tokens,
    intermediate] tensor per MLP call; here backward recomputes it. Forward and backward are the same
    operations as autograd's, so results are equal bit for bit; they write in place over their own
    temporaries (three [tokens, intermediate] tensors allocated per call instead of six: on the CPU a
    fresh one of that size costs page faults comparable to the multiply itself)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return ACTIVATIONS[activation](gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # -> (grad gate, grad up, None)
        gate, up = ctx.saved_tensors
        grad_gate = _activation_backward_(ctx.activation, grad * up, gate)
        return grad_gate, ACTIVATIONS[ctx.activation](gate).mul_(grad), None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """ACTIVATIONS[activation](gate) * up, saving only gate and up for backward."""
    return _GatedActivation.apply(gate, up, activation)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act=silu (HRM), GeGLU with act=gelu_tanh (Gemma)."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        tp = distributed.tp_size()
        if intermediate % tp:
            raise ValueError(f"MLP width {intermediate} is not divisible by parallel.tp={tp}")
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.gate_proj = column_linear(hidden, intermediate)
        self.up_proj = column_linear(hidden, intermediate)
        self.down_proj = row_linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        if torch.is_grad_enabled():
            return self.down_proj(gated_activation(gate, up, self.activation))
        # no autograd (HRM's no-grad cycles, the look-ahead, inference): the activation over gate in
        # place, one fresh [tokens, intermediate] tensor fewer
        return self.down_proj(ACTIVATIONS_INPLACE[self.activation](gate).mul_(up))
