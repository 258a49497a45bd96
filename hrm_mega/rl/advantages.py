"""Advantages for RL post-training: group-relative (GRPO / Dr. GRPO) and GAE (PPO).

Group-relative (GRPO). The rollouts of one prompt form a group of `group_size` consecutive rows
(rows i*n .. i*n+n-1 belong to prompt i). A sample's advantage is its reward minus its group's mean,
divided by a standard deviation chosen by `scale`:

    group   the group's std (GRPO)
    batch   the std of all rewards of the step (more robust when a group's rewards are nearly equal)
    none    no division (Dr. GRPO: the std term biases updates towards too-easy and too-hard prompts)

Stds are unbiased (n - 1 in the denominator) and `eps` keeps a group whose rewards are all equal at
advantage 0. Under data parallelism each rank holds whole groups, so `group` and `none` are local; the
`batch` std must cover the whole step: all-reduce `masked_moments(rewards)` over the ranks and pass
`std_from_moments(...)` as `batch_std`.

GAE (PPO). Per-token rewards and values over a completion, with a mask of the real tokens:

    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   R_t = A_t + V_t

where "next" is the next *real* token of the row (masked positions are skipped, so holes inside a row
are allowed), and after the row's last real token V_next = bootstrap value (0: the episode ended).
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]
SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    *,
    eps: float = 1e-4,
    batch_std: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """rewards [num_groups * group_size] (group-major) -> advantages, same shape, fp32.

    batch_std (scale="batch" only): the std of the whole step's rewards, when this call sees only
    part of them (data parallelism); default: the std of `rewards`.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} must be one of {', '.join(SCALES)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [num_groups * group_size]")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.numel()} rewards")
    if batch_std is not None and scale != "batch":
        raise ValueError(f"batch_std applies to scale='batch' only, not scale={scale!r}")
    r = rewards.float()
    groups = r.view(-1, group_size)  # [num_groups, group_size]
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0], device=r.device)
        return centred / (std.repeat_interleave(group_size) + eps)
    if batch_std is None:
        batch_std = std_from_moments(masked_moments(r))
    return centred / (torch.as_tensor(batch_std, dtype=torch.float32, device=r.device) + eps)


def masked_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(count, sum, sum of squares) of x where mask is True, as a float64 [3] tensor: all-reduce it over
    ranks (a sum) to get the moments of the whole step."""
    x = x.double()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    x = torch.where(m, x, 0.0)
    return torch.stack((m.sum().double(), x.sum(), (x * x).sum()))


def std_from_moments(moments: torch.Tensor, unbiased: bool = True) -> float:
    """The std of the values behind `masked_moments` (0 for fewer than two values when unbiased)."""
    count, total, squares = (float(v) for v in moments)
    dof = count - 1 if unbiased else count
    if dof <= 0:
        return 0.0
    var = (squares - total * total / count) / dof
    return max(var, 0.0) ** 0.5


def whiten(
    x: torch.Tensor, mask: torch.Tensor, *, moments: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (0 elsewhere), as PPO does to its advantages.

    moments: `masked_moments` of the whole step (all ranks); default: of this x alone."""
    moments = masked_moments(x, mask) if moments is None else moments
    count = float(moments[0])
    if count == 0:
        return torch.zeros_like(x, dtype=torch.float32)
    mean = float(moments[1]) / count
    std = std_from_moments(moments)
    return torch.where(mask.bool(), (x.float() - mean) / (std**2 + eps) ** 0.5, 0.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over token sequences (module docstring).

    rewards, values, mask: [b, T] (mask True = a real token; a sequence reward usually sits on the last
    real token); bootstrap [b]: the value after the last real token (default 0, the episode ended;
    pass V(s_T) for truncated rows). Returns (advantages, returns) [b, T] fp32, 0 where mask is False.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be [batch, tokens]"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma={gamma} and lam={lam} must be in [0, 1]")
    r, v, m = rewards.float(), values.detach().float(), mask.bool()
    b, T = r.shape
    next_value = torch.zeros(b, device=r.device) if bootstrap is None else bootstrap.detach().float()
    next_advantage = torch.zeros(b, device=r.device)
    advantages = torch.zeros_like(r)
    for t in range(T - 1, -1, -1):  # backwards; masked positions leave the running values alone
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m[:, t], a_t, 0.0)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_advantage = torch.where(m[:, t], a_t, next_advantage)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns
