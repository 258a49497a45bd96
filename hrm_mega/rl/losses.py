"""RL losses: the clipped policy loss (GRPO, Dr. GRPO, DAPO-style asymmetric clipping, PPO), the k3 KL
penalty to a reference policy, and PPO's clipped value loss.

Per action (a token of a completion, a puzzle cell, a halting decision) with ratio = pi / pi_old:

    pg_t   = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl_t   = exp(ref - logp) - (ref - logp) - 1                   (k3: unbiased for KL(pi || ref), >= 0)
    loss_t = pg_t + beta * kl_term_t                              (beta = 0: no reference model needed)

The KL term (`kl_estimator`) is k3 itself, or k3 * ratio ("k3_ratio", TRL's use_bias_correction_kl).
Both have the same value at the first iteration (ratio = 1) but not the same gradient. With actions
drawn from pi_old, E[grad k3] = -sum_a ref(a) grad log pi(a) = grad KL(ref || pi): the plain k3 pulls
toward the reference in the forward-KL sense, although its value estimates KL(pi || ref). Weighting by
the ratio makes the sampled term an estimate of sum_a pi(a) k3(a) = KL(pi || ref) as a function of the
parameters, so its gradient is grad KL(pi || ref): the penalty that the objective E[r] - beta KL(pi||ref)
names. "k3_ratio" is therefore the default (tests/test_rl_losses.py checks both gradients against the
exact ones on a categorical policy).

and the per-action losses are aggregated over the masked actions by `aggregation`:

    token_mean            sum_{i,t} loss / total actions                       (DAPO; long answers weigh more)
    seq_mean_token_mean   sum_i (sum_t loss / actions of row i) / rows         (GRPO as published)
    dr_grpo               sum_{i,t} loss / (rows * max_len)                    (Dr. GRPO: no length bias)

Data parallelism and micro-batches. Each denominator above is a count over the whole step, so every
function takes `normalizer`: the step's total (actions, rows, or rows * max_len) over all micro-batches
and ranks. `loss_normalizer(...)` gives one batch's share; all-reduce the shares (a sum) and pass the
result to every micro-batch. The micro-batches' losses then add up to the step's loss, which is the
same at any DP size (as hrm_mega/training/tasks/lm.py does for the LM's token means). Without `normalizer`
the batch's own count is used.

Metrics are detached means over this call's masked actions, plus `actions` (their count): weight by
`actions` to combine micro-batches and ranks (ratio_min / ratio_max combine by min / max).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")


def loss_normalizer(aggregation: Aggregation, mask: torch.Tensor, max_len: int | None = None) -> float:
    """This batch's share of the step's normaliser: its actions (token_mean), rows (seq_mean_token_mean),
    or rows * max_len (dr_grpo; max_len defaults to mask.shape[1], but give the step's constant, e.g.
    max_new_tokens, so every batch uses the same one)."""
    _check_aggregation(aggregation)
    if aggregation == "token_mean":
        return float(mask.bool().sum())
    rows = float(mask.shape[0])
    return rows if aggregation == "seq_mean_token_mean" else rows * float(max_len or mask.shape[1])


def aggregate(
    per_action: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    normalizer: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """per_action [b, T] -> a scalar by `aggregation` over mask [b, T] (module docstring)."""
    _check_aggregation(aggregation)
    m = mask.bool()
    x = torch.where(m, per_action, 0.0)
    if normalizer is None:
        normalizer = loss_normalizer(aggregation, mask, max_len)
    if aggregation == "seq_mean_token_mean":
        x = x.sum(dim=1) / m.sum(dim=1).clamp_min(1)  # each row's mean over its own actions
    return x.sum() / max(normalizer, 1.0)


def k3_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-action k3 estimate of KL(pi || ref) from the sampled actions' log-probs (0 outside mask)."""
    delta = ref_logprobs - logprobs
    if mask is not None:  # before exp: a masked garbage value must not overflow (inf * 0 = nan in backward)
        delta = torch.where(mask.bool(), delta, 0.0)
    return torch.exp(delta) - delta - 1


KL_ESTIMATORS = ("k3_ratio", "k3")


