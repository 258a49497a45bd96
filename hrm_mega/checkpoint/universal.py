"""Layout-free checkpoints: every tensor's full fp32 value, Adam moments and EMA, by model name.

Every checkpoint holds them beside DeepSpeed's own files:

    step-N/universal/tp00-pp00.safetensors    written by data-parallel replica 0 of (tp 0, pp 0)
    step-N/universal/tp01-pp00.safetensors    ...one file per (tp, pp) coordinate

A file holds its coordinate's tensor-parallel slices under `param/NAME`, `exp_avg/NAME`,
`exp_avg_sq/NAME`, `ema/NAME` and `buffer/NAME`, with NAME the parameter's name in the single-process
model (HRMGemma or RecursiveReasoner, whatever the pipeline stage called it), and its metadata says
along which dim each was split. ZeRO partitions are gathered over data-parallel ranks with DeepSpeed's
tensor-fragment API before writing. Reading concatenates the slices, and a run at any other TP, PP or
DP layout or ZeRO stage takes its own slice of each: weights and optimizer state carry over.
`hrm-mega consolidate` reads the weights the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hrm_mega.checkpoint.model_dir import CheckpointError, format_version

UNIVERSAL = "universal"
UNIVERSAL_FORMAT = 1  # the newest `hrm-mega/universal/N` this code writes and reads
MOMENTS = ("exp_avg", "exp_avg_sq")
_PIPE_PREFIX = re.compile(r"^(\d+|tied_modules\.\w+)\.")


def model_name(local_name: str) -> str:
    """A parameter's name in the single-process model. Pipeline stages prefix their layer index (or
    `tied_modules.KEY.`) to names that are otherwise the model's (models/lm_pipeline.py)."""
    return _PIPE_PREFIX.sub("", local_name, count=1)


