"""HRMGemma inference: per-token halting, KV caches per (layer, cycle step), generation, CLI.

Every model is tiny, fp32, randomly initialised with open gates (so each cycle changes the result) and
a random halting head (so tokens halt at different cycles when a threshold is set).
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.checkpoint.model_dir import save_model_dir
from hrm_mega.config import Config, DataConfig, LMModelConfig, PuzzleModelConfig
from hrm_mega.inference.generate import generate, left_pad, sample_token, stream_generate
from hrm_mega.models.fast_layers import fast_layers
from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.lm import HRMGemma
from hrm_mega.models.puzzle import RecursiveReasoner

WINDOW = 4
VOCAB = 128


def tiny_config(**overrides) -> LMModelConfig:
    """10 layers: 2 groups of 3 local + 1 global, then 2 trailing local layers; window 4."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=10, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, local_per_global=3, rope_scaling=2.0,
        max_position=64, h_cycles=2, l_cycles=2,
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def recurrent_model(seed: int = 0, **overrides) -> HRMGemma:
    model = HRMGemma(tiny_config(**overrides)).init_weights(seed).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks.values():
            for name in ("gate_LL", "gate_LH", "gate_HH") if block.injection == "gated" else ():
                getattr(block, name).copy_(torch.randn(64, generator=generator) * 0.5)
            block.halt_head.weight.copy_(torch.randn(1, 64, generator=generator) * 2.0)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Per-token halting, full-sequence reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("injection", ["gated", "add"])
def test_infer_without_halting_is_the_training_forward(injection: str) -> None:
    model = recurrent_model(seed=2, injection=injection)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected, _ = model(ids, attention_mask=mask, position_ids=positions)
        logits, cycles = model.infer(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()  # padding logits differ: padding stops after one cycle (nothing attends to it)
    assert max_diff(logits[real], expected[real]) < 1e-6
    assert bool((cycles[:, real] == 2).all()) and bool((cycles[:, ~real] == 1).all())  # padding stops early


def test_uniform_halting_equals_fewer_trained_cycles() -> None:
    """A threshold every token reaches stops all tokens after the first cycle: that is the model with
    h_cycles=1, however high max_cycles is; no halting at max_cycles=4 is the model with h_cycles=4."""
    model = recurrent_model(seed=3)
    ids = random_ids(1, 10)
    with torch.no_grad():
        for block in model.blocks.values():
            block.halt_head.weight.zero_()
            block.halt_head.bias.fill_(30.0)  # P(halt) = 1 - 1e-13 for every token
        one_cycle, cycles = model.infer(ids, max_cycles=4, halt_threshold=0.99)
        four_cycles, _ = model.infer(ids, max_cycles=4)
        assert max_diff(one_cycle, model(ids, cycles=1)[0]) < 1e-6
        assert max_diff(four_cycles, model(ids, cycles=4)[0]) < 1e-6
    assert bool((cycles == 1).all())


def test_halting_varies_per_token_and_is_causal() -> None:
    model = recurrent_model(seed=4)
    ids = random_ids(2, 14)
    with torch.no_grad():
        logits, cycles = model.infer(ids, max_cycles=4, halt_threshold=0.5)
        full, _ = model.infer(ids, max_cycles=4)
        prefix, prefix_cycles = model.infer(ids[:, :9], max_cycles=4, halt_threshold=0.5)
    assert len(cycles.unique()) >= 3  # tokens stopped at different cycles
    assert max_diff(logits, full) > 1e-2  # and that changed the result
    assert max_diff(logits[:, :9], prefix) < 1e-5  # later tokens change nothing earlier
    assert torch.equal(cycles[:, :, :9], prefix_cycles)


def test_halting_arguments_are_checked() -> None:
    model = recurrent_model()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"max_cycles=\[0, 0\] must be >= 1"):
        model.infer(ids, max_cycles=0)
    with pytest.raises(
        ValueError, match=r"max_cycles has shape \(3,\); expected a number or one per row \[2\]"
    ):
        model.infer(ids, max_cycles=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"halt_threshold=\[1.5, 1.5\] must be in \(0, 1\]"):
        model.infer(ids, halt_threshold=1.5)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


