"""RL rollouts on tiny random models: shapes, seeded reproducibility, log-probs against the training
forward's, and the ACT segments / H cycles each sample used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hrm_mega.config import ConfigError, LMModelConfig, PuzzleModelConfig, RLConfig, load_config, read_config
from hrm_mega.inference.generate import generate, left_pad, stream_generate
from hrm_mega.inference.puzzle import run_adaptive
from hrm_mega.models.lm import HRMGemma
from hrm_mega.models.puzzle import RecursiveReasoner
from hrm_mega.rl.advantages import group_advantages
from hrm_mega.rl.losses import policy_loss
from hrm_mega.rl.rollout import (
    lm_policy,
    lm_rollout,
    logprob_mismatch,
    puzzle_policy,
    puzzle_rollout,
    recompute_policy,
    rollout_kv_pool,
)

SEQ, VOCAB, MAX_STEPS = 16, 11, 4

# --------------------------------------------------------------------------------------------------
# Puzzles
# --------------------------------------------------------------------------------------------------


def puzzle_model(loss: str = "softmax", q_target: str = "bootstrap", seed: int = 0) -> RecursiveReasoner:
    """A tiny RecursiveReasoner whose Q-head is random, so rows halt after different segments."""
    config = PuzzleModelConfig(
        vocab_size=VOCAB, seq_len=SEQ, num_puzzle_identifiers=4, hidden_size=32, num_heads=2, h_layers=1,
        l_layers=1, h_cycles=2, l_cycles=1, puzzle_emb_ndim=32, halt_max_steps=MAX_STEPS, loss=loss,
        q_target=q_target,
    )  # fmt: skip
    model = RecursiveReasoner(config).init_weights(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.q_head.weight.copy_(torch.randn(2, 32, generator=generator))
        model.q_head.bias.zero_()
        model.puzzle_emb.copy_(torch.randn(model.puzzle_emb.shape, generator=generator))
    return model


def puzzle_batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(1, VOCAB, (b, SEQ), generator=generator),
        "labels": torch.randint(2, VOCAB, (b, SEQ), generator=generator),
        "puzzle_identifiers": torch.arange(b) % 4,
        "sample_id": torch.arange(100, 100 + b),
    }


def test_puzzle_rollout_shapes_and_seeds() -> None:
    model, batch = puzzle_model(), puzzle_batch()
    ro = puzzle_rollout(model, batch, group_size=4, seed=7)
    assert ro.tokens.shape == (12, SEQ) and ro.logprobs.shape == ro.mask.shape == (12, SEQ + MAX_STEPS)
    assert ro.segments.shape == (12,) and bool(((ro.segments >= 1) & (ro.segments <= MAX_STEPS)).all())
    assert bool(((ro.tokens >= 0) & (ro.tokens < VOCAB)).all())
    assert torch.equal(ro.batch["inputs"], batch["inputs"].repeat_interleave(4, dim=0))  # group-major
    assert torch.equal(ro.batch["sample_id"][:4], torch.full((4,), 100))
    assert bool((ro.cell_logprobs < 0).all()) and bool(ro.mask[:, :SEQ].all())
    again = puzzle_rollout(model, batch, group_size=4, seed=7)
    assert torch.equal(again.tokens, ro.tokens) and torch.equal(again.segments, ro.segments)
    assert torch.equal(again.logprobs, ro.logprobs)
    other = puzzle_rollout(model, batch, group_size=4, seed=8)
    assert not torch.equal(other.tokens, ro.tokens)
    assert not torch.equal(ro.tokens[0], ro.tokens[1])  # samples of one group differ


@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
@pytest.mark.parametrize("halting", ["sample", "greedy", "fixed"])
def test_puzzle_logprobs_equal_the_training_forward(loss: str, halting: str) -> None:
    model = puzzle_model(loss)
    ro = puzzle_rollout(model, puzzle_batch(), group_size=3, halting=halting, seed=1)
    new = puzzle_policy(model, ro)
    assert new.logprobs.shape == ro.logprobs.shape == new.entropy.shape
    assert (new.logprobs - ro.logprobs).abs().max().item() < 1e-5
    assert float(logprob_mismatch(ro.logprobs, new.logprobs, ro.mask)["logprob_diff_max_abs"]) < 1e-5
    assert bool((new.logprobs[~ro.mask] == 0).all()) and bool((new.entropy[:, :SEQ] > 0).all())


def test_greedy_segments_match_adaptive_evaluation() -> None:
    """Greedy halting is the evaluation rule: the segments agree with inference/puzzle.run_adaptive."""
    model, batch = puzzle_model(), puzzle_batch(b=6, seed=3)
    ro = puzzle_rollout(model, batch, group_size=1, halting="greedy")
    with torch.no_grad():
        records = {r.sample_id: r.segments for r in run_adaptive(model, model.config, [batch], batch_size=6)}
    assert ro.segments.tolist() == [records[int(i)] for i in batch["sample_id"]]
    assert len(set(ro.segments.tolist())) > 1  # the random Q-head halts rows at different segments
    assert not bool(ro.mask[:, SEQ:].any())  # no decision is an action


def test_sampled_halting_decisions_and_segments() -> None:
    model = puzzle_model()
    ro = puzzle_rollout(model, puzzle_batch(), group_size=8, halting="sample", seed=2)
    decisions = ro.mask[:, SEQ:]
    # A row that ran k segments decided after segments 1..k (continue, ..., halt), except at the last one.
    assert decisions.sum(dim=1).tolist() == torch.clamp(ro.segments, max=MAX_STEPS - 1).tolist()
    assert bool((ro.halt_logprobs[decisions] < 0).all()) and bool((ro.halt_logprobs[~decisions] == 0).all())
    assert len(set(ro.segments[:8].tolist())) > 1  # one puzzle's samples use different compute
    fixed = puzzle_rollout(model, puzzle_batch(), group_size=2, halting="fixed")
    assert bool((fixed.segments == MAX_STEPS).all()) and not bool(fixed.mask[:, SEQ:].any())


def test_halt_only_q_target_samples_from_q_halt() -> None:
    """halt_only: P(halt) = sigmoid(q_halt); a large positive q_halt bias halts every row after one segment."""
    model = puzzle_model(q_target="halt_only")
    with torch.no_grad():
        model.q_head.weight.zero_()
        model.q_head.bias.copy_(torch.tensor([30.0, -30.0]))
    ro = puzzle_rollout(model, puzzle_batch(), group_size=2)
    assert bool((ro.segments == 1).all()) and bool(ro.mask[:, SEQ].all())
    assert ro.halt_logprobs[:, 0].abs().max().item() < 1e-6  # log sigmoid(30) ~ 0


def test_rollouts_do_not_depend_on_batch_position() -> None:
    """Draws are keyed by sample id: the same puzzles in another order (another rank) get the same samples."""
    model, batch = puzzle_model(), puzzle_batch(b=4, seed=5)
    order = torch.tensor([2, 0, 3, 1])
    ro = puzzle_rollout(model, batch, group_size=2, seed=3)
    permuted = puzzle_rollout(model, {k: v[order] for k, v in batch.items()}, group_size=2, seed=3)
    rows = (order[:, None] * 2 + torch.arange(2)).reshape(-1)  # where each permuted row sits in `ro`
    assert torch.equal(permuted.tokens, ro.tokens[rows]) and torch.equal(permuted.segments, ro.segments[rows])


def test_cells_are_drawn_from_the_final_segment_distribution() -> None:
    model, batch = puzzle_model(), puzzle_batch(b=1)
    n = 400
    ro = puzzle_rollout(model, batch, group_size=n, halting="fixed", seed=11)
    with torch.no_grad():
        carry = model.initial_carry(1)
        for _ in range(MAX_STEPS):
            out = model(carry, batch)
            carry = out.carry
    probs = out.logits[0].softmax(-1)  # [SEQ, VOCAB]
    freq = torch.nn.functional.one_hot(ro.tokens, VOCAB).float().mean(dim=0)
    assert (freq - probs).abs().max().item() < 0.1  # 4 standard errors at n = 400
    cold = puzzle_rollout(model, batch, group_size=2, halting="fixed", temperature=1e-4, seed=11)
    assert torch.equal(cold.tokens, out.logits.argmax(-1).expand(2, -1))


def test_puzzle_recompute_has_gradients_and_micro_batches() -> None:
    model = puzzle_model()
    ro = puzzle_rollout(model, puzzle_batch(), group_size=4, seed=4)
    new = recompute_policy(model, ro)
    (new.logprobs * ro.mask).sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.q_head.weight.grad.abs().sum() > 0  # sampled halting decisions are actions
    part = puzzle_policy(model, ro.select(slice(4, 8)))
    assert (part.logprobs - new.logprobs[4:8]).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------
# Language (HRMGemma)
# --------------------------------------------------------------------------------------------------

LM_VOCAB = 64


def lm_model(seed: int = 0, **overrides) -> HRMGemma:
    """One local-global group (3 local + 1 global) plus a trailing local layer; open gates and a random
    halting head, so more cycles change the result and tokens halt at different cycles."""
    fields = dict(
        vocab_size=LM_VOCAB, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=2, num_kv_heads=1,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, local_per_global=3, max_position=64,
        h_cycles=2, l_cycles=1,
    )  # fmt: skip
    model = HRMGemma(LMModelConfig(**{**fields, **overrides})).init_weights(seed).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks.values():
            for name in ("gate_LL", "gate_LH", "gate_HH"):
                getattr(block, name).copy_(torch.randn(32, generator=generator) * 0.5)
            block.halt_head.weight.copy_(torch.randn(1, 32, generator=generator) * 2.0)
    return model


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([[5, 9, 13, 20, 7], [30, 31], [8, 44, 3]])


def test_lm_rollout_shapes_and_seeds() -> None:
    model = lm_model()
    ids, mask = prompts()
    ro = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=5, seed=3)
    assert ro.completion_ids.shape == ro.logprobs.shape == ro.completion_mask.shape == (6, 5)
    assert ro.cycles.shape == (6, 5, 1) and ro.prompt_ids.shape == (6, 5)
    assert torch.equal(ro.prompt_mask, mask.repeat_interleave(2, dim=0))  # group-major rows
    assert bool(ro.completion_mask.all()) and not bool(ro.finished.any())  # no eos_id: every step is real
    assert bool((ro.logprobs < 0).all())
    again = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=5, seed=3)
    assert torch.equal(again.completion_ids, ro.completion_ids) and torch.equal(again.logprobs, ro.logprobs)
    other = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=5, seed=4)
    assert not torch.equal(other.completion_ids, ro.completion_ids)
    none = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=0)
    assert none.completion_ids.shape == none.logprobs.shape == (6, 0) and none.cycles.shape == (6, 0, 1)
    assert lm_policy(model, none).logprobs.shape == (6, 0)


@pytest.mark.parametrize(
    "options", [{}, {"top_p": 0.8, "vocab_limit": 40}], ids=["plain", "top_p+vocab_limit"]
)
def test_lm_logprobs_equal_the_training_forward(options: dict) -> None:
    """No halting and max_cycles = h_cycles: cached decoding computes the training forward, so the
    log-probs agree (top-p truncation changes which tokens are drawn, not the policy's log-probs)."""
    model = lm_model(value_head=True)
    ids, mask = prompts()
    ro = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=6, seed=5, **options)
    assert bool((ro.cycles == 2).all())  # every block ran h_cycles for every token
    if "vocab_limit" in options:
        assert int(ro.completion_ids.max()) < 40
    new = lm_policy(model, ro)
    assert (new.logprobs - ro.logprobs).abs().max().item() < 1e-5
    assert new.values is not None and new.values.shape == (6, 6) and new.entropy.shape == (6, 6)
    part = lm_policy(model, ro.select(slice(2, 4)))
    assert (part.logprobs - new.logprobs[2:4]).abs().max().item() < 1e-5


