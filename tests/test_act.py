"""ACT semantics: carry reset and refill, halting, exploration, Q targets, losses, fixed and adaptive evaluation."""

import dataclasses
import math

import pytest
import torch

from hrm_mega.inference.puzzle import puzzle_metrics, run_adaptive, run_fixed
from hrm_mega.models.act import (
    act_loss,
    decide_halting,
    initial_state,
    keyed_uniform,
    q_continue_target,
    refill,
    step_segment,
    token_cross_entropy,
)
from hrm_mega.models.puzzle import QValues, RecursiveReasoner, SegmentOutput
from hrm_mega.models.recurrence import Carry
from hrm_mega.models.vocab import IGNORE_LABEL, log_stablemax


def make_batch(config, n, start_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(0, config.vocab_size, (n, config.seq_len), generator=g),
        "labels": torch.randint(2, config.vocab_size, (n, config.seq_len), generator=g),
        "puzzle_identifiers": torch.randint(0, config.num_puzzle_identifiers, (n,), generator=g),
        "sample_id": torch.arange(start_id, start_id + n),
        "epoch": torch.zeros(n, dtype=torch.long),
    }


def fake_out(q_halt, q_cont, b=None):
    q_halt, q_cont = torch.tensor(q_halt), torch.tensor(q_cont)
    b = q_halt.shape[0]
    z = torch.zeros(b, 1, 1)
    return SegmentOutput(Carry(z, z), torch.zeros(b, 1, 3), q_halt, q_cont)


def test_refill_resets_only_halted_rows(tiny_config):
    model = RecursiveReasoner(tiny_config).init_weights(0)
    batch = make_batch(tiny_config, 4)
    state = initial_state(model, batch)
    _, _, state, _ = step_segment(model, tiny_config, state, training=False)
    state = dataclasses.replace(state, halted=torch.tensor([False, True, False, True]))
    new = make_batch(tiny_config, 2, start_id=100, seed=1)
    after = refill(model, state, new)

    for row, src in ((1, 0), (3, 1)):  # halted rows take the new samples, in row order
        assert torch.equal(after.batch["inputs"][row], new["inputs"][src])
        assert after.batch["sample_id"][row] == 100 + src
        assert torch.equal(after.carry.z_H[row], model.H_init.expand_as(after.carry.z_H[row]))
        assert torch.equal(after.carry.z_L[row], model.L_init.expand_as(after.carry.z_L[row]))
        assert after.steps[row] == 0
    for row in (0, 2):  # running rows keep sample, carry and step count
        assert torch.equal(after.batch["inputs"][row], batch["inputs"][row])
        assert torch.equal(after.carry.z_H[row], state.carry.z_H[row])
        assert after.steps[row] == 1
    assert not after.halted.any()
    with pytest.raises(ValueError, match="2 halted rows"):
        refill(model, state, make_batch(tiny_config, 3))


def test_halting_rules(tiny_config):
    steps = torch.tensor([1, 1, 4, 2])
    out = fake_out([1.0, -1.0, -9.0, 0.5], [0.0, 2.0, 9.0, 1.0])
    cfg = dataclasses.replace(tiny_config, halt_exploration_prob=0.0)
    halted, is_last = decide_halting(cfg, out, steps, training=True)
    assert is_last.tolist() == [False, False, True, False]
    assert halted.tolist() == [True, False, True, False]  # bootstrap: q_halt > q_continue, or the last step

    only = dataclasses.replace(cfg, q_target="halt_only")
    halted, _ = decide_halting(only, out, steps, training=True)
    assert halted.tolist() == [True, False, True, True]  # halt_only: q_halt > 0

    halted, _ = decide_halting(cfg, out, steps, training=False)  # evaluation: only the step limit
    assert halted.tolist() == [False, False, True, False]