def test_prefill_logits_equal_the_uncached_forward() -> None:
    model = recurrent_model(seed=5)
    ids = random_ids(2, 11)
    with torch.no_grad():
        cached, _ = model.infer(ids, cache=KVCache())
        assert max_diff(cached, model(ids)[0]) < 1e-5
        halting, halting_cycles = model.infer(ids, max_cycles=5, halt_threshold=0.5, cache=KVCache())
        reference, reference_cycles = model.infer(ids, max_cycles=5, halt_threshold=0.5)
    assert max_diff(halting, reference) < 1e-5
    assert torch.equal(halting_cycles, reference_cycles)


def test_chunked_prefill_equals_one_call_and_local_slots_keep_the_window() -> None:
    model = recurrent_model(seed=6)
    ids = random_ids(2, 18)
    cache = KVCache()
    with torch.no_grad():
        reference, reference_cycles = model.infer(ids, max_cycles=5, halt_threshold=0.5)
        chunks = [model.infer(ids[:, a:b], max_cycles=5, halt_threshold=0.5, cache=cache)
                  for a, b in [(0, 5), (5, 6), (6, 13), (13, 16), (16, 17), (17, 18)]]  # fmt: skip
    logits = torch.cat([c[0] for c in chunks], dim=1)
    cycles = torch.cat([c[1] for c in chunks], dim=2)
    assert len(reference_cycles.unique()) >= 3
    assert torch.equal(cycles, reference_cycles)
    assert max_diff(logits, reference) < 1e-4
    # one slot per (layer, step): 5 cycles x 2 L steps for local layers, 5 for the global one
    assert (
        cache.steps("blocks.0.L.2") == 10 and cache.steps("blocks.1.H.0") == 5 and cache.steps("tail.1") == 1
    )
    for layer, slots in cache.slots.items():
        expected = 18 if ".H." in layer else WINDOW - 1
        assert all(s.length == expected for s in slots), layer
    assert cache.length == 18 and cache.nbytes() > 0


def test_a_later_token_may_run_more_steps_than_the_cache_has() -> None:
    """The prompt runs one cycle per block, the continuation four: the cache creates the new steps from
    the prompt's last keys/values, which is what the full-sequence reference does with tokens that halt
    after their first cycle."""
    model = recurrent_model(seed=7)
    ids = random_ids(1, 9)
    cache = KVCache()
    with torch.no_grad():
        first, first_cycles = model.infer(ids[:, :6], max_cycles=1, cache=cache)
        second, second_cycles = model.infer(ids[:, 6:], max_cycles=4, cache=cache)
        reference = _reference_with_early_stops(model, ids, stop=torch.arange(9) < 6, max_cycles=4)
        uniform, _ = model.infer(ids, max_cycles=4)
    assert bool((first_cycles == 1).all()) and bool((second_cycles == 4).all())
    assert cache.steps("blocks.0.H.0") == 4 and cache.steps("blocks.0.L.0") == 8
    assert max_diff(torch.cat((first, second), dim=1), reference) < 1e-4
    assert max_diff(second, uniform[:, 6:]) > 1e-2  # the prompt's early stops mattered


def _reference_with_early_stops(model: HRMGemma, ids: torch.Tensor, stop: torch.Tensor, max_cycles: int):
    """The full-sequence reference (no cache) where the tokens flagged in `stop` [s] halt after their
    first cycle: HaltingCycleBlock.infer stops `padding` tokens so, while the masks keep them visible."""
    x = model.embed(ids)
    ctx = model.seq_context(x, None, None)
    for g, block in model.blocks.items():
        x, _ = block.infer(x, ctx, max_cycles=torch.full((1,), max_cycles), halt_threshold=None,
                           padding=stop[None], cache=None, name=f"blocks.{g}")  # fmt: skip
    for layer in model.tail.layers:
        x = layer(x, ctx)
    return model.head(model.norm(x))


