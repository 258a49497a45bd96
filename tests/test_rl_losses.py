"""RL losses and advantages against small examples worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_mega.rl.advantages import gae, group_advantages, masked_moments, std_from_moments, whiten
from hrm_mega.rl.losses import aggregate, k3_kl, kl_term, loss_normalizer, policy_loss, value_loss

EPS = 1e-4  # group_advantages' default eps


def close(a: torch.Tensor | float, b: float, tol: float = 1e-6) -> bool:
    value = a.detach() if isinstance(a, torch.Tensor) else a
    return abs(float(value) - b) < tol


# --------------------------------------------------------------------------------------------------
# GRPO policy loss
# --------------------------------------------------------------------------------------------------


def example_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, three actions; row 1's last action is padding with log-probs that would overflow exp.

    ratios  row 0: 1.0, 1.5, 0.5   (A = +2)
            row 1: 1.1, 0.7, pad   (A = -1)
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -1e4]])
    log_ratio = torch.tensor([[0.0, math.log(1.5), math.log(0.5)], [math.log(1.1), math.log(0.7), 0.0]])
    new = old + log_ratio
    new[1, 2] = 0.0  # garbage at the padded position: new - old = 1e4
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages = torch.tensor([2.0, -1.0])
    return new.requires_grad_(True), old, advantages, mask


# Per-action pg = -min(r * A, clip(r, 0.8, 1.2) * A):
#   row 0 (A = 2):  r=1.0 -> -2.0;  r=1.5 -> -min(3.0, 2.4) = -2.4;  r=0.5 -> -min(1.0, 1.6) = -1.0
#   row 1 (A = -1): r=1.1 -> -min(-1.1, -1.1) = 1.1;  r=0.7 -> -min(-0.7, -0.8) = 0.8
# Sum -3.5 over 5 actions; row means -5.4/3 = -1.8 and 1.9/2 = 0.95.
EXPECTED = {
    "token_mean": -3.5 / 5,  # -0.7
    "seq_mean_token_mean": (-1.8 + 0.95) / 2,  # -0.425
    "dr_grpo": -3.5 / (2 * 3),  # rows x max length
}


@pytest.mark.parametrize("aggregation", list(EXPECTED))
def test_grpo_loss_by_hand(aggregation: str) -> None:
    new, old, adv, mask = example_batch()
    loss, metrics = policy_loss(new, old, adv, mask, eps_low=0.2, aggregation=aggregation)
    assert close(loss, EXPECTED[aggregation])
    assert close(metrics["pg_loss"], EXPECTED[aggregation])
    # low: r < 0.8 with A < 0 (row 1's 0.7; row 0's 0.5 has A > 0); high: r > 1.2 with A > 0 (row 0's 1.5)
    assert close(metrics["clip_frac_low"], 1 / 5) and close(metrics["clip_frac_high"], 1 / 5)
    assert close(metrics["clip_frac"], 2 / 5)
    assert close(metrics["ratio_mean"], (1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5, 1e-5)
    assert close(metrics["ratio_min"], 0.5, 1e-6) and close(metrics["ratio_max"], 1.5, 1e-6)
    assert int(metrics["actions"]) == 5
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[1, 2] == 0  # the padded garbage is inert


def test_dr_grpo_uses_the_given_max_length() -> None:
    new, old, adv, mask = example_batch()
    loss, _ = policy_loss(new, old, adv, mask, aggregation="dr_grpo", max_len=4)
    assert close(loss, -3.5 / (2 * 4))


def test_grpo_gradient_by_hand() -> None:
    """d/d logp of -r*A/5 is -r*A/5 for unclipped actions, 0 where the clipped term is the minimum."""
    new, old, adv, mask = example_batch()
    loss, _ = policy_loss(new, old, adv, mask, eps_low=0.2, aggregation="token_mean")
    loss.backward()
    expected = torch.tensor([[-2.0 / 5, 0.0, -1.0 / 5], [1.1 / 5, 0.0, 0.0]])  # r=1.5 and r=0.7 clipped
    assert torch.allclose(new.grad, expected, atol=1e-6)


def test_asymmetric_clipping() -> None:
    """eps_low=0.2, eps_high=0.28 (DAPO's clip-higher). Actions: r=1.25 A=+1, r=0.75 A=-1, r=1.35 A=+1.
    pg: -min(1.25, 1.25) = -1.25 (1.25 < 1.28, unclipped);  -min(-0.75, -0.8) = 0.8;  -min(1.35, 1.28) = -1.28.
    With symmetric 0.2 the first is clipped too: -1.2, 0.8, -1.2."""
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 0.75, 1.35]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0]])  # per action, as PPO passes them
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert close(loss, (-1.25 + 0.8 - 1.28) / 3)
    assert close(metrics["clip_frac_high"], 1 / 3) and close(metrics["clip_frac_low"], 1 / 3)
    loss.backward()
    assert torch.allclose(new.grad, torch.tensor([[-1.25 / 3, 0.0, 0.0]]), atol=1e-6)
    symmetric, metrics = policy_loss(new, old, adv, mask, eps_low=0.2)
    assert close(symmetric, (-1.2 + 0.8 - 1.2) / 3)
    assert close(metrics["clip_frac_high"], 2 / 3)


def test_k3_kl_by_hand() -> None:
    """k3 = e^d - d - 1 with d = ref - logp: d = ln 2 -> 1 - ln 2; d = -ln 2 -> ln 2 - 1/2; d = 0 -> 0.
    The three add up to exactly 1/2."""
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = logp + torch.tensor([[math.log(2.0), -math.log(2.0), 0.0]])
    kl = k3_kl(logp, ref)
    assert torch.allclose(kl, torch.tensor([[1 - math.log(2.0), math.log(2.0) - 0.5, 0.0]]), atol=1e-6)
    # In the loss: ratio 1 and A = 0 leave only beta * token_mean(k3) = 0.1 * 0.5 / 3.
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logp, logp, torch.zeros(1), mask, ref_logprobs=ref, beta=0.1)
    assert close(loss, 0.1 * 0.5 / 3) and close(metrics["kl"], 0.5 / 3) and close(metrics["kl_mean"], 0.5 / 3)
    # beta = 0: the reference is only reported, not optimised.
    loss, metrics = policy_loss(logp, logp, torch.zeros(1), mask, ref_logprobs=ref, beta=0.0)
    assert close(loss, 0.0) and close(metrics["kl"], 0.5 / 3)


def test_entropy_is_reported() -> None:
    new, old, adv, mask = example_batch()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    _, metrics = policy_loss(new, old, adv, mask, entropy=entropy)
    assert close(metrics["entropy"], 15.0 / 5)  # the padded 99 is left out


def test_policy_loss_errors() -> None:
    new, old, adv, mask = example_batch()
    with pytest.raises(ValueError, match="aggregation='seq_mean'.*token_mean"):
        policy_loss(new, old, adv, mask, aggregation="seq_mean")
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logprobs"):
        policy_loss(new, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(new, old, torch.zeros(3), mask)


@pytest.mark.parametrize("aggregation", list(EXPECTED))
def test_step_global_normaliser_splits_exactly(aggregation: str) -> None:
    """Two 'ranks' holding one row each, with the step's normaliser (the sum of their shares), give
    losses and gradients that add up to the one-process batch's."""
    new, old, adv, mask = example_batch()
    full, _ = policy_loss(new, old, adv, mask, aggregation=aggregation, max_len=3)
    (full_grad,) = torch.autograd.grad(full, new)
    norm = sum(loss_normalizer(aggregation, mask[i : i + 1], max_len=3) for i in range(2))
    parts = [
        policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], aggregation=aggregation,
                    normalizer=norm, max_len=3)[0]
        for i in range(2)
    ]  # fmt: skip
    (split_grad,) = torch.autograd.grad(sum(parts), new)
    assert close(sum(parts), float(full.detach()))
    assert torch.allclose(split_grad, full_grad, atol=1e-7)
    # Without the global normaliser each part is normalised by its own count, and the sum is different.
    local = sum(
        policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], aggregation=aggregation)[
            0
        ]
        for i in range(2)
    )
    assert not close(local, float(full.detach()), 1e-3)


