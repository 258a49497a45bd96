"""HRMGemma against Hugging Face transformers' Gemma3ForCausalLM: import, export, cycles, halting, recipes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM

from hrm_mega.config import ConfigError, LMModelConfig, load_config
from hrm_mega.convert.hf_gemma import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_from,
    key_map,
    to_hf_state_dict,
)
from hrm_mega.models import vocab
from hrm_mega.models.lm import HRMGemma, document_positions, is_hrm_only, lm_loss

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "lm"
SEQ = 12  # longer than the window (4), so local and global layers see different keys


def tiny_config(**overrides) -> LMModelConfig:
    """8 layers in the pattern 3 local : 1 global (10 adds a trailing partial group of 2 local layers)."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=8, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=4, local_per_global=3, rope_scaling=2.0,
        max_position=64,
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def random_hf(config: LMModelConfig, seed: int) -> Gemma3ForCausalLM:
    """A transformers Gemma 3 (eager attention, fp32, eval) with every weight random, norms included."""
    hf_config = hf_config_from(config)
    hf_config._attn_implementation = "eager"
    model = Gemma3ForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied head: the embedding is visited once
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def imported(hf: Gemma3ForCausalLM, config: LMModelConfig) -> HRMGemma:
    model = HRMGemma(config).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config), strict=True)
    return model


def token_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# (a) import, (b) export, (c) idempotent cycles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_layers", "tied"), [(8, True), (10, True), (10, False)])
def test_imported_gemma3_gives_the_same_logits(num_layers: int, tied: bool) -> None:
    config = tiny_config(num_layers=num_layers, tie_embeddings=tied)
    hf = random_hf(config, seed=num_layers)
    model = imported(hf, config)
    assert (model.tail is not None) == (num_layers == 10)
    assert (model.lm_head is None) == tied
    ids = token_ids()
    with torch.no_grad():
        expected = hf(ids).logits
        logits, aux = model(ids)
    assert expected.abs().max() > 1.0  # a non-trivial comparison
    assert (logits - expected).abs().max() < 1e-4
    assert config_from_hf(hf.config) == config


def test_export_loads_into_a_fresh_gemma3_with_the_same_logits() -> None:
    config = tiny_config(num_layers=10, h_cycles=1, l_cycles=1)
    model = HRMGemma(config).init_weights(seed=3).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move the zero-init norms and gates off their defaults too
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    hf_config = hf_config_from(config)
    hf_config._attn_implementation = "eager"
    hf = Gemma3ForCausalLM(hf_config).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids = token_ids()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4
    # and the import of that export is the same Gemma weights
    back = from_hf_state_dict(hf_sd, config)
    for name, tensor in model.state_dict().items():
        if not is_hrm_only(name):
            assert torch.equal(back[name], tensor), name


def test_more_cycles_with_zero_gates_are_still_gemma3_and_a_gate_changes_that() -> None:
    config = tiny_config(num_layers=10, h_cycles=3, l_cycles=3)
    hf = random_hf(config, seed=5)
    model = imported(hf, config)
    ids = token_ids()
    with torch.no_grad():
        expected = hf(ids).logits
        logits, aux = model(ids)
        assert (logits - expected).abs().max() < 1e-4
        assert aux["converged"].shape == (2, 2, 2, SEQ) and bool(aux["converged"].all())
        model.blocks["1"].gate_LH.fill_(0.5)  # let z_H flow back into L: the cycles now differ
        opened, opened_aux = model(ids)
    assert (opened - expected).abs().max() > 1e-2
    assert bool(opened_aux["converged"][0].all())  # block 0 untouched
    assert not bool(opened_aux["converged"][1].all())


# --------------------------------------------------------------------------------------------------
# Inputs: padding, position ids, embeddings
# --------------------------------------------------------------------------------------------------