def test_lm_cycles_with_dynamic_halting() -> None:
    """With a halting threshold the cycles per token are generate()'s, vary between tokens, and the
    training forward (all h_cycles) no longer reproduces the rollout's log-probs: the mismatch shows it."""
    model = lm_model()
    ids, mask = prompts()
    ro = lm_rollout(model, ids, attention_mask=mask, group_size=2, max_new_tokens=6, seed=6, max_cycles=3,
                    halt_threshold=0.5)  # fmt: skip
    reference = generate(model, ids.repeat_interleave(2, dim=0), attention_mask=mask.repeat_interleave(2, dim=0),
                         max_new_tokens=6, seed=6, max_cycles=3, halt_threshold=0.5)  # fmt: skip
    assert torch.equal(ro.completion_ids, reference.tokens) and torch.equal(ro.cycles, reference.cycles)
    assert len(set(ro.cycles.flatten().tolist())) > 1 and int(ro.cycles.max()) <= 3
    mismatch = logprob_mismatch(ro.logprobs, lm_policy(model, ro).logprobs, ro.completion_mask)
    assert float(mismatch["logprob_diff_max_abs"]) > 1e-3


def test_lm_rollout_stops_rows_at_eos() -> None:
    model = lm_model()
    ids, mask = prompts()
    free = lm_rollout(model, ids, attention_mask=mask, group_size=1, max_new_tokens=6, seed=9)
    eos = int(free.completion_ids[0, 2])  # row 0 draws it at step 2; the same seed draws the same tokens
    ro = lm_rollout(
        model, ids, attention_mask=mask, group_size=1, max_new_tokens=6, seed=9, eos_id=eos, pad_id=0
    )
    first = int((free.completion_ids[0] == eos).nonzero()[0])
    assert ro.completion_mask[0].tolist() == [t <= first for t in range(ro.completion_ids.shape[1])]
    assert bool(ro.finished[0]) and bool((ro.logprobs[0, first + 1 :] == 0).all())
    assert ro.completion_lists(eos_id=eos)[0] == free.completion_ids[0, :first].tolist()
    new = lm_policy(model, ro)
    assert (new.logprobs - ro.logprobs).abs().max().item() < 1e-5
    assert bool((new.logprobs[~ro.completion_mask] == 0).all())