def test_select_keeps_a_slots_room_and_the_chosen_rows() -> None:
    """KVCache.select takes the kept rows (a row may be taken twice) of a slot's own buffers with their
    room: the next write appends in place, without copying the earlier keys again."""
    cache = KVCache()
    cache.start(torch.ones(3, 2, dtype=torch.bool))
    slot = cache.slot("layer", 0, None)
    k, v = torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4)
    slot.update(k, v)
    rows = torch.tensor([2, 0, 2])
    cache.select(rows)
    storage = slot.k.untyped_storage().data_ptr()
    assert torch.equal(cache.valid, torch.ones(3, 2, dtype=torch.bool))
    cache.start(torch.ones(3, 1, dtype=torch.bool))
    k_new, v_new = torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4)
    keys, values = slot.update(k_new, v_new)
    assert keys.untyped_storage().data_ptr() == storage  # written into the kept buffer
    assert torch.equal(keys, torch.cat((k[[2, 0, 2]], k_new), dim=2))
    assert torch.equal(values, torch.cat((v[[2, 0, 2]], v_new), dim=2))


# --------------------------------------------------------------------------------------------------
# Generation: cached equals uncached
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_cycles", "halt_threshold"),
    [(None, None), (4, 0.5), (5, None)],
    ids=["window-shorter-than-sequence", "early-halting", "cycles-raised-above-training"],
)
def test_cached_generation_equals_uncached_decoding(max_cycles, halt_threshold) -> None:
    model = recurrent_model(seed=8)
    prompt = random_ids(1, 5, seed=9)
    kwargs = dict(max_new_tokens=10, max_cycles=max_cycles, halt_threshold=halt_threshold, greedy=True)
    cached = list(stream_generate(model, prompt, **kwargs))
    uncached = list(stream_generate(model, prompt, use_cache=False, **kwargs))
    assert len(cached) == len(uncached) == 10  # 15 positions > the window of 4
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.cycles, b.cycles)
        assert max_diff(a.logits, b.logits) < 1e-4
    cycles = torch.stack([s.cycles for s in cached])  # [steps, b, G]
    if halt_threshold is None:
        assert bool((cycles == (max_cycles or 2)).all())
    else:
        assert len(cycles.unique()) >= 3  # tokens halted at different cycles


@pytest.mark.parametrize(
    ("num_kv_heads", "max_cycles", "halt_threshold"),
    [(1, None, None), (2, 4, 0.5)],
    ids=["gqa", "mha-halting"],
)
def test_flat_layers_give_the_module_path_logits_bit_for_bit(
    num_kv_heads, max_cycles, halt_threshold
) -> None:
    """Cached no-grad forwards run each attention block as a LayerPlan (models/fast_layers.py): a
    left-padded batch prefilled, then decoded past the window, gives the module path's logits and cycles
    exactly, with grouped-query or plain attention and with per-token halting."""
    model = recurrent_model(seed=13, num_kv_heads=num_kv_heads)
    plans = fast_layers(model)
    assert len(plans.plans) == 10  # every layer
    ids, mask = left_pad([random_ids(1, n, seed=n)[0].tolist() for n in (3, 6)])
    halting = dict(max_cycles=max_cycles, halt_threshold=halt_threshold)
    outputs = {}
    for flat in (False, True):
        cache, steps = KVCache(), []
        with torch.no_grad(), plans.active() if flat else nullcontext():
            steps.append(model.infer(ids, attention_mask=mask, cache=cache, **halting))
            for t in range(6):  # 12 positions > the window of 4
                steps.append(model.infer(random_ids(2, 1, seed=20 + t), cache=cache, **halting))
        outputs[flat] = steps
    for (a, cycles_a), (b, cycles_b) in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(a, b) and torch.equal(cycles_a, cycles_b)
    assert all(block.decode_plan is None for block in plans.plans)  # only inside active()


def test_batch_with_left_padding_and_per_row_cycles() -> None:
    model = recurrent_model(seed=10)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5)]
    ids, mask = left_pad(prompts)
    max_cycles = torch.tensor([1, 3, 5])
    threshold = torch.tensor([0.5, 0.6, 0.4])
    kwargs = dict(max_new_tokens=8, max_cycles=max_cycles, halt_threshold=threshold, greedy=True)
    batch = generate(model, ids, attention_mask=mask, **kwargs)
    uncached = generate(model, ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(batch.tokens, uncached.tokens) and torch.equal(batch.cycles, uncached.cycles)
    assert batch.tokens.shape == (3, 8) and batch.cycles.shape == (3, 8, 2)
    assert bool((batch.cycles[0] == 1).all())
    assert int(batch.cycles[1].max()) <= 3 and int(batch.cycles[2].max()) <= 5
    assert len(batch.cycles[2].unique()) >= 2
    for row, prompt in enumerate(prompts):  # each row computes what it would alone
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=8, max_cycles=int(max_cycles[row]),
                         halt_threshold=float(threshold[row]), greedy=True)  # fmt: skip
        assert torch.equal(alone.tokens[0], batch.tokens[row]), row
        assert torch.equal(alone.cycles[0], batch.cycles[row]), row


