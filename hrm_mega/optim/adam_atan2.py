"""Adam-atan2: Adam with the division m / (sqrt(v) + eps) replaced by atan2(m, sqrt(v)).

atan2 is bounded and scale-invariant, so the update needs no epsilon and cannot blow up when v is tiny.
HRM and TRM train with the `adam-atan2` package (0.0.3, a CUDA kernel); this is a pure-PyTorch version of
the same update, so it runs on CPU and GPU, for fp32, fp16 and bf16 parameters.

Per parameter, with the step count t starting at 1, in the package's order:

    p *= 1 - lr*wd                                   (decoupled weight decay, as AdamW, first)
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g^2
    p -= lr/(1-b1^t) * a * atan2(m, b * sqrt(v) / sqrt(1-b2^t))

The defaults a=1, b=1 are the package's update, `p -= lr/(1-b1^t) * atan2(m, sqrt(v)/sqrt(1-b2^t))`.
`a` and `b` are explicit options: `a` scales the update and `b` the denominator inside atan2. For small
|m| / (b*sqrt(v)), a*atan2(m, b*sqrt(v)) ~ (a/b) * m/sqrt(v), i.e. plain Adam with lr*a/b; for large
ratios the update saturates at a*pi/2. (a=1.27 is the default of a different atan2 package, not of the
package HRM and TRM import; the demo recipe was tuned with it and sets it explicitly.)

One deliberate difference: for bf16/fp16 parameters the package keeps the moments in the parameter's
dtype; we keep them in fp32 (and round the parameter once per step). The official trainers hold fp32
parameters, where the two agree.

It is a plain `torch.optim.Optimizer`, so DeepSpeed accepts it as a client optimizer under ZeRO 0-3
(with `zero_allow_untested_optimizer: true`). State per parameter: "step" (python int), "exp_avg" and
"exp_avg_sq".

How the update runs (same formula, rounding may differ by an ulp between the three):
- `compile=True`: one torch.compile'd kernel (dynamic shapes, so one compilation serves every tensor)
  per tensor, which reads p, g, m and v once and writes p, m and v once; the first step compiles
  (~10 s on two cores). On the CPU, alone (bench/optimizer_step.py), it took 0.6-1.1x the time of
  torch's foreach AdamW with one thread and ties with the eager update with two; inside a training step
  of the paper-scale model it measured slower than the eager update (110-139 ms against 75-87 on a
  2-core AMX Xeon), so the trainer asks for it on GPUs only.
- eager on the CPU: each tensor in slices of _CHUNK elements, so the update's temporaries stay in cache
  (about AdamW's time on one thread; with several threads each of its ~10 ops per slice is a parallel
  region, which costs a lot when other processes hold the cores).
- eager elsewhere (CUDA): torch's multi-tensor (_foreach) kernels over all tensors of a step count;
  atan2 has no foreach op, so it runs per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    # Moments of bf16/fp16 parameters are kept in fp32; fp32/fp64 parameters keep their own precision.
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class AdamATan2(torch.optim.Optimizer):
    """Adam-atan2 (see the module docstring for the update rule).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate, a float or a 0-dim tensor (so a schedule can change it without recompiling).
        betas: (b1, b2), the decay rates of the first and second moments, each in [0, 1).
        weight_decay: decoupled weight decay; each step multiplies the parameter by 1 - lr*weight_decay.
        a: scale of the atan2 update (bounded by a*pi/2 per unit lr); 1 is the adam-atan2 package.
        b: scale of the denominator inside atan2 (a/b is the effective Adam step in the small-ratio
            regime); 1 is the adam-atan2 package.
        compile: run the update as one torch.compile'd kernel per tensor (see the module docstring).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        a: float = 1.0,
        b: float = 1.0,
        compile: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b)
        super().__init__(params, defaults)
        self.compile = compile

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate every group (defaults merged in), so per-group overrides are checked too.
        group = {**self.defaults, **param_group}
        _check_hparams(group["lr"], group["betas"], group["weight_decay"], group["a"], group["b"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            # Tensors by step count (one key unless parameters joined late or skipped steps).
            by_step: dict[int, list[tuple[torch.Tensor, ...]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamATan2: sparse gradients are not supported (use SparseSignSGD)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
                state["step"] += 1
                by_step.setdefault(state["step"], []).append((p, state["exp_avg"], state["exp_avg_sq"]))
            for t, tensors in by_step.items():
                self._update(group, t, tensors)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads as torch does, but keeps the moments in fp32 for low-precision parameters.

        torch casts every floating state tensor to its parameter's dtype on load, which would silently
        round the moments of a bf16 parameter to bf16. We reload them from the saved tensors instead.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in saved]
            if missing:
                raise ValueError(f"AdamATan2.load_state_dict: state of parameter {saved_id} lacks {missing}")
            self.state[p]["step"] = int(saved["step"])  # tolerate tensor steps from other Adam variants
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[p][key] = saved[key].to(device=p.device, dtype=_state_dtype(p), copy=True)

    def _update(self, group: dict[str, Any], t: int, tensors: list[tuple[torch.Tensor, ...]]) -> None:
        """The update of step t for (param, exp_avg, exp_avg_sq) triples of one group."""
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        coefficients = (
            b1,
            b2,
            group["b"] / math.sqrt(1 - b2**t),
            lr * group["a"] / (1 - b1**t),
            1 - lr * wd if wd else None,
        )
        # Low-precision parameters are updated in fp32 and rounded once.
        quads = []
        for p, m, v in tensors:
            master = p if p.dtype == m.dtype else p.to(m.dtype)
            quads.append((master, p.grad.to(m.dtype), m, v))  # no copy when the dtypes already agree
        if self.compile:
            packed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
            for quad in quads:
                if all(x.is_contiguous() for x in quad):
                    key = (quad[0].device, quad[0].dtype)
                    if key not in packed:
                        packed[key] = _pack(coefficients, *key)
                    _compiled_update()(*(x.view(-1) for x in quad), packed[key])
                else:
                    _update_slice(*quad, *coefficients)
        elif all(quad[0].device.type == "cpu" for quad in quads):
            for quad in quads:
                for chunk in _chunks(*quad):
                    _update_slice(*chunk, *coefficients)
        else:
            _update_foreach(quads, *coefficients)
        for (p, _, _), (master, _, _, _) in zip(tensors, quads):
            if master is not p:
                p.copy_(master)


_CHUNK = 1 << 18  # elements updated together: the chunk's temporaries stay in cache between the ops


def _chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The tensors (same shape) as aligned slices of at most _CHUNK elements; whole when not contiguous."""
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    n = flat[0].numel()
    return [tuple(f[i : i + _CHUNK] for f in flat) for i in range(0, n, _CHUNK)]


def _update_slice(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, b1: float, b2: float,
    denom_scale: float, step_size: float | torch.Tensor, decay: float | torch.Tensor | None,
) -> None:  # fmt: skip
    """One slice of the module docstring's update, in place. The decay multiplies the old parameter and
    the update does not depend on it, so decaying here is the package's decay-first order."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    update = torch.sqrt(v).mul_(denom_scale)
    torch.atan2(m, update, out=update).mul_(step_size)  # step_size may be a 0-dim tensor (lr)
    if decay is not None:
        p.mul_(decay)
    p.sub_(update)


def _update_foreach(
    quads: list[tuple[torch.Tensor, ...]], b1: float, b2: float, denom_scale: float,
    step_size: float | torch.Tensor, decay: float | torch.Tensor | None,
) -> None:  # fmt: skip
    """_update_slice's operations over lists of tensors (multi-tensor kernels on CUDA)."""
    ps, gs, ms, vs = (list(x) for x in zip(*quads))
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, gs, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    updates = torch._foreach_sqrt(vs)
    torch._foreach_mul_(updates, denom_scale)
    for m, u in zip(ms, updates):
        torch.atan2(m, u, out=u)
    torch._foreach_mul_(updates, step_size)
    if decay is not None:
        torch._foreach_mul_(ps, decay)
    torch._foreach_sub_(ps, updates)


def _pack(
    coefficients: tuple[float | torch.Tensor | None, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The coefficients as one tensor [b1, 1-b1, b2, 1-b2, denom_scale, step_size, decay], so that the
    compiled kernel takes them as data and does not recompile when the step count or lr changes."""
    b1, b2, denom_scale, step_size, decay = coefficients
    values = [b1, 1 - b1, b2, 1 - b2, denom_scale, step_size, 1.0 if decay is None else decay]
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in values]).to(device, dtype)


def _fused_update(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c: torch.Tensor
) -> None:
    """_update_slice on flat tensors, written for the compiler: c is _pack's tensor."""
    m.mul_(c[0]).add_(g * c[1])
    v.mul_(c[2]).add_(g * g * c[3])
    p.mul_(c[6]).sub_(torch.atan2(m, v.sqrt() * c[4]) * c[5])


_COMPILED: list[Callable[..., None]] = []


def _compiled_update() -> Callable[..., None]:
    """_fused_update through torch.compile, built once per process (dynamic shapes: one compilation
    serves tensors of every size)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_fused_update, dynamic=True, fullgraph=True))
    return _COMPILED[0]


def _check_hparams(
    lr: float | torch.Tensor, betas: tuple[float, float], weight_decay: float, a: float, b: float
) -> None:
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:
        raise ValueError(f"AdamATan2: lr must be a float or a 0-dim tensor, got shape {tuple(lr.shape)}")
    if not float(lr) >= 0.0:
        raise ValueError(f"AdamATan2: lr must be >= 0, got {float(lr)}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"AdamATan2: betas must be two numbers in [0, 1), got {tuple(betas)}")
    if not weight_decay >= 0.0:
        raise ValueError(f"AdamATan2: weight_decay must be >= 0, got {weight_decay}")
    if not a > 0.0:
        raise ValueError(f"AdamATan2: a must be > 0, got {a}")
    if not b > 0.0:
        raise ValueError(f"AdamATan2: b must be > 0, got {b}")