def test_aggregate_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert close(aggregate(x, mask, "token_mean"), (1 + 2 + 4) / 3)
    assert close(aggregate(x, mask, "seq_mean_token_mean"), (1.5 + 4) / 2)
    assert close(aggregate(x, mask, "dr_grpo", max_len=5), 7 / 10)
    assert close(aggregate(x, mask, "token_mean", normalizer=14.0), 0.5)


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------

# Two groups of three. Group A: 1, 2, 3 (mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1).
# Group B: 0, 0, 3 (mean 1, deviations -1, -1, 2, std sqrt((1 + 1 + 4) / 2) = sqrt 3).
# All six: mean 1.5, squared deviations 0.25 0.25 2.25 2.25 2.25 2.25 = 9.5, std sqrt(9.5 / 5) = sqrt 1.9.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
CENTRED = [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]


def test_group_scaling_by_hand() -> None:
    adv = group_advantages(REWARDS, 3, "group")
    expected = [c / (1.0 + EPS) for c in CENTRED[:3]] + [c / (math.sqrt(3.0) + EPS) for c in CENTRED[3:]]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


def test_batch_scaling_by_hand() -> None:
    adv = group_advantages(REWARDS, 3, "batch")
    assert torch.allclose(adv, torch.tensor(CENTRED) / (math.sqrt(1.9) + EPS), atol=1e-6)


