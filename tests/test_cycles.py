"""H cycles are an argument, never model state, and what a model reports is what ran.

The count of H updates is measured with a forward hook on each block's global (H) layer, which runs once
per H update in the training forward, in `infer`, and in the pipeline stage modules alike.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hrm_mega.config import LMModelConfig, PuzzleModelConfig
from hrm_mega.models.lm import HRMGemma, lm_loss
from hrm_mega.models.lm_pipeline import (
    CycleBlockLayer,
    EmbeddingLayer,
    FinalNormLayer,
    TailLayer,
    pipeline_inputs,
    tied_head,
)
from hrm_mega.models.puzzle import RecursiveReasoner

SEQ, SEED = 10, 3


def lm_config(**overrides) -> LMModelConfig:
    """2 groups of 3 local + 1 global, then 2 trailing local layers; trained at h_cycles=2."""
    fields = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=10, num_heads=2, num_kv_heads=1,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, local_per_global=3, max_position=64,
        h_cycles=2, l_cycles=2,
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def open_model(config: LMModelConfig) -> HRMGemma:
    """Open gates (so each cycle changes the result) and random halting heads (tokens halt apart)."""
    model = HRMGemma(config).init_weights(SEED).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for block in model.blocks.values():
            for name in ("gate_LL", "gate_LH", "gate_HH"):
                getattr(block, name).copy_(torch.randn(config.hidden_size, generator=generator) * 0.5)
            block.halt_head.weight.copy_(torch.randn(1, config.hidden_size, generator=generator) * 2.0)
    return model


def ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 96, (batch, SEQ), generator=torch.Generator().manual_seed(1))


class HUpdates:
    """Counts the H updates each block runs: calls of its global layer (one per H update)."""

    def __init__(self, blocks: dict[str, torch.nn.Module]) -> None:
        self.counts = dict.fromkeys(blocks, 0)
        self.handles = [
            block.H.layers[0].register_forward_hook(lambda *_, g=g: self._count(g))
            for g, block in blocks.items()
        ]

    def _count(self, g: str) -> None:
        self.counts[g] += 1

    def take(self) -> list[int]:
        counts = list(self.counts.values())
        self.counts = dict.fromkeys(self.counts, 0)
        return counts


def test_forward_runs_and_reports_the_cycles_argument() -> None:
    config = lm_config()
    model = open_model(config)
    ran = HUpdates(model.blocks)
    with torch.no_grad():
        default, aux = model(ids())
        assert ran.take() == [2, 2] and aux["cycles_used"].tolist() == [2, 2]
        three, aux = model(ids(), cycles=3)
        assert ran.take() == [3, 3] and aux["cycles_used"].tolist() == [3, 3]
        assert aux["halt_logits"].shape[:2] == (2, 3) and aux["converged"].shape[:2] == (2, 2)
        one, aux = model(ids(), cycles=1)
        assert ran.take() == [1, 1] and aux["cycles_used"].tolist() == [1, 1]
        # no per-call state: without the argument the model runs its config's count again
        again, aux = model(ids())
        assert ran.take() == [2, 2] and aux["cycles_used"].tolist() == [2, 2]
    assert torch.equal(again, default)
    assert (three - default).abs().max() > 1e-3 and (one - default).abs().max() > 1e-3
    assert not any(hasattr(m, "h_cycles") for m in model.modules())


def test_cycles_argument_is_the_model_trained_at_that_count() -> None:
    """forward(cycles=3) of an h_cycles=2 model is the same weights under h_cycles=3, loss terms included."""
    model = open_model(lm_config())
    other = HRMGemma(lm_config(h_cycles=3)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits, aux = model(ids(), cycles=3)
        expected, expected_aux = other(ids())
    assert torch.equal(logits, expected)
    for key in ("halt_logits", "converged", "cycles_used"):
        assert torch.equal(aux[key], expected_aux[key]), key
    assert lm_loss(logits, ids(), aux, model.config)["expected_cycles"] > 1.0


def test_gradients_follow_the_cycles_argument() -> None:
    """one_step differentiates only the last cycle of the N given, whichever N: training at a sampled
    count with recompute (activation checkpointing) gives the gradients of the plain forward."""
    config = lm_config(grad_mode="one_step")
    plain, recomputed = open_model(config).train(), open_model(config).train()
    for block in recomputed.blocks.values():
        block.recompute = True
    grads = []
    for model in (plain, recomputed):
        logits, aux = model(ids(), cycles=3)
        assert aux["cycles_used"].tolist() == [3, 3]
        lm_loss(logits, ids(), aux, config)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.halt_head.weight" in grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_cycles_argument_is_checked() -> None:
    model = open_model(lm_config())
    with pytest.raises(ValueError, match=r"cycles=0 \(H cycles\) must be >= 1"):
        model(ids(), cycles=0)
    with pytest.raises(ValueError, match=r"cycles=0 \(H cycles\) must be >= 1"):
        pipeline_inputs(ids(), torch.arange(SEQ), ids(), ids() > 0, 0)


def test_infer_reports_the_cycles_that_ran_when_halting_stops_early() -> None:
    """infer's cycles [G, b, s] are what ran: its default is the config's count, a max_cycles above it
    runs more, and a block whose halting head fires for every token stops after its first update."""
    model = open_model(lm_config())
    ran = HUpdates(model.blocks)
    with torch.no_grad():
        _, cycles = model.infer(ids())
        assert ran.take() == [2, 2] and bool((cycles == 2).all())
        _, cycles = model.infer(ids(), max_cycles=4)
        assert ran.take() == [4, 4] and bool((cycles == 4).all())
        _, cycles = model.infer(ids(), max_cycles=torch.tensor([1, 3]))  # per row
        assert ran.take() == [3, 3] and bool((cycles[:, 0] == 1).all()) and bool((cycles[:, 1] == 3).all())
        # per-token halting: tokens stop apart; a block runs until its last token stops
        _, cycles = model.infer(ids(), max_cycles=4, halt_threshold=0.5)
        assert len(cycles.unique()) > 1
        assert ran.take() == cycles.flatten(1).amax(dim=1).tolist()
        model.blocks["0"].halt_head.weight.zero_()
        model.blocks["0"].halt_head.bias.fill_(30.0)  # block 0 halts every token after one update
        model.blocks["1"].halt_head.weight.zero_()
        model.blocks["1"].halt_head.bias.fill_(-30.0)  # block 1 never halts early
        _, cycles = model.infer(ids(), max_cycles=4, halt_threshold=0.5)
        assert ran.take() == [1, 4]
        assert bool((cycles[0] == 1).all()) and bool((cycles[1] == 4).all())


def test_pipeline_stages_run_the_cycles_their_inputs_carry() -> None:
    """The pipeline's stage modules, chained in one process: the micro-batch's cycles decide what every
    block runs, and the result is HRMGemma's forward at that count."""
    config = lm_config()
    model = open_model(config)
    embed = EmbeddingLayer(config, SEED)
    blocks = [CycleBlockLayer(config, g, SEED) for g in range(config.num_groups)]
    layers = [embed, *blocks, TailLayer(config, SEED), FinalNormLayer(config, SEED)]
    stages = torch.nn.ModuleList(layers)
    stages.load_state_dict(
        {f"{i}.{k}": model.state_dict()[k] for i, layer in enumerate(layers) for k in layer.state_dict()}
    )
    ran = HUpdates({str(g): layer.blocks[str(g)] for g, layer in enumerate(blocks)})
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    positions, doc_ids = torch.arange(SEQ).expand(2, SEQ), torch.zeros(2, SEQ, dtype=torch.long)
    with torch.no_grad():
        for cycles in (3, 1, 2):
            x = pipeline_inputs(ids(), positions, doc_ids, mask, cycles)
            for layer in layers:
                x = layer(x)
            logits, sums = tied_head(embed, x)
            # the same packed-row inputs (doc_ids: the same attention path), so the same numbers
            expected, aux = model(ids(), position_ids=positions, doc_ids=doc_ids, cycles=cycles)
            assert ran.take() == [cycles] * config.num_groups
            torch.testing.assert_close(logits, expected)
            terms = lm_loss(expected, ids(), aux, config, normalizers=(1.0, 1.0))
            torch.testing.assert_close(sums[2], terms["expected_cycles"])


def test_puzzle_model_holds_no_cycle_state(tiny_config: PuzzleModelConfig) -> None:
    """RecursiveReasoner passes its config's h_cycles to its CycleBlock on every call."""
    for n in (2, 3):
        model = RecursiveReasoner(dataclasses.replace(tiny_config, h_cycles=n)).init_weights(0)
        ran = HUpdates({"cycle": model.cycle})
        batch = {"inputs": torch.zeros(2, tiny_config.seq_len, dtype=torch.long),
                 "puzzle_identifiers": torch.zeros(2, dtype=torch.long)}  # fmt: skip
        with torch.no_grad():
            model(model.initial_carry(2), batch)
        assert ran.take() == [n]
        assert not any(hasattr(m, "h_cycles") for m in model.modules())
