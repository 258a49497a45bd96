"""Exponential moving average of a model's trainable parameters (TRM evaluates with EMA weights).

    shadow = decay * shadow + (1 - decay) * param        after every optimizer step

Shadows are fp32 copies keyed by parameter name, kept on the parameter's device, so their state_dict
is a flat {name: tensor} mapping that saves with safetensors or `torch.save`. Only parameters with
requires_grad are tracked; buffers (e.g. the puzzle-embedding table) are not.

Note: under ZeRO-3 parameters are partitioned; build, update and copy inside
`deepspeed.zero.GatheredParameters` so that the EMA sees full tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """EMA of `model`'s trainable parameters, with `decay` in [0, 1]."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        _check_decay(decay)
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in _trainable(model)
        }

    def _params(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pairs (shadow, param) in a fixed order, checking that `model` is the model the EMA was built on."""
        params = dict(_trainable(model))
        if params.keys() != self.shadow.keys():
            extra, missing = (
                sorted(params.keys() - self.shadow.keys()),
                sorted(self.shadow.keys() - params.keys()),
            )
            raise ValueError(
                f"EMA: model parameters differ from the EMA's (new: {extra}, missing: {missing})"
            )
        pairs = []
        for name, s in self.shadow.items():
            p = params[name]
            if p.shape != s.shape:
                raise ValueError(
                    f"EMA: parameter {name} has shape {tuple(p.shape)}, EMA has {tuple(s.shape)}"
                )
            pairs.append((s, p))
        return pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = self._params(model)
        if not pairs:
            return
        shadows = [s for s, _ in pairs]
        params = [p.to(device=s.device, dtype=torch.float32) for s, p in pairs]  # no copy for fp32 params
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, params, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrites the model's trainable parameters with the EMA weights (cast to each param's dtype)."""
        for s, p in self._params(model):
            p.copy_(s)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Runs the body with the EMA weights loaded into `model`; the original weights come back on exit."""
        backup = {name: p.detach().clone() for name, p in _trainable(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in _trainable(model):
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"decay", "shadow"}:
            raise ValueError(f"EMA.load_state_dict: expected keys decay and shadow, got {sorted(state_dict)}")
        shadow = state_dict["shadow"]
        if shadow.keys() != self.shadow.keys():
            new, missing = (
                sorted(shadow.keys() - self.shadow.keys()),
                sorted(self.shadow.keys() - shadow.keys()),
            )
            raise ValueError(f"EMA.load_state_dict: parameter names differ (new: {new}, missing: {missing})")
        for name, s in self.shadow.items():
            got = tuple(shadow[name].shape)
            if got != tuple(s.shape):
                raise ValueError(f"EMA.load_state_dict: {name} has shape {got}, expected {tuple(s.shape)}")
        _check_decay(state_dict["decay"])
        self.decay = float(state_dict["decay"])
        for name, s in self.shadow.items():
            s.copy_(shadow[name])


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
