"""The halting rule and its knobs: the per-cell head (model.q_head=cells), model.halt_threshold, and the
accuracy-against-segments table read from one pass over all segments."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_act import make_batch

from hrm_mega.config import ConfigError
from hrm_mega.inference.puzzle import (
    metrics_from_sums,
    puzzle_metrics,
    run_adaptive,
    run_fixed,
    run_trajectories,
)
from hrm_mega.models.act import act_loss, q_says_halt
from hrm_mega.models.puzzle import RecursiveReasoner, SegmentOutput
from hrm_mega.models.recurrence import Carry
from hrm_mega.models.vocab import IGNORE_LABEL


@pytest.fixture
def cells_config(tiny_config):
    return dataclasses.replace(tiny_config, q_target="halt_only", q_head="cells", halt_max_steps=5)


def spread_cell_head(model: RecursiveReasoner, seed: int = 3) -> RecursiveReasoner:
    """Random weights on the cell head's output layer, so rows get different halting probabilities."""
    with torch.no_grad():
        model.cell_head[2].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        model.cell_head[2].bias.fill_(4.0)
    return model


def test_cells_head_q_halt_is_the_logit_of_the_product_of_cell_probabilities(cells_config):
    model = spread_cell_head(RecursiveReasoner(cells_config).init_weights(0).eval())
    batch = make_batch(cells_config, 6)
    out = model(model.initial_carry(6), batch)
    assert out.cell_logits.shape == (6, cells_config.seq_len)
    p_all = torch.sigmoid(out.cell_logits.double()).prod(dim=-1)  # P(every cell right), independently
    assert torch.allclose(out.q_halt.double(), torch.log(p_all / (1 - p_all)), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.q_continue, torch.zeros(6))


def test_cells_head_reads_the_state_without_steering_it(cells_config):
    """No gradient from the halting term reaches the trunk: the head is trained on its own."""
    model = spread_cell_head(RecursiveReasoner(cells_config).init_weights(0))
    out = model(model.initial_carry(4), make_batch(cells_config, 4))
    out.q_halt.sum().backward()
    assert model.cell_head[0].weight.grad.abs().sum() > 0
    trunk = [p.grad for n, p in model.named_parameters() if not n.startswith("cell_head")]
    assert all(g is None or g.abs().sum() == 0 for g in trunk)


def test_cells_halting_loss_is_the_mean_per_cell_bce_with_unlabelled_cells_right(cells_config):
    b, s = 3, cells_config.seq_len
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, s, cells_config.vocab_size, generator=g)
    labels = logits.argmax(-1).clone()
    labels[0, :4] = (labels[0, :4] + 1) % cells_config.vocab_size  # row 0: four wrong cells
    labels[1, :6] = IGNORE_LABEL  # row 1: six unlabelled cells count as right
    cells = torch.randn(b, s, generator=g)
    out = SegmentOutput(Carry(torch.zeros(b), torch.zeros(b)), logits, torch.zeros(b), torch.zeros(b), cells)
    _, metrics = act_loss(cells_config, out, labels, torch.ones(b, dtype=torch.bool), torch.ones(b))

    expected = 0.0
    for row in range(b):
        for cell in range(s):
            right = 0.0 if (row == 0 and cell < 4) else 1.0
            p = 1 / (1 + math.exp(-float(cells[row, cell])))
            expected -= (right * math.log(p) + (1 - right) * math.log(1 - p)) / s
    assert float(metrics["q_halt_loss"]) == pytest.approx(expected / b, rel=1e-5)


def test_threshold_halts_when_the_halt_probability_exceeds_it(tiny_config):
    q_halt = torch.tensor([-3.0, 0.1, 1.0, 2.5, 5.0])
    out = SegmentOutput(
        Carry(torch.zeros(5), torch.zeros(5)), torch.zeros(5, 1, 3), q_halt, torch.full((5,), 9.0)
    )
    bootstrap = dataclasses.replace(tiny_config, q_target="bootstrap")
    assert not q_says_halt(bootstrap, out).any()  # the rule: q_halt > q_continue
    for t in (0.5, 0.8, 0.95):
        expected = torch.sigmoid(q_halt) > t
        assert torch.equal(q_says_halt(dataclasses.replace(bootstrap, halt_threshold=t), out), expected)