def test_eos_finishes_a_row_and_the_others_continue() -> None:
    model = recurrent_model(seed=11)
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    free = generate(model, ids, attention_mask=mask, max_new_tokens=6, greedy=True)
    eos = int(free.tokens[0, 2])
    stopped = generate(model, ids, attention_mask=mask, max_new_tokens=6, greedy=True, eos_id=eos, pad_id=0)
    first_eos = [int((row == eos).nonzero()[0]) if bool((row == eos).any()) else 6 for row in free.tokens]
    for row in range(2):
        n = min(first_eos[row] + 1, 6)
        assert int(stopped.lengths[row]) == n
        assert torch.equal(stopped.tokens[row, :n], free.tokens[row, :n])
        assert bool((stopped.tokens[row, n:] == 0).all()) and bool((stopped.cycles[row, n:] == 0).all())
    assert stopped.mean_cycles() == pytest.approx(2.0)


def record_rows(model) -> list[int]:
    """Wraps model.infer to record the rows of every forward it runs; returns the (live) list."""
    rows: list[int] = []
    infer = model.infer

    def recording(x, **kwargs):
        rows.append(x.shape[0])
        return infer(x, **kwargs)

    model.infer = recording
    return rows


def test_finished_rows_leave_the_batch_and_the_others_decode_unchanged() -> None:
    """Row compaction: once a row emits eos, later decoding steps run only the other rows (the cache
    drops it), and every row gets the tokens, cycles and logits of the uncached reference, also when
    sampling (the draws stay per row) and with per-row halting."""
    model = recurrent_model(seed=12)
    ids, mask = left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    halting = dict(max_cycles=torch.tensor([2, 3, 2, 4]), halt_threshold=torch.tensor([0.5, 0.6, 0.4, 0.5]))
    free = generate(model, ids, attention_mask=mask, max_new_tokens=8, greedy=True, **halting)
    eos = int(free.tokens[1, 1])  # row 1 stops early; the others stop where they emit it, if ever
    rows_seen = record_rows(model)
    for sampling in (dict(greedy=True), dict(temperature=1.5, top_k=20, seed=3)):
        rows_seen.clear()
        kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_id=eos, pad_id=0, **halting, **sampling)
        cached = list(stream_generate(model, ids, **kwargs))
        compacted = list(rows_seen)
        reference = list(stream_generate(model, ids, use_cache=False, **kwargs))
        assert len(cached) == len(reference)
        for a, b in zip(cached, reference, strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cycles, b.cycles)
            assert torch.equal(a.active, b.active) and torch.equal(a.finished, b.finished)
            assert max_diff(a.logits[a.active], b.logits[b.active]) < 1e-4
        running = [int((~s.finished).sum()) for s in cached[:-1]]
        assert compacted[1:] == running  # each step after the prompt feeds only the unfinished rows
        if "greedy" in sampling:
            assert min(compacted[1:]) < 4  # row 1 did finish early