def test_no_scaling_by_hand() -> None:
    assert torch.allclose(group_advantages(REWARDS, 3, "none"), torch.tensor(CENTRED))


def test_equal_rewards_give_zero_advantage() -> None:
    adv = group_advantages(torch.tensor([5.0, 5.0, 5.0, 1.0, 0.0, 1.0]), 3, "group")
    assert torch.equal(adv[:3], torch.zeros(3)) and bool((adv[3:] != 0).all())


def test_batch_std_from_moments_of_two_ranks() -> None:
    """Each rank holds one group; the all-reduced (summed) moments give the whole step's std."""
    moments = masked_moments(REWARDS[:3]) + masked_moments(REWARDS[3:])
    assert close(std_from_moments(moments), math.sqrt(1.9))
    rank1 = group_advantages(REWARDS[3:], 3, "batch", batch_std=std_from_moments(moments))
    assert torch.allclose(rank1, group_advantages(REWARDS, 3, "batch")[3:], atol=1e-7)
    assert not torch.allclose(rank1, group_advantages(REWARDS[3:], 3, "batch"), atol=1e-3)


def test_advantage_errors() -> None:
    with pytest.raises(ValueError, match="scale='std'.*group, batch, none"):
        group_advantages(REWARDS, 3, "std")
    with pytest.raises(ValueError, match="group_size=4 does not divide the 6 rewards"):
        group_advantages(REWARDS, 4)


