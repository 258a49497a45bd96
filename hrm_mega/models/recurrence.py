"""CycleBlock: the HRM/TRM cycle wrapper, one abstraction for every model family.

One segment of reasoning, for N = `cycles` slow updates with T = l_cycles fast updates each:

    repeat N times:
        repeat T times:  z_L = L(z_L + z_H + x)        # fast module, sees the input x
        z_H = H(z_H + z_L)                             # slow module

TRM is the same loop with one network shared as L and H (z_L is TRM's z, z_H its y).

Which updates are differentiated is the grad mode:
- one_step (HRM): only the final L and the final H update; everything before runs under no_grad, so
  training memory does not grow with N*T (the 1-step gradient approximation of the HRM paper);
- last_cycle (TRM): the whole last H cycle, i.e. its T L updates and its H update;
- full: every update (backprop through the whole segment; for tests and ablations).
The carry handed back is always detached: segments are separate optimisation problems (deep supervision).

N is an argument of every call, not state of the block: the model passes its config's h_cycles, or
another count (an LM trained with sampled cycles, evaluation with more cycles), and no call changes what
the next one runs.

Injection `gated` replaces the fixed sums with learned per-channel gates that start at zero:

    z_L = L(x + g_LL * z_L + g_LH * z_H);   z_H = H(z_L + g_HH * z_H)

With zero gates every cycle computes exactly H(L(x)), the wrapped layers on their own, however many
cycles run. That lets a pretrained stack (e.g. a Gemma 3 local-global group) be imported unchanged and
then learn to use extra cycles. (`add` is the same with all gates fixed at one.)

Injection `gated_rms` feeds the states back through a weightless RMS norm:

    z_L = L(x + g_LL * rms(z_L) + g_LH * rms(z_H));   z_H = H(z_L + g_HH * rms(z_H))

For pre-norm stacks (Gemma's sandwich layers leave the residual stream unnormalised) the plain sums
grow with every cycle, about x2.6 per cycle at unit gates ((3 + sqrt 5) / 2, the larger eigenvalue of
the sums' [[1, 1], [1, 2]]; measured 2.62 in the tiny test model), so a late cycle's update is a vanishing
fraction of the state: cycles past the trained count can change little, and the state does not converge.
Normalised, what a cycle reads back is bounded (|g| per channel), the state can reach a fixed point,
and zero gates still give exactly H(L(x)) (rms(z) is finite, times 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hrm_mega.models.block import BlockStack, SeqContext
from hrm_mega.models.layers import rms_norm, set_init

GRAD_MODES = ("one_step", "last_cycle", "full")
INJECTIONS = ("add", "gated", "gated_rms")
STATE_NORM_EPS = 1e-6  # gated_rms: eps of the weightless RMS norm of the fed-back states


@dataclass
class Carry:
    """Recurrent state of one CycleBlock: z_H, z_L of shape [batch, seq, hidden]."""

    z_H: torch.Tensor
    z_L: torch.Tensor

    def detach(self) -> Carry:
        return Carry(self.z_H.detach(), self.z_L.detach())


class CycleBlock(nn.Module):
    def __init__(
        self,
        L: BlockStack,
        H: BlockStack | None,
        *,
        hidden_size: int,
        l_cycles: int,
        grad_mode: str = "one_step",
        injection: str = "add",
        gate_init: float = 0.0,
        grad_cycles: int = 0,
    ) -> None:
        """H=None shares L as the slow module too (TRM). gate_init: the gated injection's starting gates
        (0 keeps a wrapped pretrained stack exact). grad_cycles k > 0 (grad_mode full only): backpropagate
        through the last k H cycles alone, the earlier ones running under no_grad (truncated backprop)."""
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode={grad_mode!r} must be one of {GRAD_MODES}")
        if injection not in INJECTIONS:
            raise ValueError(f"injection={injection!r} must be one of {INJECTIONS}")
        if l_cycles < 1:
            raise ValueError(f"l_cycles={l_cycles} must be >= 1")
        if grad_cycles < 0 or (grad_cycles and grad_mode != "full"):
            raise ValueError(f"grad_cycles={grad_cycles} must be >= 0, and > 0 only with grad_mode='full'")
        self.L, self.H = L, H
        self.grad_cycles = grad_cycles
        self.l_cycles = l_cycles
        self.grad_mode, self.injection = grad_mode, injection
        if injection != "add":
            self.gate_LL = set_init(nn.Parameter(torch.empty(hidden_size)), "constant", gate_init)
            self.gate_LH = set_init(nn.Parameter(torch.empty(hidden_size)), "constant", gate_init)
            self.gate_HH = set_init(nn.Parameter(torch.empty(hidden_size)), "constant", gate_init)

    @property
    def slow(self) -> BlockStack:
        return self.L if self.H is None else self.H

    def forward(
        self,
        x: torch.Tensor,
        carry: Carry,
        ctx: SeqContext,
        cycles: int,
        after_slow_update: Callable[[int, torch.Tensor], None] | None = None,
        positions: slice | None = None,
    ) -> tuple[torch.Tensor, Carry | None]:
        """Runs one segment of `cycles` H updates (N). Returns (z_H, new detached carry).

        `after_slow_update(n, z_H)`, if given, sees z_H after every H update (e.g. for halting heads).
        `positions`: the last layer of the last H update computes z_H at these positions only, for a
        caller that reads nothing else (HRM's Q head in the bootstrap look-ahead reads position 0); no
        carry comes back then (None), since z_H is not whole."""
        if cycles < 1:
            raise ValueError(f"cycles={cycles} (H cycles) must be >= 1")
        z_H, z_L = carry.z_H, carry.z_L
        for n in range(cycles):
            last = n == cycles - 1
            if self.grad_cycles:  # truncated backprop: the last grad_cycles H cycles are the graph
                last = n >= cycles - self.grad_cycles
            for t in range(self.l_cycles):
                with torch.set_grad_enabled(torch.is_grad_enabled() and self._differentiates(last, t)):
                    z_L = self._fast_update(x, z_L, z_H, ctx)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self._differentiates(last, None)):
                z_H = self._slow_update(z_H, z_L, ctx, positions if n == cycles - 1 else None)
            if after_slow_update is not None:
                after_slow_update(n, z_H)
        return z_H, None if positions is not None else Carry(z_H, z_L).detach()

    def _differentiates(self, last_cycle: bool, t: int | None) -> bool:
        """Whether update (l-step t of an H cycle, the last one or not; t=None is the H update) is part
        of the graph. With grad_cycles, `last_cycle` means one of the last grad_cycles cycles."""
        if self.grad_mode == "full":
            return last_cycle if self.grad_cycles else True
        if self.grad_mode == "last_cycle":
            return last_cycle
        return last_cycle and (t is None or t == self.l_cycles - 1)

    def fast_input(self, x: torch.Tensor, z_L: torch.Tensor, z_H: torch.Tensor) -> torch.Tensor:
        """What the L update feeds its stack: z_L + z_H + x, x + g_LL * z_L + g_LH * z_H (gated), or the
        same with rms(z_L), rms(z_H) (gated_rms)."""
        if self.injection == "add":
            return z_L + (z_H + x)
        if self.injection == "gated_rms":
            z_L, z_H = rms_norm(z_L, STATE_NORM_EPS), rms_norm(z_H, STATE_NORM_EPS)
        return x + (self.gate_LL * z_L + self.gate_LH * z_H)

    def slow_input(self, z_H: torch.Tensor, z_L: torch.Tensor) -> torch.Tensor:
        """What the H update feeds its stack: z_H + z_L, z_L + g_HH * z_H (gated), or z_L + g_HH * rms(z_H)
        (gated_rms)."""
        if self.injection == "add":
            return z_H + z_L
        if self.injection == "gated_rms":
            z_H = rms_norm(z_H, STATE_NORM_EPS)
        return z_L + self.gate_HH * z_H

    def _fast_update(
        self, x: torch.Tensor, z_L: torch.Tensor, z_H: torch.Tensor, ctx: SeqContext
    ) -> torch.Tensor:
        return self.L(self.fast_input(x, z_L, z_H), None, ctx)

    def _slow_update(
        self, z_H: torch.Tensor, z_L: torch.Tensor, ctx: SeqContext, positions: slice | None = None
    ) -> torch.Tensor:
        return self.slow(self.slow_input(z_H, z_L), None, ctx, positions)