def test_exploration_draws_minimum_steps_uniformly_and_keyed_by_sample(tiny_config):
    cfg = dataclasses.replace(tiny_config, halt_max_steps=6, halt_exploration_prob=1.0)
    n = 6000
    ids = torch.arange(n)
    keys = (ids, torch.zeros(n, dtype=torch.long))
    always_halt = fake_out([5.0] * n, [-5.0] * n)
    held_until = torch.full((n,), 7)
    for step in range(1, 7):
        halted, _ = decide_halting(cfg, always_halt, torch.full((n,), step), training=True, sample_keys=keys)
        held_until = torch.where(halted & (held_until == 7), step, held_until)
    # With p=1 every row is held until a minimum drawn from U{2..6} (redrawn each step, as in HRM): no row
    # halts at step 1, every row halts by the last step, and all of 2..6 occur.
    assert (held_until >= 2).all() and (held_until <= 6).all()
    assert set(held_until.tolist()) == {2, 3, 4, 5, 6}
    # A single step's draw is uniform over 2..6.
    u = keyed_uniform(0, *keys, torch.full((n,), 3), torch.ones(n, dtype=torch.long))
    mins = 2 + (u * 5).long()
    freq = torch.bincount(mins, minlength=7)[2:].float() / n
    assert (freq - 0.2).abs().max() < 0.03

    # Keyed by sample: permuting the rows permutes the decisions.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    steps = torch.full((n,), 3)
    h1, _ = decide_halting(cfg, always_halt, steps, training=True, sample_keys=keys)
    h2, _ = decide_halting(cfg, always_halt, steps, training=True, sample_keys=(ids[perm], keys[1][perm]))
    assert torch.equal(h1[perm], h2)

    # p=0: the Q-head alone decides.
    none = dataclasses.replace(cfg, halt_exploration_prob=0.0)
    h, _ = decide_halting(none, always_halt, torch.ones(n, dtype=torch.long), training=True, sample_keys=keys)
    assert h.all()


def test_keyed_uniform_is_deterministic_and_spread():
    k = torch.arange(10000)
    a, b = keyed_uniform(7, k), keyed_uniform(7, k)
    assert torch.equal(a, b)
    assert not torch.equal(a, keyed_uniform(8, k))
    assert a.min() >= 0 and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.01


def test_bootstrap_q_target():
    nxt = fake_out([0.0, 1.0, -2.0], [3.0, -1.0, 5.0])
    is_last = torch.tensor([False, False, True])
    target = q_continue_target(nxt, is_last)
    expected = torch.sigmoid(torch.tensor([3.0, 1.0, -2.0]))  # max(next) unless last, then next q_halt
    torch.testing.assert_close(target, expected)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, carry, batch, **kwargs):
        self.calls += 1
        return self.inner(carry, batch, **kwargs)


@pytest.mark.parametrize("mode,calls,has_cont", [("bootstrap", 2, True), ("halt_only", 1, False)])
def test_q_target_modes_in_a_training_step(tiny_config, mode, calls, has_cont):
    cfg = dataclasses.replace(tiny_config, q_target=mode)
    model = CountingModel(RecursiveReasoner(cfg).init_weights(0))
    state = initial_state(model.inner, make_batch(cfg, 3))
    loss, metrics, _, _ = step_segment(model, cfg, state, training=True)
    assert model.calls == calls  # bootstrap runs one extra no-grad segment for the target
    assert ("q_continue_loss" in metrics) == has_cont
    loss.backward()
    assert model.inner.q_head.bias.grad is not None