def one_token_halting(model: HRMGemma, t: float, temperature: float) -> torch.Tensor:
    """P(k cycles) [3] for a one-token prompt by the paper's rule, from the training forward's halting
    logits (an independent path from infer's): stop after cycle n with sigmoid((logit_n - logit(t)) / T),
    the third cycle always last."""
    _, aux = model(torch.tensor([[5]]), cycles=3)
    x = (aux["halt_logits"][0, :, 0, 0] - torch.logit(torch.tensor(t))) / temperature
    p = torch.sigmoid(x.double())
    return torch.stack((p[0], (1 - p[0]) * p[1], (1 - p[0]) * (1 - p[1])))


def test_lm_drawn_halting_follows_the_head_and_its_logprobs() -> None:
    """rl.halting=sample for the LM: the first token's cycle counts over 4000 draws follow the halting
    head's distribution (within 4 standard errors), and each row's halting log-prob is log P(its count),
    both against the training forward's halting logits."""
    model = lm_model(seed=2)
    with torch.no_grad():  # P(halt) near neither 0 nor 1
        model.blocks["0"].halt_head.weight.mul_(0.05)
    t, temp, n = 0.6, 1.5, 4000
    with torch.no_grad():
        expected = one_token_halting(model, t, temp)
    assert bool((expected > 0.1).all()), expected
    ro = lm_rollout(model, torch.tensor([[5]]), group_size=n, max_new_tokens=1, max_cycles=3, halt_threshold=t,
                    halt_temperature=temp, seed=11)  # fmt: skip
    k = ro.cycles[:, 0, 0]
    for count in (1, 2, 3):
        p = expected[count - 1].item()
        assert abs((k == count).double().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5, count
    assert torch.allclose(ro.halt_logprobs[:, 0].double(), expected.log()[k - 1], atol=1e-5)
    token_lp = ro.logprobs - ro.halt_logprobs  # the joint action's log-prob: halting + token
    assert bool((token_lp < 0).all()) and torch.equal(ro.completion_ids, lm_rollout(
        model, torch.tensor([[5]]), group_size=n, max_new_tokens=1, max_cycles=3, halt_threshold=t,
        halt_temperature=temp, seed=11).completion_ids)  # fmt: skip


def test_lm_drawn_halting_is_replayed_by_the_policy_forward() -> None:
    """A rollout with drawn halting (eos, row compaction, prompts of different lengths): decoding with
    and without the KV cache draws the same tokens and cycles; the policy forward replays the recorded
    cycles and gives the rollout's log-probs (token + halting) with gradient on the halting head."""
    model = lm_model()
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, seed=7, max_cycles=4, halt_threshold=0.5, halt_temperature=1.0)
    free = lm_rollout(model, ids, attention_mask=mask, group_size=3, **kw)
    eos = int(free.completion_ids[1, 2])
    ro = lm_rollout(model, ids, attention_mask=mask, group_size=3, eos_id=eos, **kw)
    assert bool(ro.finished.any()) and not bool(ro.completion_mask.all())  # some rows stop early
    assert len(set(ro.cycles[ro.completion_mask].flatten().tolist())) == 4  # 1..4 cycles all drawn
    rows = dict(attention_mask=mask.repeat_interleave(3, dim=0), eos_id=eos, **kw)
    cached = list(stream_generate(model, ids.repeat_interleave(3, dim=0), **rows))
    plain = list(stream_generate(model, ids.repeat_interleave(3, dim=0), use_cache=False, **rows))
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cycles, b.cycles)
        assert (a.halt_logprobs - b.halt_logprobs).abs().max().item() < 1e-4
    assert torch.equal(torch.stack([s.tokens for s in cached], dim=1)[ro.completion_mask],
                       ro.completion_ids[ro.completion_mask])  # fmt: skip
    model.train()
    new = lm_policy(model, ro)
    assert (new.logprobs - ro.logprobs).abs().max().item() < 1e-4
    assert bool((new.logprobs[~ro.completion_mask] == 0).all())
    new.logprobs.sum().backward()
    assert model.blocks["0"].halt_head.weight.grad.abs().sum().item() > 0