def kl_term(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3_ratio",
) -> torch.Tensor:
    """The per-action KL penalty that enters the loss (module docstring): k3, or k3 times pi / pi_old."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
    k3 = k3_kl(logprobs, ref_logprobs, mask)
    if estimator == "k3":
        return k3
    log_ratio = logprobs - old_logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, 0.0)
    return torch.exp(log_ratio) * k3


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: Aggregation = "token_mean",
    normalizer: float | None = None,
    max_len: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3_ratio",
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss with an optional k3 KL penalty (module docstring); GRPO and PPO alike.

    logprobs [b, T] (current policy, with grad), old_logprobs [b, T] (the policy that sampled),
    advantages [b] (one per sequence: GRPO) or [b, T] (per action: PPO), mask [b, T] (True = action);
    eps_high defaults to eps_low; ref_logprobs [b, T] is needed when beta > 0; kl_estimator picks the
    penalty's gradient (kl_term); entropy [b, T] is only reported. Returns (loss, metrics): pg_loss and kl aggregated like the loss; kl_mean, clip_frac_low
    (ratio < 1 - eps_low where A < 0), clip_frac_high (ratio > 1 + eps_high where A > 0), clip_frac,
    ratio_mean / ratio_min / ratio_max, entropy (given) as means over the actions; and `actions`.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"eps_low={eps_low} must be in [0, 1) and eps_high={eps_high} >= 0")
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the reference policy's log-probs); or set beta=0")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must all be [batch, actions]"
        )
    m = mask.bool()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]
    if adv.shape[0] != logprobs.shape[0] or adv.shape[1] not in (1, logprobs.shape[1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [batch] or [batch, actions]"
        )

    log_ratio = torch.where(m, logprobs.float() - old_logprobs.float(), 0.0)  # masked before exp (see k3_kl)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    pg_loss = aggregate(pg, m, aggregation, normalizer, max_len)
    loss = pg_loss
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs.float(), ref_logprobs.float(), m)  # kl_mean: the KL(pi || ref) estimate
        penalty = kl_term(logprobs.float(), old_logprobs.float(), ref_logprobs.float(), m, kl_estimator)
        kl_loss = aggregate(penalty, m, aggregation, normalizer, max_len)  # kl: the term in the loss
        if beta > 0:
            loss = loss + beta * kl_loss

    with torch.no_grad():
        adv_b = adv.expand_as(ratio)
        low = (ratio < 1.0 - eps_low) & (adv_b < 0)
        high = (ratio > 1.0 + eps_high) & (adv_b > 0)
        actions = m.sum()
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac_low": _masked_mean(low.float(), m),
            "clip_frac_high": _masked_mean(high.float(), m),
            "clip_frac": _masked_mean((low | high).float(), m),
            "ratio_mean": _masked_mean(ratio, m),
            "ratio_min": ratio[m].min() if bool(actions) else ratio.new_tensor(float("nan")),
            "ratio_max": ratio[m].max() if bool(actions) else ratio.new_tensor(float("nan")),
            "actions": actions,
        }
        if kl is not None:
            metrics["kl"] = kl_loss.detach()
            metrics["kl_mean"] = _masked_mean(kl, m)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.float(), m)
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    coef: float = 0.1,
    aggregation: Aggregation = "token_mean",
    normalizer: float | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's value loss, coef * aggregate(0.5 * max((V - R)^2, (V_clipped - R)^2)).

    V_clipped = V_old + clamp(V - V_old, -clip_range, clip_range) keeps one update from moving the value
    far from the rollout's (clip_range None: plain 0.5 * (V - R)^2). values [b, T] (with grad),
    old_values and returns [b, T], mask [b, T]. Returns (loss, metrics): value_loss (before coef),
    value_clip_frac (actions where the clipped error is the larger), value_mean, return_mean, actions.
    """
    if clip_range is not None and clip_range < 0:
        raise ValueError(f"clip_range={clip_range} must be >= 0 (or None for no value clipping)")
    if coef < 0:
        raise ValueError(f"coef={coef} must be >= 0")
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must have one shape"
        )
    m = mask.bool()
    v, v_old, ret = values.float(), old_values.float().detach(), returns.float().detach()
    error = (v - ret) ** 2
    if clip_range is None:
        per_action = 0.5 * error
        clip_used = torch.zeros_like(m)
    else:
        v_clipped = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
        error_clipped = (v_clipped - ret) ** 2
        per_action = 0.5 * torch.maximum(error, error_clipped)
        clip_used = error_clipped > error
    unweighted = aggregate(per_action, m, aggregation, normalizer, max_len)
    with torch.no_grad():
        metrics = {
            "value_loss": unweighted.detach(),
            "value_clip_frac": _masked_mean(clip_used.float(), m),
            "value_mean": _masked_mean(v, m),
            "return_mean": _masked_mean(ret, m),
            "actions": m.sum(),
        }
    return coef * unweighted, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {', '.join(AGGREGATIONS)}")
