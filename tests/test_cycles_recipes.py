"""The recipe options that make HRMGemma's cycles matter (issue #20): gate initialisation, truncated
backprop depth, learning-rate multipliers for gates and halting heads, and the bench recipe itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hrm_mega.config import ConfigError, LMModelConfig, load_config
from hrm_mega.models.lm import HRMGemma, lm_loss
from hrm_mega.optim import AdamATan2
from hrm_mega.training.trainer import Trainer, parameter_groups

RECIPE = Path(__file__).resolve().parent.parent / "configs/lm/hrmgemma_reason_tiny.yaml"


def small(**overrides) -> LMModelConfig:
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=2, num_kv_heads=1,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, local_per_global=1, max_position=64,
        h_cycles=3, l_cycles=2, grad_mode="full",
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def gradients(config: LMModelConfig, cycles: int = 3) -> dict[str, torch.Tensor]:
    model = HRMGemma(config).init_weights(7)
    x = ids()
    logits, aux = model(x, cycles=cycles)
    lm_loss(logits, x, aux, config)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gate_init_sets_every_gate_and_makes_cycles_differ() -> None:
    model = HRMGemma(small(gate_init=1.0)).init_weights(0)
    gates = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("gate_")]
    assert len(gates) == 3 * 2 and all(bool((g == 1.0).all()) for g in gates)
    with torch.no_grad():
        one, _ = model(ids(), cycles=1)
        three, _ = model(ids(), cycles=3)
    assert not torch.allclose(one, three, atol=1e-4)  # zero gates would give the same logits
    zero = HRMGemma(small()).init_weights(0)
    with torch.no_grad():
        assert torch.allclose(zero(ids(), cycles=1)[0], zero(ids(), cycles=3)[0], atol=1e-5)


def test_gated_rms_feeds_back_normalised_states_and_is_exact_at_zero_gates() -> None:
    from hrm_mega.models.layers import rms_norm

    zero = HRMGemma(small(injection="gated_rms", num_layers=2)).init_weights(0)
    with torch.no_grad():  # zero gates: every cycle is H(L(x)), however many run
        assert torch.equal(zero(ids(), cycles=1)[0], zero(ids(), cycles=4)[0])
    model = HRMGemma(small(injection="gated_rms", gate_init=1.0, num_layers=2, l_cycles=1)).init_weights(0)
    block, x = model.blocks["0"], ids()
    with torch.no_grad():
        h = model.embed(x)
        ctx = model.seq_context(h, None, None, None)
        z_L = z_H = torch.zeros_like(h)
        for _ in range(3):  # the module docstring's update, written out
            z_L = block.L(h + rms_norm(z_L, 1e-6) + rms_norm(z_H, 1e-6), None, ctx)
            z_H = block.H(z_L + rms_norm(z_H, 1e-6), None, ctx)
        ours, _, _ = block(h, ctx, 3)
    assert torch.allclose(ours, z_H, atol=1e-5)

    def state_norm(injection: str, cycles: int) -> float:
        m = HRMGemma(small(injection=injection, gate_init=1.0, num_layers=2, l_cycles=1)).init_weights(0)
        with torch.no_grad():
            h = m.embed(x)
            z, _, _ = m.blocks["0"](h, m.seq_context(h, None, None, None), cycles)
        return float(z.norm())

    # the plain gated sums grow with every cycle; the normalised feedback keeps the state bounded
    assert state_norm("gated", 8) > 20 * state_norm("gated", 2)
    assert state_norm("gated_rms", 8) < 1.5 * state_norm("gated_rms", 2)


def test_grad_cycles_truncates_backprop_to_the_last_cycles() -> None:
    base = small(gate_init=0.5)
    full = gradients(base)
    last = gradients(dataclasses.replace(base, grad_mode="last_cycle"))
    one = gradients(dataclasses.replace(base, grad_cycles=1))
    all_three = gradients(dataclasses.replace(base, grad_cycles=3))
    two = gradients(dataclasses.replace(base, grad_cycles=2))
    assert one.keys() == last.keys() and all(torch.allclose(one[k], last[k], atol=1e-6) for k in one)
    assert all(torch.allclose(all_three[k], full[k], atol=1e-6) for k in full)
    gate = "blocks.0.gate_LH"
    assert not torch.allclose(two[gate], one[gate]) and not torch.allclose(two[gate], full[gate])


def test_lr_multipliers_group_gates_and_halting_heads() -> None:
    model = HRMGemma(small(gate_init=1.0)).init_weights(0)
    assert isinstance(parameter_groups(model)[0], torch.nn.Parameter)  # no multipliers: one plain list
    groups = parameter_groups(model, gate_lr_mult=10.0, halt_lr_mult=3.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_mult = {g["lr_mult"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert set(by_mult) == {1.0, 3.0, 10.0}
    assert by_mult[10.0] == sorted(f"blocks.{b}.gate_{k}" for b in "01" for k in ("HH", "LH", "LL"))
    assert by_mult[3.0] == sorted(f"blocks.{b}.halt_head.{w}" for b in "01" for w in ("bias", "weight"))
    assert sum(len(v) for v in by_mult.values()) == len(list(model.parameters()))
    # set_lr applies each group's multiplier on the shared schedule
    optimizer = AdamATan2(groups, lr=1.0)
    config = load_config(RECIPE, ["optim.gate_lr_mult=10", "optim.halt_lr_mult=3", "optim.warmup_steps=0"])
    fake = SimpleNamespace(config=config, step=0, task=SimpleNamespace(set_lr_scale=lambda s: None),
                           engine=SimpleNamespace(optimizer=optimizer))  # fmt: skip
    lr = Trainer.set_lr(fake)
    assert lr == pytest.approx(config.optim.lr)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([lr, 3 * lr, 10 * lr])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.grad_cycles=2", "model.grad_cycles=2 must be >= 0, and > 0 only with model.grad_mode=full"),
        ("model.gate_init=.nan", "model.gate_init=nan must be finite"),
        ("optim.gate_lr_mult=0", "optim.gate_lr_mult=0.0 must be a number > 0"),
        ("optim.halt_lr_mult=-1", "optim.halt_lr_mult=-1.0 must be a number > 0"),
        ("model.halt_target=correct", "model.halt_target=correct needs model.deep_supervision=true"),
    ],
)
def test_recipe_option_errors(override: str, message: str) -> None:
    sets = ["model.grad_mode=one_step"] if override.startswith("model.grad_cycles") else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(RECIPE, [*sets, override])
    with pytest.raises(ConfigError, match="non-zero only with model.injection gated or gated_rms"):
        load_config(RECIPE, ["model.injection=add"])  # the recipe's gate_init=1 needs gates


def test_bench_recipe_is_one_group_whose_gemma_twin_has_the_same_parameters() -> None:
    config = load_config(RECIPE)
    m = config.model
    assert (m.num_groups, m.num_tail_layers, m.gate_init, config.train.cycles_range) == (1, 0, 1.0, [1, 4])
    hrm = HRMGemma(m).parameter_counts()
    gemma = HRMGemma(dataclasses.replace(m, h_cycles=1, l_cycles=1)).parameter_counts()
    assert hrm == gemma


def test_trace_recipe_is_the_reason_recipe_with_the_settings_the_bench_measured() -> None:
    """configs/lm/hrmgemma_trace_tiny.yaml resolves to exactly the run bench/cycles_scaling.py measured
    on trace (docs/benchmarks.md, fourth round): the reasoning recipe with these overrides."""
    measured = ["train.global_batch=16", "optim.lr=2e-3", "model.injection=gated_rms", "model.deep_supervision=true",
                "model.h_cycles=5", "train.cycles_range=[]", "model.halt_target=correct"]  # fmt: skip
    where = ["data.path=/data/trace/train", "log.out_dir=/runs/trace"]
    trace = load_config(RECIPE.with_name("hrmgemma_trace_tiny.yaml"), where)
    assert trace == load_config(RECIPE, [*measured, *where])
    assert trace != load_config(RECIPE, where)


def test_trace_rl_recipe_post_trains_the_trace_model_with_drawn_halting(tmp_path: Path) -> None:
    """configs/rl/grpo_trace_halting.yaml (bench/rl_lm_halting.py) is a valid RL config over the trace
    recipe's model, with halting drawn (rl.halting=sample and a threshold) and a compute cost."""
    for name in ("train", "held_out"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "trace a1?:a=", "answer": "1"}\n')
    where = [
        f"rl.prompt_file={tmp_path / 'train.jsonl'}",
        f"rl.eval_prompt_file={tmp_path / 'held_out.jsonl'}",
    ]
    rl = load_config(RECIPE.parents[1] / "rl/grpo_trace_halting.yaml", where, world_size=1, command="rl")
    trace = load_config(RECIPE.with_name("hrmgemma_trace_tiny.yaml"))
    assert rl.model == trace.model
    assert rl.rl.halting == "sample" and 0 < rl.rl.halt_threshold < 1 and rl.rl.compute_cost_lambda > 0
    assert rl.rl.prompts == "jsonl" and rl.rl.max_cycles == 2 * trace.model.h_cycles