def test_whiten_by_hand() -> None:
    """Masked values 1, 2, 3 (mean 2, unbiased std 1) -> -1, 0, 1; the masked-out 100 becomes 0."""
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert torch.allclose(whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# GAE and the value loss
# --------------------------------------------------------------------------------------------------


def test_gae_by_hand() -> None:
    """gamma 0.9, lam 0.8 (gamma * lam = 0.72).
    Row 0: rewards 0 0 1, values 0.5 0.6 0.7:
        t=2: delta = 1 - 0.7 = 0.3                         A = 0.3
        t=1: delta = 0.9 * 0.7 - 0.6 = 0.03                A = 0.03 + 0.72 * 0.3 = 0.246
        t=0: delta = 0.9 * 0.6 - 0.5 = 0.04                A = 0.04 + 0.72 * 0.246 = 0.21712
    Row 1: the same first and last tokens with a masked hole between (garbage 9s), then padding:
        t=2: A = 0.3;  t=0: delta = 0.9 * 0.7 - 0.5 = 0.13, A = 0.13 + 0.72 * 0.3 = 0.346
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 9.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0], [0.5, 9.0, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0], [0.346, 0.0, 0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0], [0.846, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_gae_bootstrap_and_monte_carlo() -> None:
    # One token, reward 0, value 0.5, value after it 1.0 (a truncated row): A = 0.9 * 1.0 - 0.5 = 0.4.
    adv, ret = gae(torch.zeros(1, 1), torch.tensor([[0.5]]), torch.ones(1, 1, dtype=torch.bool), gamma=0.9,
                   bootstrap=torch.tensor([1.0]))  # fmt: skip
    assert close(adv[0, 0], 0.4) and close(ret[0, 0], 0.9)
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t.  Rewards 1 2 3, values 1 1 1 -> 5, 4, 2.
    adv, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool),
                 gamma=1.0, lam=1.0)  # fmt: skip
    assert torch.allclose(adv, torch.tensor([[5.0, 4.0, 2.0]]))


def value_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """clip 0.2:
    a: v=1.0 old=0.9 R=1.5: (v-R)^2 = 0.25; clipped v = 1.0 (moved 0.1) -> 0.25;      0.5 * 0.25 = 0.125
    b: v=2.0 old=1.0 R=1.0: (v-R)^2 = 1.0;  clipped v = 1.2 -> 0.04; max 1.0           0.5 * 1.0  = 0.5
    c: v=2.0 old=1.0 R=2.5: (v-R)^2 = 0.25; clipped v = 1.2 -> 1.69; max 1.69 (clip)   0.5 * 1.69 = 0.845
    d: padding.   Mean (0.125 + 0.5 + 0.845) / 3 = 0.49."""
    values = torch.tensor([[1.0, 2.0, 2.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 1.0, 2.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    return values, old, returns, mask


def test_value_loss_with_clipping_by_hand() -> None:
    values, old, returns, mask = value_example()
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.2, coef=0.5)
    assert close(loss, 0.5 * 0.49) and close(metrics["value_loss"], 0.49)
    assert close(metrics["value_clip_frac"], 1 / 3)
    loss.backward()
    # a: (v - R) / 3 * coef = -0.5 / 6; b: 1.0 / 6; c: the clipped branch is saturated -> 0; d: padding.
    assert torch.allclose(values.grad, torch.tensor([[-0.5 / 6, 1.0 / 6, 0.0, 0.0]]), atol=1e-6)


def test_value_loss_without_clipping_by_hand() -> None:
    values, old, returns, mask = value_example()
    loss, metrics = value_loss(values, old, returns, mask, clip_range=None, coef=0.5)
    assert close(metrics["value_loss"], 0.5 * (0.25 + 1.0 + 0.25) / 3)  # 0.25
    assert close(loss, 0.125) and close(metrics["value_clip_frac"], 0.0)


@pytest.mark.parametrize("estimator", ["k3", "k3_ratio"])
def test_each_kl_estimators_gradient_is_its_definitions(estimator) -> None:
    """On a categorical policy over 7 actions, the expected penalty gradient over actions drawn from
    pi_old (= pi, detached: the first iteration) equals the exact gradient of KL(ref || pi) for the plain
    k3, and of KL(pi || ref) for k3 x ratio; the two differ, and their values agree."""
    torch.manual_seed(0)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(7, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(theta, dim=0)
    old = logp.detach()
    actions = torch.arange(7)
    term = kl_term(logp[actions][None], old[actions][None], ref[actions][None], estimator=estimator)[0]
    expected = (old.exp() * term).sum()  # E_{a ~ pi_old}[term(a)], exactly
    (grad,) = torch.autograd.grad(expected, theta, retain_graph=True)
    p, r = logp.exp(), ref.exp()
    definition = (r * (ref - logp)).sum() if estimator == "k3" else (p * (logp - ref)).sum()
    (want,) = torch.autograd.grad(definition, theta, retain_graph=True)
    assert torch.allclose(grad, want, atol=1e-12), (grad, want)
    other = (p * (logp - ref)).sum() if estimator == "k3" else (r * (ref - logp)).sum()
    (wrong,) = torch.autograd.grad(other, theta)
    assert (grad - wrong).abs().max() > 1e-3
    assert float(expected.detach()) == pytest.approx(
        float((p * (logp - ref)).sum().detach())
    )  # the value: KL(pi || ref)