def test_left_padding_matches_gemma3_and_the_unpadded_sequence() -> None:
    config = tiny_config(num_layers=10)
    hf = random_hf(config, seed=6)
    model = imported(hf, config)
    ids = token_ids()
    pad = 3
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        logits, _ = model(ids, attention_mask=mask, position_ids=positions)
        alone, _ = model(ids[1:, pad:])
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max() < 1e-4
    assert (logits[1, pad:] - alone[0]).abs().max() < 1e-4
    assert torch.isfinite(logits).all()  # padding queries attend to themselves, never to nothing


def test_inputs_embeds_and_explicit_positions_equal_the_defaults() -> None:
    config = tiny_config()
    model = HRMGemma(config).init_weights(seed=7).eval()
    ids = token_ids()
    with torch.no_grad():
        logits, _ = model(ids)
        from_embeds, _ = model(inputs_embeds=model.embed(ids))
        with_positions, _ = model(ids, position_ids=torch.arange(SEQ).expand(2, SEQ))
    assert torch.equal(logits, from_embeds)
    assert (logits - with_positions).abs().max() < 1e-6
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 5))


def test_packed_row_equals_each_document_alone() -> None:
    """doc_ids: each document of a packed row (with padding, documents longer than the window, and
    open gates so the cycles matter) gives the logits it gives alone."""
    config = tiny_config(num_layers=10, h_cycles=2, l_cycles=2)
    model = HRMGemma(config).init_weights(seed=8).eval()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for block in model.blocks.values():
            for name in ("gate_LL", "gate_LH", "gate_HH"):
                getattr(block, name).copy_(torch.randn(config.hidden_size, generator=generator) * 0.5)
    lengths = [[5, 9, 4], [3, 6, 9]]  # row 1 starts with 3 padding tokens
    ids = torch.randint(0, 128, (2, 18), generator=generator)
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(row)) for row in lengths])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = document_positions(doc_ids)
    assert positions[0].tolist() == [*range(5), *range(9), *range(4)]
    with torch.no_grad():
        packed, _ = model(ids, doc_ids=doc_ids, attention_mask=mask)
        explicit, _ = model(ids, doc_ids=doc_ids, attention_mask=mask, position_ids=positions)
        unmasked, _ = model(ids, attention_mask=mask)
        assert torch.equal(packed, explicit)  # positions restart at every document by default
        for row, row_lengths in enumerate(lengths):
            starts = [0, *torch.tensor(row_lengths).cumsum(0).tolist()]
            for doc in range(1 if row == 1 else 0, 3):  # row 1's first "document" is the padding
                a, b = starts[doc], starts[doc + 1]
                alone, _ = model(ids[row : row + 1, a:b])
                assert (packed[row, a:b] - alone[0]).abs().max() < 1e-5, (row, doc)
    assert (packed[0, 5:14] - unmasked[0, 5:14]).abs().max() > 1e-2  # the document mask made them equal
    # a document is a run of equal ids: an id that comes back starts a new document
    assert document_positions(torch.tensor([[7, 7, 3, 3, 3, 7]])).tolist() == [[0, 1, 0, 1, 2, 0]]
    with pytest.raises(ValueError, match=r"doc_ids has shape \(2, 3\); expected \[2, 18\]"):
        model(ids, doc_ids=doc_ids[:, :3])