@pytest.mark.parametrize(
    "change, field",
    [({"halt_threshold": 1.0}, "model.halt_threshold"), ({"halt_threshold": -0.1}, "model.halt_threshold"),
     ({"q_head": "cells", "q_target": "bootstrap"}, "model.q_head")],
)  # fmt: skip
def test_bad_halting_settings_are_refused(tiny_config, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dataclasses.replace(tiny_config, **change).validate()


def test_the_table_from_one_pass_equals_real_fixed_and_adaptive_runs(cells_config):
    """Rows do not interact, so fixed-k and adaptive-at-t read from the trajectories of one pass equal
    real runs (adaptive with refills and another batch composition) at every k and t."""
    model = spread_cell_head(RecursiveReasoner(cells_config).init_weights(0).eval())
    batches = [make_batch(cells_config, 7), make_batch(cells_config, 5, start_id=7, seed=1)]
    batches[1]["labels"][0] = IGNORE_LABEL  # an unlabelled row is left out of every metric
    traj = run_trajectories(model, cells_config, batches)
    assert traj.solved.shape == (11, cells_config.halt_max_steps)

    probs = traj.halt_prob[:, 0]
    assert float(probs.min()) > 0.05 and float(probs.max()) < 0.999, "the head should spread the rows"
    for t in (0.0, float(probs.median()), 0.9):
        cfg = dataclasses.replace(cells_config, halt_threshold=t)
        real = puzzle_metrics(run_adaptive(model, cfg, batches, batch_size=4))
        assert metrics_from_sums(traj.adaptive(t)) == pytest.approx(real)
    segments = {metrics_from_sums(traj.adaptive(t))["mean_segments"] for t in (0.0, float(probs.median()))}
    assert len(segments) == 2, "the threshold should change the compute"
    for k in (1, 3, cells_config.halt_max_steps):
        cfg = dataclasses.replace(cells_config, halt_max_steps=k)
        real = puzzle_metrics(run_fixed(model, cfg, batches))
        assert metrics_from_sums(traj.fixed(k)) == pytest.approx(real)


def test_the_trained_halting_decision_is_logged_on_wrong_and_right_rows(cells_config):
    """act_loss counts, over every labelled row, how the rule decided on wrong and right rows."""
    b, s = 4, cells_config.seq_len
    logits = F.one_hot(torch.full((b, s), 3), cells_config.vocab_size).float()
    labels = torch.full((b, s), 3)
    labels[2:, 0] = 4  # rows 2, 3 wrong
    q_halt = torch.tensor([2.0, -2.0, 2.0, -2.0])  # rows 0, 2 halt
    out = SegmentOutput(
        Carry(torch.zeros(b), torch.zeros(b)), logits, q_halt, torch.zeros(b), torch.zeros(b, s)
    )
    _, m = act_loss(cells_config, out, labels, torch.zeros(b, dtype=torch.bool), torch.ones(b))
    assert {k: int(m[k]) for k in ("unsolved", "unsolved_continue", "solved", "solved_halt")} == {
        "unsolved": 2, "unsolved_continue": 1, "solved": 2, "solved_halt": 1,
    }  # fmt: skip


def test_halt_lr_mult_reaches_the_cells_head(cells_config):
    """optim.halt_lr_mult scales the per-cell halting head (cell_head) like the position-0 q_head."""
    from hrm_mega.training.trainer import parameter_groups

    model = RecursiveReasoner(cells_config).init_weights(0)
    groups = parameter_groups(model, halt_lr_mult=20.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_mult = {g["lr_mult"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_mult[20.0] == sorted(n for n, _ in model.named_parameters() if n.startswith("cell_head."))
    assert len(by_mult[20.0]) == 4 and len(by_mult[1.0]) + 4 == len(list(model.parameters()))