@pytest.mark.parametrize(
    "change",
    [
        {},  # HRM: attention, RoPE, a separate H stack
        {"h_layers": 2, "l_layers": 2},  # the narrowed layer is the last of several
        {"shared_net": True, "pos_encoding": "learned"},  # TRM-style: one stack as L and H
        {"q_head": "cells", "q_target": "halt_only"},  # q_halt reads every cell: the whole segment runs
        {"token_mixer": "mlp", "pos_encoding": "learned", "puzzle_emb_ndim": 0},  # mlp_t mixes the sequence
    ],
)
def test_q_only_forward_gives_the_segments_q_values(tiny_config, change):
    """The bootstrap look-ahead's forward(q_only=True), whose last layer computes position 0 alone, gives
    the Q-values of the whole segment, and with gradients enabled too."""
    cfg = dataclasses.replace(tiny_config, **change)
    model = RecursiveReasoner(cfg).init_weights(0)
    with torch.no_grad():  # a Q head at zero would read 0 everywhere: give it weights
        head = model.cell_head[2] if cfg.q_head == "cells" else model.q_head
        head.weight.normal_(generator=torch.Generator().manual_seed(1))
    state = initial_state(model, make_batch(cfg, 3))
    carry = model(state.carry, state.batch).carry  # a state past the initial one
    full = model(carry, state.batch)
    q = model(carry, state.batch, q_only=True)
    assert isinstance(q, QValues)
    torch.testing.assert_close(q.q_halt, full.q_halt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.q_continue, full.q_continue, rtol=1e-5, atol=1e-6)
    assert q.q_halt.abs().min() > 1e-3 and not torch.allclose(q.q_halt, q.q_halt[0].expand(3))


def test_stablemax_and_losses_by_hand(tiny_config):
    x = torch.tensor([[0.0, 1.0, -1.0]])
    s = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(log_stablemax(x)[0], torch.log(s / s.sum()))

    logits = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]])  # [1, 2, 3]
    labels = torch.tensor([[1, -100]])
    loss = token_cross_entropy(logits, labels, "stablemax")
    assert loss[0, 1] == 0
    assert math.isclose(loss[0, 0].item(), -math.log(2 / 3.5), rel_tol=1e-6)
    soft = token_cross_entropy(logits, labels, "softmax")
    assert math.isclose(soft[0, 0].item(), -torch.log_softmax(logits[0, 0], -1)[1].item(), rel_tol=1e-6)

    # act_loss: mean over rows of the per-row averaged CE, plus 0.5 * BCE(q_halt, solved).
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]], [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    labels = torch.tensor([[1, 1], [0, 1]])  # row 0 solved, row 1 half right
    out = SegmentOutput(
        Carry(torch.zeros(2), torch.zeros(2)), logits, torch.tensor([2.0, -1.0]), torch.zeros(2)
    )
    cfg = dataclasses.replace(tiny_config, loss="softmax")
    loss, m = act_loss(cfg, out, labels, halted=torch.tensor([True, True]), steps=torch.tensor([3, 5]))
    ce = token_cross_entropy(logits, labels, "softmax").mean(-1).mean()
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2  # targets: solved=1, unsolved=0
    assert math.isclose(loss.item(), ce.item() + 0.5 * bce, rel_tol=1e-5)
    assert m["count"] == 2 and m["exact_accuracy"] == 1 and m["segments"] == 8
    assert math.isclose(m["token_accuracy"].item(), 1.5)
    assert m["q_halt_accuracy"] == 2  # q_halt >= 0 exactly for the solved row


def test_metrics_count_only_halted_rows(tiny_config):
    logits = torch.zeros(3, 2, 3)
    labels = torch.zeros(3, 2, dtype=torch.long)
    out = SegmentOutput(Carry(torch.zeros(3), torch.zeros(3)), logits, torch.zeros(3), torch.zeros(3))
    _, m = act_loss(
        tiny_config, out, labels, halted=torch.tensor([True, False, False]), steps=torch.tensor([1, 2, 3])
    )
    assert m["count"] == 1 and m["segments"] == 1


def test_fixed_evaluation_runs_exactly_halt_max_steps(tiny_config):
    model = CountingModel(RecursiveReasoner(tiny_config).init_weights(0).eval())
    model.initial_carry = model.inner.initial_carry
    batches = [make_batch(tiny_config, 3), make_batch(tiny_config, 2, start_id=3, seed=1)]
    records = list(run_fixed(model, tiny_config, batches))
    assert model.calls == 2 * tiny_config.halt_max_steps
    assert [r.segments for r in records] == [tiny_config.halt_max_steps] * 5
    assert sorted(r.sample_id for r in records) == list(range(5))


def test_adaptive_evaluation_halts_per_row_and_refills(tiny_config):
    cfg = dataclasses.replace(tiny_config, q_target="halt_only", halt_max_steps=6)
    model = RecursiveReasoner(cfg).init_weights(0).eval()
    # Make the Q-head's halt logit depend on the input so rows halt at different segments.
    with torch.no_grad():
        model.q_head.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(3))
        model.q_head.bias.zero_()
    samples = [make_batch(cfg, 5, start_id=0), make_batch(cfg, 6, start_id=5, seed=1)]
    records = list(run_adaptive(model, cfg, samples, batch_size=4))
    assert sorted(r.sample_id for r in records) == list(range(11))  # each sample exactly once
    segs = [r.segments for r in records]
    assert min(segs) >= 1 and max(segs) <= 6
    assert len(set(segs)) > 1, f"rows should halt at different segments, got {segs}"
    for r in records:  # a row halted early exactly when its Q-head said so
        assert r.segments == 6 or r.q_halt > 0

    # Fixed mode on the same samples gives each record halt_max_steps segments.
    fixed = puzzle_metrics(run_fixed(model, cfg, samples))
    adaptive = puzzle_metrics(records)
    assert fixed["mean_segments"] == 6
    assert adaptive["mean_segments"] < 6
    assert fixed["samples"] == adaptive["samples"] == 11