def _named_tensors(
    model: torch.nn.Module,
) -> tuple[list[tuple[str, torch.nn.Parameter]], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers) of this rank's module, by model name. A tied parameter appears
    once per stage that holds it; both copies are equal."""
    params = [(model_name(n), p) for n, p in model.named_parameters()]
    persistent = set(model.state_dict().keys())
    buffers = {model_name(n): b for n, b in model.named_buffers() if n in persistent}
    return params, buffers


def _split_dim(p: torch.Tensor) -> int:
    return int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else -1  # type: ignore[attr-defined]


def tp_share(full: torch.Tensor, p: torch.Tensor, tp: tuple[int, int]) -> torch.Tensor:
    """This rank's slice of parameter p's whole value (all of it for a replicated one); tp = (size, rank)."""
    dim = _split_dim(p)
    return full.chunk(tp[0], dim=dim)[tp[1]] if dim >= 0 else full


def full_shape(p: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """The whole shape of a (possibly tensor-parallel) parameter."""
    shape, dim = list(p.shape), _split_dim(p)
    if dim >= 0:
        shape[dim] *= tp_size
    return tuple(shape)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save_universal(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    coordinates: tuple[int, int, int],
    ema_shadow: dict[str, torch.Tensor] | None,
) -> None:
    """Collective over data-parallel ranks (ZeRO gathers). coordinates: (pp_rank, dp_rank, tp_rank);
    optimizer: the client optimizer (inside ZeRO's wrapper); ema_shadow by this module's local names."""
    pp_rank, dp_rank, tp_rank = coordinates
    params, buffers = _named_tensors(model)
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int] = {}
    local_names = dict(
        zip((id(p) for _, p in model.named_parameters()), (n for n, _ in model.named_parameters()))
    )
    for name, p in params:
        weight, moments = _full_over_dp(p, optimizer)
        if dp_rank or getattr(p, "ds_pipe_replicated", False):  # the tied copy on another stage writes
            continue
        dims[name] = _split_dim(p)
        tensors[f"param/{name}"] = weight
        for key, value in zip(MOMENTS, moments):
            tensors[f"{key}/{name}"] = value
        if ema_shadow is not None:
            tensors[f"ema/{name}"] = ema_shadow[local_names[id(p)]].detach().float().cpu()
    if dp_rank:
        return
    for name, b in buffers.items():
        tensors[f"buffer/{name}"] = b.detach().float().cpu()
    metadata = {
        "format": f"hrm-mega/universal/{UNIVERSAL_FORMAT}",
        "dims": json.dumps(dims),
        "step": str(_optimizer_step(optimizer)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, directory / f"tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors", metadata=metadata)


def _deepspeed_managed(p: torch.Tensor) -> bool:
    """Whether DeepSpeed keeps this parameter's fp32 master and optimizer state (ZeRO 1-3, bf16)."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


def _full_over_dp(
    p: torch.Tensor, optimizer: torch.optim.Optimizer
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """This rank's (TP-slice) fp32 weight and Adam moments, whole over data-parallel ranks."""
    if not _deepspeed_managed(p):
        state = optimizer.state.get(p, {})
        moments = tuple(
            state[k].detach().float().cpu()
            if k in state
            else torch.zeros_like(p, dtype=torch.float32, device="cpu")
            for k in MOMENTS
        )
        return p.detach().float().cpu(), moments
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are empty outside forward
    weight = safe_get_full_fp32_param(p).detach().float().cpu()
    moments = tuple(safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in MOMENTS)
    return weight.reshape(shape), tuple(m.reshape(shape) for m in moments)


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class UniversalCheckpoint:
    """The tensors of a universal checkpoint directory, whole (TP slices joined), read lazily."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("tp*-pp*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no universal checkpoint files (tpXX-ppYY.safetensors)")
        self._where: dict[str, list[tuple[int, Path]]] = {}  # key -> [(tp rank, file)]
        self.dims: dict[str, int] = {}
        self.step = 0
        for path in files:
            tp = int(path.name[2:4])
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                # written with a tag since the first version: refuse another kind or a newer N
                format_version(meta.get("format"), "universal", UNIVERSAL_FORMAT, path)
                self.dims.update(json.loads(meta["dims"]))
                self.step = int(meta["step"])
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    slices = self._where.setdefault(key, [])
                    if tp not in (t for t, _ in slices):  # buffers repeat on every pipeline stage
                        slices.append((tp, path))

    def keys(self, kind: str) -> list[str]:
        prefix = f"{kind}/"
        return sorted(k[len(prefix) :] for k in self._where if k.startswith(prefix))

    def get(self, kind: str, name: str) -> torch.Tensor:
        """The whole tensor (TP slices concatenated along their split dim)."""
        key = f"{kind}/{name}"
        if key not in self._where:
            raise CheckpointError(f"{self.directory}: has no {key}; was it saved from another model?")
        slices = []
        for _, path in sorted(self._where[key]):
            with safe_open(str(path), framework="pt") as f:
                slices.append(f.get_tensor(key))
        dim = self.dims.get(name, -1)
        if dim < 0 or kind == "buffer":
            return slices[0]
        return torch.cat(slices, dim=dim)

    def state_dict(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Full fp32 weights and buffers (the EMA weights instead of the raw ones when use_ema and kept)."""
        ema = set(self.keys("ema")) if use_ema else set()
        state = {n: self.get("ema" if n in ema else "param", n) for n in self.keys("param")}
        return {**state, **{n: self.get("buffer", n) for n in self.keys("buffer")}}


def load_universal(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tp: tuple[int, int],
    ema_shadow: dict[str, torch.Tensor] | None,
    zero_optimizer: Any = None,
) -> int:
    """Loads weights, Adam moments, buffers and EMA into this rank's module from a checkpoint of any
    layout; tp = (tp_size, tp_rank). `zero_optimizer`: DeepSpeed's ZeRO-1/2 wrapper around `optimizer`,
    when there is one. Returns the optimizer step count."""
    saved = UniversalCheckpoint(directory)
    params, buffers = _named_tensors(model)
    if any(hasattr(p, "ds_id") for _, p in params):
        raise CheckpointError(
            f"{directory}: resuming at another layout under ZeRO stage 3 is not supported; resume with the "
            "saved layout, or at ZeRO stage 0-2 (then switch)"
        )
    local_names = {id(p): n for n, p in model.named_parameters()}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        _create_zero_moments(optimizer, zero_optimizer)

    def mine(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        out = tp_share(t, p, tp)
        if out.shape != p.shape:
            raise CheckpointError(
                f"{directory}: a tensor of shape {tuple(out.shape)} does not fit {tuple(p.shape)}; "
                "the checkpoint was saved from a different model"
            )
        return out

    with torch.no_grad():
        for name, p in params:
            weight = mine(saved.get("param", name), p)
            moments = [mine(saved.get(k, name), p) for k in MOMENTS]
            p.data.copy_(weight)
            if not _deepspeed_managed(p):
                state = optimizer.state[p]
                state["step"] = _step_value(optimizer, saved.step)
                for key, value in zip(MOMENTS, moments):
                    state[key] = value.to(p.device, copy=True)
            else:
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                safe_set_full_fp32_param(p, weight.to(p.device))
                for key, value in zip(MOMENTS, moments):
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
            if ema_shadow is not None:
                ema_shadow[local_names[id(p)]].copy_(mine(saved.get("ema", name), p))
        for name, b in buffers.items():
            b.copy_(saved.get("buffer", name))
    for state in optimizer.state.values():  # ZeRO's flat partitions, or the parameters themselves
        state["step"] = _step_value(optimizer, saved.step)
    return saved.step


def _create_zero_moments(optimizer: torch.optim.Optimizer, zero_optimizer: Any) -> None:
    """ZeRO-1/2 tie each parameter's fragment to the optimizer's state of its flat partition only once
    that state exists, i.e. after a first step. Before any step, the Adam moments are created here (zero;
    the loop above fills them), and DeepSpeed is asked to tie the fragments to them."""
    for group in optimizer.param_groups:
        for flat in group["params"]:
            state = optimizer.state[flat]
            if not state:
                state["step"] = _step_value(optimizer, 0)
                for key in MOMENTS:
                    state[key] = torch.zeros_like(flat)
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def _step_value(optimizer: torch.optim.Optimizer, step: int) -> Any:
    """torch's Adam variants count steps in a tensor; AdamATan2 in an int."""
    return torch.tensor(float(step)) if type(optimizer).__module__.startswith("torch.optim") else step