def test_deep_supervision_is_the_mean_ce_of_every_cycle_count() -> None:
    """With one CycleBlock, the readout after H update n of an N-cycle forward is the output of an
    n-cycle forward (its cycles do not depend on N), so the supervised CE is the mean of the 1..N-cycle
    CEs."""
    for layers in (2, 3):  # one group; one group and a trailing local layer
        config = small(gate_init=0.5, num_layers=layers)
        plain = HRMGemma(config).init_weights(3)
        supervised = HRMGemma(dataclasses.replace(config, deep_supervision=True)).init_weights(3)
        x = ids()
        per_count = []
        for n in (1, 2, 3):
            logits, aux = plain(x, cycles=n)
            per_count.append(float(lm_loss(logits, x, aux, config)["ce"]))
        logits, aux = supervised(x, cycles=3)
        assert aux["cycle_logits"].shape[0] == 2
        ce = float(lm_loss(logits, x, aux, config)["ce"])
        assert ce == pytest.approx(sum(per_count) / 3, rel=1e-5)
        assert ce != pytest.approx(per_count[-1], rel=1e-3)
        with torch.no_grad():  # evaluation forwards read the last cycle only
            assert "cycle_logits" not in supervised(x, cycles=3)[1]
    with pytest.raises(ConfigError, match="model.deep_supervision is not available"):
        load_config(RECIPE, ["model.deep_supervision=true", "train.activation_checkpointing=true"])