def test_grpo_on_drawn_lm_halting_moves_the_head_the_way_the_reward_pays() -> None:
    """One GRPO step on rollouts whose reward pays for fewer cycles (1 - 0.5 cycles / 3): the first
    token's probability of halting after one cycle rises."""
    model = lm_model(seed=2)
    with torch.no_grad():
        model.blocks["0"].halt_head.weight.mul_(0.05)
    halting = dict(max_cycles=3, halt_threshold=0.6, halt_temperature=1.5)
    ro = lm_rollout(model, torch.tensor([[5]]), group_size=64, max_new_tokens=1, seed=3, **halting)
    reward = 1 - 0.5 * ro.cycles[:, 0, 0].float() / 3
    model.train()
    new = lm_policy(model, ro)
    loss, _ = policy_loss(new.logprobs, ro.logprobs, group_advantages(reward, 64, "none"), ro.completion_mask)
    loss.backward()
    with torch.no_grad():
        before = one_token_halting(model, 0.6, 1.5)[0]
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        after = one_token_halting(model, 0.6, 1.5)[0]
    assert after > before + 1e-3, (before, after)


def test_drawn_lm_halting_config_errors_are_one_line() -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs/rl/grpo_arith_tiny.yaml"
    for sets, message in (
        (["rl.halt_threshold=0.9", "rl.algorithm=ppo", "model.value_head=true"], "rl.algorithm=grpo only"),
        (["rl.halt_threshold=0.9", "parallel.pp=2"], "parallel.pp > 1 or zero_stage 3"),
        (["rl.halt_threshold=0.9", "parallel.zero_stage=3"], "parallel.pp > 1 or zero_stage 3"),
    ):
        with pytest.raises(ConfigError, match=message) as e:
            load_config(recipe, sets, world_size=4, command="rl")
        assert "\n" not in str(e.value)
    load_config(
        recipe, ["rl.halt_threshold=0.9", "rl.halting=greedy", "parallel.pp=2"], world_size=4, command="rl"
    )