def test_rows_with_the_same_prompt_share_one_prefill() -> None:
    """Rows that repeat a prompt with the same halting limits (an RL group's samples) run the prompt's
    forward once and then decode apart: the prefill sees each distinct (prompt, limits) once, and every
    row gets the tokens and cycles of the uncached reference. What leaves the generator are ordinary
    tensors (the cached forwards run in inference mode)."""
    model = recurrent_model(seed=14)
    a, b = random_ids(1, 5, seed=30)[0].tolist(), random_ids(1, 4, seed=31)[0].tolist()
    ids, mask = left_pad([a, b, a, a, b, a])
    halting = dict(max_cycles=torch.tensor([3, 3, 3, 2, 3, 3]), halt_threshold=0.5)
    rows_seen = record_rows(model)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, temperature=1.3, seed=5, **halting)
    shared = list(stream_generate(model, ids, **kwargs))
    assert rows_seen == [3] + [6] * 5  # a at 3 cycles, b, a at 2 cycles; then every row
    reference = list(stream_generate(model, ids, use_cache=False, **kwargs))
    for a_step, b_step in zip(shared, reference, strict=True):
        assert torch.equal(a_step.tokens, b_step.tokens) and torch.equal(a_step.cycles, b_step.cycles)
        assert max_diff(a_step.logits, b_step.logits) < 1e-4
        fields = (a_step.tokens, a_step.cycles, a_step.logits, a_step.active, a_step.finished)
        assert not any(t.is_inference() for t in fields)
    assert not torch.equal(shared[-1].tokens[0], shared[-1].tokens[2])  # the group's samples differ


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    model = recurrent_model(seed=12)
    prompt = random_ids(2, 4, seed=13)
    hot = dict(max_new_tokens=10, temperature=3.0, max_cycles=3, halt_threshold=0.5)
    a = generate(model, prompt, seed=1, **hot)
    b = generate(model, prompt, seed=1, **hot)
    c = generate(model, prompt, seed=2, **hot)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cycles, b.cycles)
    assert not torch.equal(a.tokens, c.tokens)
    greedy = generate(model, prompt, max_new_tokens=10, greedy=True)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, top_k=1, seed=3).tokens, greedy.tokens)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, top_p=1e-6, seed=4).tokens, greedy.tokens)
    limited = generate(model, prompt, max_new_tokens=10, vocab_limit=10, temperature=3.0, seed=5)
    assert int(limited.tokens.max()) < 10 and int(greedy.tokens.max()) >= 10


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4)
    generator = torch.Generator().manual_seed(0)

    def drawn(**kw) -> set[int]:
        return set(sample_token(logits, greedy=False, generator=generator, **kw).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.45) == {0}  # token 0 alone holds 0.5
    assert drawn(top_p=0.7) == {0, 1}
    assert drawn(top_p=0.81) == {0, 1, 2}
    assert sample_token(logits[:1], greedy=True).tolist() == [0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, r"temperature=0.0 must be > 0"),
        ({"greedy": True, "top_k": 5}, "greedy decoding takes no temperature, top_k or top_p"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 must be >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1 must be >= 0"),
        ({"vocab_limit": 0}, r"vocab_limit=0 must be in \[1, model.vocab_size=128\]"),
        ({"max_cycles": torch.tensor([2, 0])}, r"max_cycles=\[2, 0\] must be >= 1"),
        ({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, "attention_mask must be left padding"),
        (
            {"input_ids": torch.tensor([[1, 2, VOCAB], [1, 2, 3]])},
            r"outside the model's vocabulary \[0, 128\)",
        ),
    ],
)
def test_generation_errors_are_one_line(kwargs, message) -> None:
    model = recurrent_model()
    args = {"input_ids": random_ids(2, 3), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        stream_generate(model, **args)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 50, (2, 300), generator=generator)
    return [f"{x} plus {y} is {x + y}." for x, y in zip(a.tolist(), b.tolist(), strict=True)]


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory) -> Path:
    """A model directory whose config's data.path holds a real SentencePiece tokenizer."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("generate")
    data = root / "data"
    data.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(data / "tokenizer"), vocab_size=60,
        model_type="unigram", bos_id=1, eos_id=2, pad_id=0, unk_id=3, num_threads=1,
    )  # fmt: skip
    model = recurrent_model(seed=14)
    config = Config(model=model.config, data=DataConfig(path=str(data)))
    return save_model_dir(model.state_dict(), config, root / "model")


def test_cli_streams_the_greedy_continuation_and_stats(lm_checkpoint: Path, capsys) -> None:
    import sentencepiece as spm

    from hrm_mega.entry.generate import main

    argv = [str(lm_checkpoint), "--prompt", "12 plus 7 is", "--prompt", "3 plus", "--max-new-tokens", "6",
            "--max-cycles", "3", "--halt-threshold", "0.5", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    stats = json.loads(lines[-1])
    sp = spm.SentencePieceProcessor(model_file=str(lm_checkpoint.parent / "data" / "tokenizer.model"))
    prompts = [[sp.bos_id(), *sp.encode(text)] for text in ("12 plus 7 is", "3 plus")]
    ids, mask = left_pad(prompts)
    model, _ = load_model(lm_checkpoint)
    expected = generate(model.eval(), ids, attention_mask=mask, max_new_tokens=6, max_cycles=3,
                        halt_threshold=0.5, greedy=True, eos_id=sp.eos_id(),
                        vocab_limit=sp.get_piece_size())  # fmt: skip
    texts = [
        sp.decode(p + expected.tokens[r, : int(expected.lengths[r])].tolist()) for r, p in enumerate(prompts)
    ]
    assert lines[:-1] == texts
    assert lines[0].startswith("12 plus 7 is")
    assert stats["tokens"] == int(expected.lengths.sum())
    assert stats["mean_cycles"] == pytest.approx(expected.mean_cycles(), abs=1e-4)
    assert stats["tokens_per_s"] > 0 and stats["max_cycles"] == 3


def test_generate_cli_takes_an_int8_kv_cache(lm_checkpoint, capsys) -> None:
    import sentencepiece as spm

    from hrm_mega.entry.generate import main
    from hrm_mega.models.paged_kv_cache import pool_for

    argv = [str(lm_checkpoint), "--prompt", "12 plus 7 is", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*argv, "--kv-dtype", "int8"]) == 0
    text, stats = capsys.readouterr().out.splitlines()
    sp = spm.SentencePieceProcessor(model_file=str(lm_checkpoint.parent / "data" / "tokenizer.model"))
    prompt = [sp.bos_id(), *sp.encode("12 plus 7 is")]
    model = load_model(lm_checkpoint)[0].eval()
    expected = generate(model, torch.tensor([prompt]), max_new_tokens=6, greedy=True, eos_id=sp.eos_id(),
                        vocab_limit=sp.get_piece_size(), kv_pool=pool_for(model, kv_dtype="int8"))  # fmt: skip
    assert text == sp.decode(prompt + expected.tokens[0, : int(expected.lengths[0])].tolist())
    assert json.loads(stats)["tokens"] == int(expected.lengths[0])


def test_cli_samples_reproducibly(lm_checkpoint: Path, capsys) -> None:
    from hrm_mega.entry.generate import main

    argv = [str(lm_checkpoint), "--prompt", "4 plus", "--temperature", "2", "--top-k", "20", "--seed", "5"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out.splitlines()[:-1])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--tokenizer", "/nonexistent/tokenizer.model"],
            "--tokenizer /nonexistent/tokenizer.model: no such file",
        ),
        (["--greedy", "--top-p", "0.9"], "--greedy takes no --temperature, --top-k or --top-p"),
        (["--top-p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
        (["--max-cycles", "0"], r"max_cycles=\[1?0\] must be >= 1"),
        (["--device", "banana"], r"--device banana: not a device name \(cpu, cuda, cuda:N\)"),
        (["--device", "cuda:7"], r"--device cuda:7: (no CUDA device is visible|this machine shows \d)"),
    ],
)
def test_cli_errors_are_one_line(lm_checkpoint: Path, capsys, extra, message) -> None:
    from hrm_mega.entry.generate import main

    assert main([str(lm_checkpoint), "--prompt", "1 plus", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hrm-mega generate: error: ")
    assert re.search(message, err), err


def test_cli_needs_a_tokenizer_and_a_language_model(tmp_path: Path, capsys) -> None:
    from hrm_mega.entry.generate import main

    model = recurrent_model()
    no_data = save_model_dir(model.state_dict(), Config(model=model.config), tmp_path / "no_data")
    missing = save_model_dir(
        model.state_dict(),
        Config(model=model.config, data=DataConfig(path=str(tmp_path / "gone"))),
        tmp_path / "m",
    )
    puzzle_config = PuzzleModelConfig(
        vocab_size=11, seq_len=8, hidden_size=32, num_heads=2, h_layers=1, l_layers=1
    )
    puzzle = RecursiveReasoner(puzzle_config).init_weights(0)
    cases = [
        (no_data, "the checkpoint's config has no data.path; pass --tokenizer PATH/tokenizer.model"),
        (missing, f"{tmp_path / 'gone' / 'tokenizer.model'} does not exist"),
        (tmp_path / "nowhere", "expected a training checkpoint"),
        (save_model_dir(puzzle.state_dict(), Config(model=puzzle_config), tmp_path / "p"),
         "a model.family=puzzle model; generation needs hrm_gemma"),
    ]  # fmt: skip
    for path, message in cases:
        assert main([str(path), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