def test_due_cycles_train_each_target_from_its_cycle_on() -> None:
    """With due cycles (prep text --due-field), the readout after cycle n < N is trained on the targets due
    by n only and the last on every target: the CE is the mean over n of the n-cycle forward's CE summed
    over those targets, per labelled target; at N = 1, or without deep supervision, `due` changes
    nothing."""
    config = small(gate_init=0.5, num_layers=2, deep_supervision=True)
    model = HRMGemma(config).init_weights(3)
    x = ids()
    due = torch.randint(0, 5, x.shape, generator=torch.Generator().manual_seed(1))  # 4: never at N = 3
    targets, target_due = x[:, 1:], due[:, 1:]
    expected = 0.0
    for n in (1, 2, 3):
        with torch.no_grad():
            logits, _ = model(x, cycles=n)
        keep = (target_due <= n) | (n == 3)
        expected += float(
            torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
        )
    expected /= 3 * targets.numel()
    logits, aux = model(x, cycles=3)
    ce = float(lm_loss(logits, x, aux, config, due=due)["ce"])
    assert ce == pytest.approx(expected, rel=1e-5)
    assert ce != pytest.approx(float(lm_loss(logits, x, aux, config)["ce"]), rel=1e-3)
    logits, aux = model(x, cycles=1)
    assert float(lm_loss(logits, x, aux, config, due=due)["ce"]) == float(
        lm_loss(logits, x, aux, config)["ce"]
    )
    plain = dataclasses.replace(config, deep_supervision=False)
    logits, aux = HRMGemma(plain).init_weights(3)(x, cycles=3)
    assert float(lm_loss(logits, x, aux, plain, due=due)["ce"]) == float(lm_loss(logits, x, aux, plain)["ce"])


def test_correct_halting_target_is_the_label_at_this_and_every_later_cycle() -> None:
    """model.halt_target=correct: on labelled tokens the halting head of the (last) block is trained on
    "the readout after this cycle is the label's argmax, and so is every later one", computed here from
    separate 1-, 2- and 3-cycle forwards (one block: the readout after update n is the n-cycle output);
    unlabelled tokens keep the convergence target."""
    config = small(gate_init=0.5, num_layers=2, deep_supervision=True, halt_target="correct")
    model = HRMGemma(config).init_weights(3)
    with torch.no_grad():  # a head that is not undecided everywhere (it starts at zero)
        model.blocks["0"].halt_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        model.blocks["0"].halt_head.bias.fill_(1.0)
    x = ids()
    with torch.no_grad():
        preds = torch.stack([model(x, cycles=n)[0].argmax(-1) for n in (1, 2, 3)])  # [3, b, s]
    # labels: the 3-cycle prediction on even positions (right at the last readout), random elsewhere
    labels = torch.where(torch.arange(x.shape[1]) % 2 == 0, torch.roll(preds[-1], 1, dims=1), x)
    labels[:, :1] = -100
    targets = labels[:, 1:]
    right = preds[:, :, :-1] == targets  # [3, b, s-1]
    expected_target = torch.stack([right[0] & right[1] & right[2], right[1] & right[2]]).float()
    assert 0 < expected_target.mean() < 1
    logits, aux = model(x, cycles=3)
    halt = aux["halt_logits"][0, :-1]  # [2, b, s]: the readings with a target
    converged = aux["converged"][0].float()
    target = torch.cat([expected_target, converged[:, :, -1:]], dim=2)  # the last position has no label
    bce = torch.nn.functional.binary_cross_entropy_with_logits(halt, target, reduction="none").mean(0).mean()
    parts = lm_loss(logits, labels, aux, config)
    assert float(parts["halt_bce"]) == pytest.approx(float(bce), rel=1e-5)
    converged_only = lm_loss(logits, labels, aux, dataclasses.replace(config, halt_target="converged"))
    assert float(converged_only["halt_bce"]) != pytest.approx(float(bce), rel=1e-3)
    # tokens left out of halt_labels (the trainer leaves out hidden targets) keep the convergence target
    undecided = lm_loss(logits, labels, aux, config, halt_labels=torch.full_like(labels, -100))
    assert float(undecided["halt_bce"]) == float(converged_only["halt_bce"])