def assert_same_rollout(a, b) -> None:
    """Tokens, masks, cycles and log-probs bit for bit (the paged cache gathers its blocks into the
    rectangle the rectangular cache holds, so attention sums the same values in the same order)."""
    for name in ("completion_ids", "completion_mask", "cycles", "finished", "logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("block_size, resident", [(4, 0), (2, 40)], ids=["resident", "offloaded"])
def test_lm_rollout_with_the_paged_cache_equals_the_rectangular_one(block_size: int, resident: int) -> None:
    """rl.kv_cache=paged: the same samples, cycles (dynamic halting) and log-probs as the rectangular
    cache; with a small resident budget blocks move to the second tier and back, outputs unchanged."""
    model = lm_model()
    ids, mask = prompts()
    options = dict(attention_mask=mask, group_size=2, max_new_tokens=8, seed=11, top_k=20, max_cycles=3,
                   halt_threshold=0.5, eos_id=3, pad_id=0)  # fmt: skip
    rectangular = lm_rollout(model, ids, **options)
    rl = RLConfig(kv_cache="paged", kv_block_size=block_size, kv_resident_blocks=resident)
    pool = rollout_kv_pool(rl, model)
    assert pool is not None and pool.block_size == block_size
    assert pool.resident_blocks == (resident or None)
    paged = lm_rollout(model, ids, kv_pool=pool, **options)
    assert_same_rollout(paged, rectangular)
    assert len(set(paged.cycles.flatten().tolist())) > 1  # halting varies, so slots differ per step
    assert pool.counters["peak_blocks"] > 0 and pool.blocks_in_use == 0  # used, then given back
    if resident:
        assert pool.counters["offloaded"] > 0 and pool.counters["reloaded"] > 0
        assert pool.counters["peak_resident"] <= resident
    again = lm_rollout(model, ids, kv_pool=pool, **options)  # the pool serves the next chunk as well
    assert_same_rollout(again, rectangular)
    assert rollout_kv_pool(RLConfig(), model) is None  # the default: the rectangular cache


def test_rl_kv_cache_options_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match=r"^rl.kv_cache='blocks' must be one of 'rectangular', 'paged'$"):
        read_config(None, ["rl.kv_cache=blocks"])
    with pytest.raises(ConfigError, match=r"^rl.kv_dtype='int4' must be one of 'model', 'int8'$"):
        read_config(None, ["rl.kv_dtype=int4"])
    for fields, message in [
        ({"kv_block_size": 0}, "rl.kv_block_size=0 must be >= 1"),
        ({"kv_cache": "paged", "kv_resident_blocks": -1}, "rl.kv_resident_blocks=-1 must be >= 0"),
        ({"kv_resident_blocks": 8}, "need rl.kv_cache=paged"),
        ({"kv_dtype": "int8"}, "need rl.kv_cache=paged"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RLConfig(**fields).validate()
    RLConfig(kv_cache="paged", kv_block_size=8, kv_resident_blocks=64, kv_dtype="int8").validate()
    puzzle_rl = Path(__file__).resolve().parents[1] / "configs/rl/grpo_sudoku_tiny.yaml"
    with pytest.raises(ConfigError, match="rl.kv_cache=paged applies to language models"):
        load_config(puzzle_rl, ["rl.kv_cache=paged"], command="rl")
    pool = rollout_kv_pool(read_config(None, ["rl.kv_cache=paged", "rl.kv_dtype=int8"]).rl, lm_model())
    assert pool is not None and pool.kv_dtype == "int8" and pool.block_size == 16


class CharTokenizer:
    """Enough of a SentencePiece processor for TextEnvironment's encode and decode: ids 4.. are characters."""

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) % (LM_VOCAB - 4) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i) for i in ids)