def test_puzzle_metrics_by_hand():
    from hrm_mega.inference.puzzle import PuzzleRecord

    recs = [
        PuzzleRecord(0, torch.tensor([1, 2]), torch.tensor([1, 2]), 2, 1.0),  # solved, q right
        PuzzleRecord(1, torch.tensor([1, 3]), torch.tensor([1, 2]), 4, 1.0),  # half, q wrong
    ]
    m = puzzle_metrics(recs)
    assert m == {"samples": 2, "exact_accuracy": 0.5, "token_accuracy": 0.75, "q_halt_accuracy": 0.5,
                 "mean_segments": 3.0}  # fmt: skip
    with pytest.raises(ValueError, match="no labelled samples"):
        puzzle_metrics([])


def test_rows_without_labels_are_not_counted_as_solved(tiny_config):
    """A row whose labels are all ignored is left out of every metric (as HRM's loss head does), in
    evaluation records and in the training metrics alike; before, it counted as an exact solve."""
    from hrm_mega.inference.puzzle import PuzzleRecord

    unlabelled = torch.full((2,), IGNORE_LABEL)
    recs = [
        PuzzleRecord(0, torch.tensor([1, 2]), torch.tensor([1, 2]), 2, 1.0),  # solved, q right
        PuzzleRecord(1, torch.tensor([1, 3]), torch.tensor([1, 2]), 4, 1.0),  # half, q wrong
        PuzzleRecord(2, torch.tensor([5, 5]), unlabelled, 6, 1.0),  # nothing to check
    ]
    m = puzzle_metrics(recs)
    assert m == {"samples": 2, "exact_accuracy": 0.5, "token_accuracy": 0.75, "q_halt_accuracy": 0.5,
                 "mean_segments": 3.0}  # fmt: skip
    with pytest.raises(ValueError, match="no labelled samples"):
        puzzle_metrics(recs[2:])

    # Training metrics: the halted unlabelled row 1 is neither counted nor solved.
    logits = torch.zeros(2, 2, 3)
    labels = torch.stack([torch.zeros(2, dtype=torch.long), unlabelled])
    out = SegmentOutput(Carry(torch.zeros(2), torch.zeros(2)), logits, torch.ones(2), torch.zeros(2))
    _, m = act_loss(tiny_config, out, labels, halted=torch.tensor([True, True]), steps=torch.tensor([1, 3]))
    assert m["count"] == 1 and m["exact_accuracy"] == 1 and m["segments"] == 1
    assert m["token_accuracy"] == 1 and m["q_halt_accuracy"] == 1
