"""HRMGemma training end to end (train.task=lm) on DeepSpeed, CPU, gloo: DP equivalence with sampled
cycles, exact resume from a checkpoint, `hrm-mega eval` reproducing the logged evaluation, and errors.
Each run is a real subprocess on a text dataset built by hrm_mega.prep from the generated corpus."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import env, losses, pretrain_cmd

from hrm_mega.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = [
    "model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=5",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16", "model.query_pre_attn_scalar=16",
    "model.sliding_window=8", "model.local_per_global=3", "model.max_position=64", "model.h_cycles=2",
    "model.l_cycles=1", "train.global_batch=4", "data.partitions=2", "data.shuffle_buffer=8",
    "optim.warmup_steps=2", "optim.lr=3e-3", "log.wandb=disabled", "log.log_interval=1",
    "log.progress_bar=false", "train.cycles_range=[1,3]",
]  # fmt: skip


def lm_cmd(run_dir: Path, data: Path, *overrides: str, nproc: int = 1, resume: str = "auto") -> list[str]:
    sets = [*TINY_LM, f"data.path={data}", f"log.out_dir={run_dir}", *overrides]
    return pretrain_cmd(ROOT / "configs/lm/hrmgemma_tiny.yaml", sets, nproc, resume)


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dp2_zero2_equals_dp1_with_sampled_cycles(tiny_text: Path, tmp_path: Path) -> None:
    run_ok(lm_cmd(tmp_path / "dp1", tiny_text, "train.steps=6"))
    run_ok(lm_cmd(tmp_path / "dp2", tiny_text, "train.steps=6", "parallel.zero_stage=2", nproc=2))
    one, two = losses(tmp_path / "dp1"), losses(tmp_path / "dp2")
    assert sorted(one) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    cycles = [r["cycles"] for r in records(tmp_path / "dp1") if "cycles" in r]
    assert cycles == [r["cycles"] for r in records(tmp_path / "dp2") if "cycles" in r]
    assert len(set(cycles)) > 1 and set(cycles) <= {1, 2, 3}  # really drawn from [1, 3]


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_exactly_and_eval_reproduces(
    tiny_text: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    run_ok(lm_cmd(full, tiny_text, "train.steps=6", "train.checkpoint_interval=3", "optim.ema_decay=0.9"))
    resumed = tmp_path / "resumed"
    checkpoint = full / "checkpoints/step-00000003"
    run_ok(lm_cmd(resumed, tiny_text, "train.steps=6", "optim.ema_decay=0.9", resume=str(checkpoint)))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == a[step], step  # bit-identical: same data, cycles, RNG and optimizer state

    logged = next(r for r in reversed(records(full)) if "eval/loss" in r)
    out = run_ok([sys.executable, "-m", "hrm_mega.cli", "eval", str(full / "checkpoints/step-00000006")])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)
    assert logged["eval/loss"] < logged["eval/unigram_baseline"] * 2  # sanity: a real, finite evaluation


def test_lm_config_errors_are_one_line() -> None:
    lm = ROOT / "configs/lm/hrmgemma_tiny.yaml"
    with pytest.raises(ConfigError, match="train.task=puzzle does not fit model.family=hrm_gemma"):
        load_config(lm, ["train.task=puzzle"])
    with pytest.raises(ConfigError, match=r"train.cycles_range=\[3, 1\]"):
        load_config(lm, ["train.cycles_range=[3,1]"])
    with pytest.raises(ConfigError, match="train.distill_weight > 0 needs train.distill_from"):
        load_config(lm, ["train.distill_weight=1.0"])
    with pytest.raises(ConfigError, match="apply to train.task=lm only"):
        load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", ["train.cycles_range=[1,2]"])


@pytest.mark.slow
def test_a_vocab_smaller_than_the_data_is_a_one_line_error(tiny_text: Path, tmp_path: Path) -> None:
    small_vocab = lm_cmd(tmp_path / "bad", tiny_text, "train.steps=1", "model.vocab_size=100")
    out = subprocess.run(small_vocab, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("hrm-mega train: error: model.vocab_size=100 is smaller than ")
    assert last.endswith("manifest.json's vocab_size 320")


def test_distillation_loss_is_temperature_scaled_kl_over_labelled_tokens() -> None:
    import torch

    from hrm_mega.training.tasks.lm import distillation_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, 6]])
    assert float(distillation_loss(student, student, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # by hand: position i predicts labels[i+1]; average KL(teacher || student) over those positions
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            if labels[b, i + 1] == -100:
                continue
            p_t = torch.softmax(teacher[b, i] / 2.0, -1)
            log_p_s = torch.log_softmax(student[b, i] / 2.0, -1)
            total += float((p_t * (p_t.log() - log_p_s)).sum())
            count += 1
    expected = 4.0 * total / count
    assert float(distillation_loss(student, teacher, labels, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_vocab_kl_gradient_is_the_autograd_gradient_of_the_kl() -> None:
    """kl_divergence writes its backward by hand (p_s - p_t, what the vocab-parallel form needs); on one
    process it must equal autograd through log_softmax."""
    import torch
    import torch.nn.functional as F

    from hrm_mega.models.vocab import kl_divergence

    g = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(6, 11, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(6, 11, generator=g)
    weights = torch.rand(6, generator=g)
    (kl_divergence(student, teacher) * weights).sum().backward()
    reference = student.detach().clone().requires_grad_()
    log_t = F.log_softmax(teacher, -1)
    expected = (log_t.exp() * (log_t - F.log_softmax(reference, -1))).sum(-1)
    (expected * weights).sum().backward()
    assert torch.allclose(kl_divergence(student.detach(), teacher), expected.detach(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(student.grad, reference.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_distillation_from_a_teacher_checkpoint(tiny_text: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    run_ok(lm_cmd(teacher, tiny_text, "train.steps=2"))
    student = tmp_path / "student"
    run_ok(lm_cmd(student, tiny_text, "train.steps=2", "train.distill_weight=0.5",
                  f"train.distill_from={teacher / 'checkpoints/step-00000002'}"))  # fmt: skip
    steps = [r for r in records(student) if "distill" in r]
    assert len(steps) == 2 and all(r["distill"] > 0 for r in steps)
    for r in steps:  # the logged loss includes the weighted distillation term
        assert r["loss"] == pytest.approx(
            r["ce"] + 0.1 * r["halt_bce"] + 0.01 * r["compute_cost"] + 0.5 * r["distill"], rel=1e-5
        )


def test_init_from_copies_weights_strictly_and_allows_more_cycles(tmp_path: Path) -> None:
    import torch

    from hrm_mega.checkpoint.model_dir import CheckpointError, save_model_dir
    from hrm_mega.models import build_model
    from hrm_mega.training.task import load_init_weights

    lm = ROOT / "configs/lm/hrmgemma_tiny.yaml"
    source_config = load_config(lm, ["model.h_cycles=1", "model.l_cycles=1"])
    source = build_model(source_config.model).init_weights(seed=7)
    save_model_dir(source.state_dict(), source_config, tmp_path / "src")

    config = load_config(lm, [f"train.init_from={tmp_path / 'src'}", "model.h_cycles=3"])
    model = build_model(config.model).init_weights(seed=0)
    load_init_weights(model, config)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(CheckpointError, match="train.init_from=.*: embed_tokens.weight has shape"):
        wider = load_config(lm, [f"train.init_from={tmp_path / 'src'}", "model.vocab_size=600"])
        load_init_weights(build_model(wider.model).init_weights(seed=0), wider)
    puzzle = load_config(
        ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", [f"train.init_from={tmp_path / 'src'}"]
    )
    with pytest.raises(ConfigError, match="holds a hrm_gemma model; this recipe is model.family=puzzle"):
        load_init_weights(build_model(puzzle.model).init_weights(seed=0), puzzle)


@pytest.mark.slow
def test_a_two_source_mixture_trains_evaluates_per_source_and_resumes_at_dp2(
    tiny_text: Path, tmp_path: Path
) -> None:
    """data.sources with weights 3:1 (the tiny corpus and a copy of it): per-source sample and token
    counters and held-out losses are logged; resumed at DP=2 with ZeRO-1 from DP=1's step-2 checkpoint
    (the merged loader state; the Adam moments into ZeRO partitions that have taken no step yet), steps
    3-4 log DP=1's losses."""
    import shutil

    other = shutil.copytree(tiny_text, tmp_path / "other")
    mix = f"data.sources=[{{path: '{tiny_text}', weight: 3, name: main}}, {{path: '{other}', weight: 1}}]"
    common = [mix, "train.steps=4", "train.checkpoint_interval=2", "train.cycles_range=[]"]
    one = tmp_path / "dp1"
    run_ok(lm_cmd(one, tiny_text, *common))
    logged = records(one)
    final = logged[-1]
    for name in ("main", "other"):
        assert final[f"eval/{name}/loss"] > 0 and f"eval/{name}/mean_cycles" in final
    steps = [r for r in logged if "loss" in r]
    assert steps[-1]["data/main/samples"] + steps[-1]["data/other/samples"] == 4 * 4
    assert (
        steps[-1]["data/main/samples"] > steps[-1]["data/other/samples"]
        and steps[-1]["data/other/tokens"] > 0
    )
    two = tmp_path / "dp2"
    shutil.copytree(one / "checkpoints", two / "checkpoints", ignore=shutil.ignore_patterns("step-00000004"))
    (two / "checkpoints/latest").write_text("step-00000002")
    run_ok(lm_cmd(two, tiny_text, *common, "parallel.zero_stage=1", nproc=2))
    resumed = losses(two)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses(one)[step], rel=1e-5), step