def test_the_rl_trainer_rolls_out_into_the_configured_cache(monkeypatch) -> None:
    """rl.kv_cache reaches the rollouts of the LM trainer (TextEnvironment._rollout_chunks, what its
    rollout step calls): one pool per step shared by the chunks, and the same scored rollouts."""
    from types import SimpleNamespace

    from hrm_mega.training.tasks import rl_lm

    pools: list = []

    def recording(rl: RLConfig, model: torch.nn.Module):
        pools.append(rollout_kv_pool(rl, model))
        return pools[-1]

    monkeypatch.setattr(rl_lm, "rollout_kv_pool", recording)
    model = lm_model()
    questions = [("1+2=", "3", {}), ("4-1=", "3", {}), ("2*3=", "6", {})]

    def rollouts(*sets: str):
        config = read_config(None, ["rl.rewards={arithmetic_exact_match: 1}", "rl.group_size=2", "rl.max_cycles=2",
                                    "rl.max_new_tokens=6", "rl.rollout_chunk=2", *sets])  # fmt: skip
        env = rl_lm.TextEnvironment(config.validate())
        env.tokenizer, env.vocab_limit = CharTokenizer(), LM_VOCAB
        env.bos_id, env.eos_id, env.pad_id = 1, 2, 0
        trainer = SimpleNamespace(world=SimpleNamespace(device=torch.device("cpu")), step=3)
        return env._rollout_chunks(trainer, model, questions, 0, [0, 2])  # two chunks

    rectangular = rollouts()
    paged = rollouts("rl.kv_cache=paged", "rl.kv_block_size=4")
    assert pools[0] is None and pools[1] is not None and len(pools) == 2
    assert pools[1].block_size == 4 and pools[1].counters["peak_blocks"] > 0
    assert_same_rollout(paged.rollout, rectangular.rollout)
    assert torch.equal(paged.rewards, rectangular.rewards) and paged.texts == rectangular.texts