def test_per_document_attention_equals_the_dense_document_mask() -> None:
    """model.packed_attention=documents (attention run per document, no [s, s] mask) gives the logits,
    halting terms and gradients of the dense mask, with documents shorter and longer than the window."""
    config = tiny_config(num_layers=10, h_cycles=2, l_cycles=2)
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 128, (2, 24), generator=generator)
    doc_ids = torch.tensor([[0] * 3 + [1] * 13 + [2] + [3] * 7, [4] * 24])
    results = []
    for packed_attention in ("documents", "mask"):
        model = HRMGemma(dataclasses.replace(config, packed_attention=packed_attention)).init_weights(seed=9)
        with torch.no_grad():
            for block in model.blocks.values():  # open gates, so the cycles matter
                for name in ("gate_LL", "gate_LH", "gate_HH"):
                    getattr(block, name).copy_(torch.linspace(-0.5, 0.5, config.hidden_size))
        logits, aux = model(ids, doc_ids=doc_ids)
        loss = lm_loss(logits, ids, aux, model.config)["loss"]
        loss.backward()
        results.append((logits, aux["halt_logits"], {n: p.grad for n, p in model.named_parameters()}))
    (logits, halt, grads), (ref_logits, ref_halt, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(halt, ref_halt, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():  # two kernels (per-document SDPA, explicit with the mask): 2e-6 apart
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_embedding_scale_is_rounded_to_the_weight_dtype() -> None:
    model = HRMGemma(tiny_config(hidden_size=72)).init_weights(seed=0).to(torch.bfloat16)
    ids = token_ids(batch=1)
    # sqrt(72) = 8.485... is 8.5 in bf16; Gemma multiplies by the rounded scale
    assert torch.equal(model.embed(ids), model.embed_tokens(ids) * torch.tensor(8.5, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# (d) parameter counts of the recipes against transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1b", "4b", "12b", "27b"])
def test_recipe_parameter_counts_equal_gemma3(size: str) -> None:
    config = load_config(RECIPES / f"hrmgemma_{size}.yaml").model
    single = dataclasses.replace(config, h_cycles=1, l_cycles=1)
    with torch.device("meta"):
        counts = HRMGemma(single).parameter_counts()
        recipe_counts = HRMGemma(config).parameter_counts()
        hf = Gemma3ForCausalLM(hf_config_from(single))
    assert counts["gemma"] == sum(p.numel() for p in hf.parameters())
    # gates (3 x hidden) and a halting head (hidden + 1) per group; cycles add no parameters
    assert counts["hrm_only"] == config.num_groups * (4 * config.hidden_size + 1)
    assert recipe_counts == counts
    assert len(key_map(single)) == len(hf.state_dict()) - 1  # everything but the tied lm_head


def test_tiny_recipe_builds_runs_and_trains() -> None:
    config = load_config(RECIPES / "hrmgemma_tiny.yaml").model
    model = HRMGemma(config).init_weights(seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, aux = model(ids)
    assert logits.shape == (2, 24, config.vocab_size)
    losses = lm_loss(logits, ids, aux, config)
    losses["loss"].backward()
    assert math.isfinite(losses["loss"].item())
    assert model.blocks["0"].halt_head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# (e) halting head, aux outputs and the loss
# --------------------------------------------------------------------------------------------------


def test_aux_shapes_and_value_head() -> None:
    config = tiny_config(num_layers=10, h_cycles=3, l_cycles=2, value_head=True)
    model = HRMGemma(config).init_weights(seed=1)
    logits, aux = model(token_ids())
    assert logits.shape == (2, SEQ, 128)
    assert aux["halt_logits"].shape == (2, 3, 2, SEQ) and aux["halt_logits"].dtype == torch.float32
    assert aux["converged"].shape == (2, 2, 2, SEQ) and aux["converged"].dtype == torch.bool
    assert aux["cycles_used"].tolist() == [3, 3]
    assert aux["values"].shape == (2, SEQ)
    # halting heads start undecided, the value head at zero
    assert torch.all(aux["halt_logits"] == 0) and torch.all(aux["values"] == 0)


def test_converged_target_is_the_relative_change_of_the_next_update() -> None:
    config = tiny_config(h_cycles=2, l_cycles=1, halt_tolerance=0.05)
    model = HRMGemma(config).init_weights(seed=2)
    block = model.blocks["0"]
    old = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # norms 5 and 1
    new = old + torch.tensor([[[0.2, 0.0], [0.2, 0.0]]])  # change 0.2: relative 0.04 and 0.2
    assert block._converged(old, new).tolist() == [[True, False]]


def test_halting_loss_on_a_hand_example() -> None:
    config = tiny_config(halt_loss_weight=0.5, compute_cost_weight=0.25)
    vocab = 4
    logits = torch.zeros(1, 2, vocab)  # uniform: CE = ln 4
    labels = torch.tensor([[-100, 2]])
    ln3 = math.log(3)
    halt_logits = torch.tensor([[[[0.0, 0.0]], [[ln3, 0.0]], [[100.0, -100.0]]]])  # [G=1, N=3, b=1, s=2]
    converged = torch.tensor([[[[True, False]], [[True, True]]]])  # [1, 2, 1, 2]
    aux = {"halt_logits": halt_logits, "converged": converged}
    out = lm_loss(logits, labels, aux, config)
    ln2 = math.log(2)
    bce = (3 * ln2 + math.log(4 / 3)) / 4  # the last reading has no target and is ignored
    # p = (0.5, 0.75) and (0.5, 0.5): E[cycles] = 1 + 0.5 + 0.125 = 1.625 and 1 + 0.5 + 0.25 = 1.75
    cost = (0.625 / 2 + 0.75 / 2) / 2
    assert out["ce"].item() == pytest.approx(math.log(4))
    assert out["halt_bce"].item() == pytest.approx(bce)
    assert out["compute_cost"].item() == pytest.approx(cost)
    assert out["expected_cycles"].item() == pytest.approx((1.625 + 1.75) / 2)
    assert out["loss"].item() == pytest.approx(math.log(4) + 0.5 * bce + 0.25 * cost)
    masked = lm_loss(logits, labels, aux, config, token_mask=torch.tensor([[True, False]]))
    assert masked["halt_bce"].item() == pytest.approx((ln2 + math.log(4 / 3)) / 2)
    assert masked["compute_cost"].item() == pytest.approx(0.625 / 2)


def test_single_cycle_has_no_halting_terms() -> None:
    config = tiny_config()
    model = HRMGemma(config).init_weights(seed=3)
    ids = token_ids()
    logits, aux = model(ids)
    out = lm_loss(logits, ids, aux, config)
    assert aux["converged"].shape == (2, 0, 2, SEQ)
    assert out["halt_bce"].item() == 0 and out["compute_cost"].item() == 0
    assert out["loss"].item() == pytest.approx(out["ce"].item())


@pytest.mark.parametrize("grad_mode", ["one_step", "last_cycle", "full"])
def test_gradients_reach_gates_and_halting_heads(grad_mode: str) -> None:
    config = tiny_config(h_cycles=2, l_cycles=2, grad_mode=grad_mode)
    model = HRMGemma(config).init_weights(seed=4)
    with torch.no_grad():
        model.blocks["0"].halt_head.weight.fill_(0.01)  # so the halting loss also reaches the trunk
    ids = token_ids()
    logits, aux = model(ids)
    lm_loss(logits, ids, aux, config)["loss"].backward()
    block = model.blocks["0"]
    for name in ("gate_LL", "gate_LH", "gate_HH"):
        assert getattr(block, name).grad.abs().sum() > 0, name
    assert block.halt_head.bias.grad.abs() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0


def test_linear_cross_entropy_equals_torch_cross_entropy_on_the_logits(monkeypatch) -> None:
    """The chunked CE through the head against torch's cross_entropy on the full logits: the sum over
    labelled rows and both gradients, in one chunk and in chunks of 3 rows (the last one short)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 7, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) * 0.5
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, 2] = labels[1, 6] = -100
    upstream = 0.7  # the loss is scaled afterwards, as lm_loss divides by the token count
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy((h0 @ w0.T).flatten(0, 1), labels.flatten(), reduction="sum")
    (want * upstream).backward()
    for chunk_logits in (vocab.CE_CHUNK_LOGITS, 3 * 50):
        monkeypatch.setattr(vocab, "CE_CHUNK_LOGITS", chunk_logits)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = vocab.linear_cross_entropy(h, w, labels)
        (got * upstream).backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h0.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, w0.grad, rtol=1e-5, atol=1e-6)
        assert h.grad[0, 2].abs().sum() == 0  # an ignored row has no gradient
    with torch.no_grad():  # evaluation: no gradient buffers, the same value
        torch.testing.assert_close(vocab.linear_cross_entropy(hidden, weight, labels), want.detach())


@pytest.mark.parametrize("tied", [True, False])
def test_forward_with_labels_gives_the_loss_and_gradients_of_the_logits_path(tied: bool) -> None:
    """With labels the forward computes the CE through the head without logits (as the trainer calls
    it): lm_loss and every parameter's gradient equal the path through the full logits, with deep
    supervision's per-cycle readouts and the halting terms included."""
    config = tiny_config(h_cycles=2, l_cycles=1, deep_supervision=True, tie_embeddings=tied)
    ids = token_ids()
    ids[0, 3] = -100  # an unlabelled target (the input id itself must stay valid: only labels get it)
    inputs = ids.clamp(min=0)
    results = []
    for labels in (None, ids):
        model = HRMGemma(config).init_weights(seed=6)
        with torch.no_grad():
            model.blocks["0"].halt_head.weight.fill_(0.01)
        logits, aux = model(inputs, labels=labels)
        assert (logits is None) == (labels is not None)
        out = lm_loss(logits, ids, aux, config)
        out["loss"].backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    for key in ("loss", "ce", "halt_bce"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="halt_target=correct needs the logits"):
        model = HRMGemma(config).init_weights(seed=6)
        correct = dataclasses.replace(config, halt_target="correct")
        logits, aux = model(inputs, labels=ids)
        lm_loss(logits, ids, aux, correct)


# --------------------------------------------------------------------------------------------------
# Init, (f) validation, converter errors
# --------------------------------------------------------------------------------------------------


def test_init_is_deterministic_and_works_from_the_meta_device() -> None:
    config = tiny_config(num_layers=10)
    a = HRMGemma(config).init_weights(seed=9)
    with torch.device("meta"):
        b = HRMGemma(config)
    b = b.materialize("cpu").init_weights(seed=9)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    ids = token_ids()
    assert torch.equal(a(ids)[0], b(ids)[0])  # RoPE tables were rebuilt, not left uninitialised
    assert all(torch.all(p == 0) for n, p in a.named_parameters() if is_hrm_only(n))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_kv_heads=3", "model.num_kv_heads=3 does not divide model.num_heads=4"),
        ("model.num_layers=5", "model.num_layers=5 is fewer than one local-global group"),
        ("model.head_dim=255", "model.head_dim=255 must be even"),
        ("model.h_cycles=0", "model.h_cycles=0 must be >= 1"),
        ("model.halt_tolerance=0", "model.halt_tolerance=0.0 must be > 0"),
        ("model.compute_cost_weight=-1", "model.compute_cost_weight=-1.0 must be >= 0"),
        ("model.grad_mode=bogus", "model.grad_mode='bogus' must be one of"),
        ("model.h_cycle=2", "did you mean model.h_cycles"),
    ],
)
def test_config_validation_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["model.family=hrm_gemma", override])
    assert "\n" not in str(err.value)


def test_converter_errors_name_the_key() -> None:
    config = tiny_config()
    hf_sd = dict(random_hf(config, seed=0).state_dict())
    bad = dict(hf_sd)
    bad["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.q_proj.weight has shape \(3, 3\) but "
                       r"blocks.0.H.layers.0.mixer.q_proj.weight needs \(64, 64\)"):  # fmt: skip
        from_hf_state_dict(bad, config)
    with pytest.raises(ValueError, match="unexpected key model.layers.8.mlp.up_proj.weight"):
        from_hf_state_dict({**hf_sd, "model.layers.8.mlp.up_proj.weight": torch.zeros(1)}, config)
    del hf_sd["model.norm.weight"]
    with pytest.raises(ValueError, match="missing key model.norm.weight"):
        from_hf_state_dict(hf_sd, config)
    cycled = tiny_config(h_cycles=2)
    with pytest.raises(ValueError, match="model.h_cycles=2, model.l_cycles=1"):
        to_hf_state_dict(HRMGemma(cycled).state_dict(), cycled)
    softcapped = hf_config_from(config)
    softcapped.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 is not supported"):
        config_from_hf(softcapped)
    irregular = hf_config_from(config)
    irregular.layer_types = ["sliding_attention", "full_attention"] * 4
    irregular.layer_types[-2] = "full_attention"
    with pytest.raises(ValueError, match="layer_types is not a repeated pattern"):
        config_from_hf(irregular)