def build_tiny_qa(root: Path, tiny_text: Path) -> Path:
    """Arithmetic prompt/answer records (prep corpus --format jsonl) packed with tiny_text's tokenizer:
    a second source for a mixture, with answer spans."""
    from hrm_mega.prep.cli import main as prep_main

    argv = [
        "corpus",
        "--out",
        str(root / "qa-corpus"),
        "--docs",
        "200",
        "--format",
        "jsonl",
        "--tasks",
        "add,sub",
    ]
    assert prep_main([*argv, "--max-digits", "2"]) == 0
    assert prep_main(["text", "--input", str(root / "qa-corpus/train.jsonl"), "--test-input", str(root / "qa-corpus/test.jsonl"),
                      "--prompt-field", "prompt", "--answer-field", "answer", "--tokenizer", str(tiny_text / "tokenizer.model"),
                      "--seq-len", "32", "--out", str(root / "qa"), "--workers", "1", "--samples-per-shard", "8"]) == 0  # fmt: skip
    return root / "qa"


@pytest.mark.slow
def test_sigkill_just_before_a_token_stage_boundary_resumes_across_it_exactly(
    tiny_text: Path, tmp_path: Path
) -> None:
    """A curriculum over tokens (4 rows x 32 tokens a step: 384 tokens end stage 0 after step 3) read with
    a loader worker: killed once step 3 is logged, the run resumes from its latest checkpoint across the
    boundary, and every step logs the uninterrupted run's loss and per-source sample counts. The second
    source holds prompt/answer documents (answer-only loss, exact match) and is read through a `pipe:`
    command; `hrm-mega eval` of the checkpoint prints every source's line as training logged it."""
    from conftest import sigkill_after_step

    qa = build_tiny_qa(tmp_path, tiny_text)
    url = f"pipe:cat {qa}/{{split}}/{{name}}"  # the second source's shards through webdataset's pipe:
    common = [
        f"data.sources=[{{path: '{tiny_text}', name: main}}, {{path: '{qa}', shard_url: '{url}'}}]",
        "data.curriculum=[{until_tokens: 384, weights: {main: 1}}, {weights: {qa: 1}}]",
        "data.num_workers=1", "train.steps=6", "train.checkpoint_interval=1",
    ]  # fmt: skip
    whole = tmp_path / "whole"
    run_ok(lm_cmd(whole, tiny_text, *common))
    killed = tmp_path / "killed"
    sigkill_after_step(lm_cmd(killed, tiny_text, *common), killed, 3, losses, env(), ROOT)
    assert max(losses(killed)) < 6  # killed mid-run
    run_ok(lm_cmd(killed, tiny_text, *common))

    def steps(run_dir: Path) -> dict[int, tuple]:
        keys = ("loss", "data/main/samples", "data/qa/samples")
        return {r["step"]: tuple(r[k] for k in keys) for r in records(run_dir) if "loss" in r}

    reference = steps(whole)
    assert reference[3][1:] == (12, 0) and reference[4][1:] == (12, 4)  # the boundary, in samples
    assert steps(killed) == reference
    final = records(whole)[-1]
    assert "eval/main/answer_exact" not in final and 0.0 <= final["eval/qa/answer_exact"] <= 1.0
    out = run_ok([sys.executable, "-m", "hrm_mega.cli", "eval", str(whole / "checkpoints/step-00000006")])
    lines = {r["source"]: r for r in map(json.loads, out.stdout.strip().splitlines()[-2:])}
    assert lines["qa"]["answer_exact"] == pytest.approx(final["eval/qa/answer_exact"])
    assert lines["qa"]["loss"] == pytest.approx(final["eval/qa/loss"], rel=1e-6)
    assert lines["main"]["loss"] == pytest.approx(final["eval/main/loss"], rel=1e-6)