def test_recompute_policy_takes_rollouts_only() -> None:
    with pytest.raises(ValueError, match="PuzzleRollout or an LMRollout, not a dict"):
        recompute_policy(lm_model(), {})


def test_rollout_argument_errors() -> None:
    with pytest.raises(ValueError, match="group_size=0 must be >= 1"):
        puzzle_rollout(puzzle_model(), puzzle_batch(), group_size=0)
    with pytest.raises(ValueError, match="halting='always'"):
        puzzle_rollout(puzzle_model(), puzzle_batch(), group_size=2, halting="always")
    with pytest.raises(ValueError, match="temperature=0"):
        puzzle_rollout(puzzle_model(), puzzle_batch(), group_size=2, temperature=0)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="top_p=0"):
        lm_rollout(lm_model(), ids, attention_mask=mask, group_size=2, max_new_tokens=2, top_p=0)


def test_grpo_steps_raise_the_reward() -> None:
    """The pieces compose: rollouts, group advantages, the recomputed policy and the clipped loss make
    a tiny puzzle model copy more label cells (reward = the share of cells equal to the labels)."""
    model, batch = puzzle_model(), puzzle_batch(b=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    history = []
    for step in range(20):
        ro = puzzle_rollout(model, batch, group_size=8, seed=step)
        reward = (ro.tokens == ro.batch["labels"]).float().mean(dim=1)
        new = puzzle_policy(model, ro)
        loss, _ = policy_loss(new.logprobs, ro.logprobs, group_advantages(reward, 8), ro.mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(reward.mean().item())
    assert sum(history[-5:]) / 5 > sum(history[:5]) / 5 + 0.08


def test_halt_temperature_is_the_sampled_halting_policy() -> None:
    """P(halt) = sigmoid(halt logit / halt_temperature): the rollout's decision log-probs are those of
    that policy (and the training forward's), its draws follow it, and near 0 it is the greedy rule."""
    model, batch = puzzle_model(q_target="halt_only"), puzzle_batch(b=1)
    with torch.no_grad():  # P(halt) near neither 0 nor 1
        model.q_head.weight.mul_(0.05)
        model.q_head.bias.copy_(torch.tensor([0.3, 0.0]))
        q1 = model(model.initial_carry(1), batch).q_halt  # halt_only: the halting logit is q_halt
    n, t = 400, 0.5
    ro = puzzle_rollout(model, batch, group_size=n, seed=5, halt_temperature=t)
    p = torch.sigmoid(q1 / t)
    assert 0.1 < p.item() < 0.9
    halted = ro.segments == 1
    assert abs(halted.float().mean().item() - p.item()) < 0.1  # 4 standard errors at n = 400
    expected = torch.where(halted, torch.log(p), torch.log1p(-p))
    assert torch.allclose(ro.halt_logprobs[:, 0], expected, atol=1e-5)
    new = puzzle_policy(model, ro)
    assert (new.logprobs - ro.logprobs)[ro.mask].abs().max().item() < 1e-5
    batch = puzzle_batch(b=4, seed=9)
    cold = puzzle_rollout(model, batch, group_size=3, seed=5, halt_temperature=1e-4)
    greedy = puzzle_rollout(model, batch, group_size=3, halting="greedy")
    assert torch.equal(cold.segments, greedy.segments)
    with pytest.raises(ValueError, match="halt_temperature=0"):
        puzzle_rollout(model, batch, group_size=2, halt_temperature=0)
    with pytest.raises(ConfigError, match="rl.halt_temperature=0"):
        RLConfig(halt_temperature=0).validate()


@pytest.mark.parametrize("early_pays", [True, False])
def test_grpo_moves_the_halting_logit_the_way_the_reward_pays(early_pays: bool) -> None:
    """One GRPO step on the halting head: when every sample is right and pays for its segments
    (reward 1 - 0.2 segments / 4), the halting logit after segment 1 must rise on every puzzle; when
    a sample that stops after segment 1 is wrong (reward 0), it must fall."""
    model, batch = puzzle_model(q_target="halt_only"), puzzle_batch(b=2)
    with torch.no_grad():  # P(halt) near neither 0 nor 1
        model.q_head.weight.mul_(0.05)
        model.q_head.bias.copy_(torch.tensor([0.3, 0.0]))
    ro = puzzle_rollout(model, batch, group_size=16, seed=3)
    assert len(set(ro.segments[:16].tolist())) > 1 and len(set(ro.segments[16:].tolist())) > 1
    right = torch.ones(32) if early_pays else (ro.segments > 1).float()
    reward = right - 0.2 * ro.segments.float() / MAX_STEPS
    new = puzzle_policy(model, ro)
    loss, _ = policy_loss(new.logprobs, ro.logprobs, group_advantages(reward, 16, "none"), ro.mask)
    loss.backward()
    with torch.no_grad():
        before = model(model.initial_carry(2), batch).q_halt
        for p in model.q_head.parameters():
            p -= 1.0 * p.grad
        after = model(model.initial_carry(2), batch).q_halt
    assert bool((after > before).all()) if early_pays else bool((after < before).all())
