"""RL post-training (`hrm-mega rl`, hrm_mega/training/rl*.py): config and prompt pieces in process; whole
runs as real subprocesses on DeepSpeed (CPU, gloo): GRPO on a puzzle model, GRPO and PPO on HRMGemma,
DP=2 equal to DP=1, exact resume after SIGKILL, and one-line errors.

Models start from freshly initialised weights saved as model directories (what --init reads), and the
rewards come from a test module loaded through rl.reward_modules: dense rewards that differ between the
samples of a group, so that advantages, and with them the losses compared below, are not zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import module_cmd, sigkill_after_step
from test_lm_training import TINY_LM

from hrm_mega.checkpoint.model_dir import CheckpointError, save_model_dir
from hrm_mega.config import ConfigError, load_config
from hrm_mega.models import build_model
from hrm_mega.prep.text import train_tokenizer
from hrm_mega.rl.prompts import ArithmeticPrompts
from hrm_mega.rl.rollout import lm_policy, lm_rollout
from hrm_mega.training.task import load_init_weights
from hrm_mega.training.tasks.rl import (
    EngineView,
    RLTask,
    check_same_tokenizer,
    rollout_batch_config,
    step_seed,
)
from hrm_mega.training.tasks.rl_lm import check_prompt_boundary, concat_lm_rollouts, operation

ROOT = Path(__file__).resolve().parents[1]
PUZZLE_RECIPE = ROOT / "configs/rl/grpo_sudoku_tiny.yaml"
LM_RECIPE = ROOT / "configs/rl/grpo_arith_tiny.yaml"
COMMON = ["log.wandb=disabled", "log.log_interval=1", "log.progress_bar=false", "optim.lr=3e-3"]
TINY_PUZZLE = [
    "model.hidden_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.h_layers=1",
    "model.l_layers=1", "model.halt_max_steps=3", "data.partitions=2", "data.shuffle_buffer=16",
    "train.eval_max_samples=8", "train.eval_modes=fixed,adaptive", "rl.prompts_per_step=4", "rl.group_size=4",
    "rl.rewards={test_cells_five: 1.0}", "rl.reward_modules=[rl_test_rewards]", "rl.compute_cost_lambda=0.5",
    "rl.temperature=1.0", "rl.scale=group",  # fixed here, whatever the recipe is tuned to
]  # fmt: skip
TINY_LM_RL = [
    *[o for o in TINY_LM if not o.startswith(("train.global_batch", "train.cycles_range", "log.", "optim."))],
    "rl.prompts_per_step=4", "rl.group_size=3", "rl.rollout_chunk=2", "rl.max_new_tokens=5",
    "rl.eval_prompts=8", "rl.rewards={test_length: 1.0, arithmetic_exact_match: 1.0}",
    "rl.reward_modules=[rl_test_rewards]", "data.partitions=1",
]  # fmt: skip
REWARDS_MODULE = '''
import torch
from hrm_mega.rl.rewards import register_reward

@register_reward("test_cells_five")
def cells_five(*, tokens, **_):
    """Dense: the share of cells showing token 5."""
    return (tokens == 5).float().mean(dim=1)

@register_reward("test_cells_five_even")
def cells_five_even(*, tokens, inputs, **_):
    """test_cells_five on puzzles whose inputs sum to an even number; 0 on the others (uniform groups)."""
    return (tokens == 5).float().mean(dim=1) * (inputs.long().sum(dim=1) % 2 == 0).float()

@register_reward("test_length")
def length(*, completions, **_):
    """Dense: longer completions (up to 8 characters) score more."""
    return torch.tensor([min(len(c), 8) / 8 for c in completions])
'''


# --- in-process pieces -------------------------------------------------------------------------------


def test_rl_config_fields_are_checked_with_one_line_errors() -> None:
    recipe = PUZZLE_RECIPE
    assert load_config(recipe).rl.rewards == {"sudoku_valid": 1.0}
    with pytest.raises(ConfigError, match="rl.group_size must be >= 2 for rl.algorithm=grpo"):
        load_config(recipe, ["rl.group_size=1"])
    with pytest.raises(ConfigError, match="rl.eps_low=1.5 must be in"):
        load_config(recipe, ["rl.eps_low=1.5"])
    with pytest.raises(ConfigError, match="rl.rewards=.* must map reward names to weights"):
        load_config(recipe, ["rl.rewards=[sudoku_valid]"])
    with pytest.raises(ConfigError, match="rl.arithmetic_ops=.*must be a non-empty list"):
        load_config(recipe, ["rl.arithmetic_ops=[/]"])
    with pytest.raises(ConfigError, match="unknown config key rl.beta2; did you mean rl.beta"):
        load_config(recipe, ["rl.beta2=0.1"])
    with pytest.raises(ConfigError, match="rl.drop_uniform_groups applies to rl.algorithm=grpo"):
        load_config(recipe, ["rl.drop_uniform_groups=true", "rl.algorithm=ppo"])
    with pytest.raises(ConfigError, match="rl.arithmetic_train_pool=-1 must be >= 0"):
        load_config(recipe, ["rl.arithmetic_train_pool=-1"])


def test_rollout_batch_config_sets_the_step_rows() -> None:
    config = rollout_batch_config(load_config(PUZZLE_RECIPE, ["rl.prompts_per_step=8", "rl.group_size=4"]))
    assert config.train.global_batch == 32
    with pytest.raises(ConfigError, match="train.micro_batch=64 does not divide the 32 rollouts"):
        overrides = ["rl.prompts_per_step=8", "rl.group_size=4", "train.micro_batch=64"]
        load_config(PUZZLE_RECIPE, overrides, command="rl")


def test_step_seed_is_a_function_of_seed_step_and_stream() -> None:
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1)
    assert len({step_seed(0, 3, 1), step_seed(0, 4, 1), step_seed(1, 3, 1), step_seed(0, 3, 2)}) == 4


def test_arithmetic_prompts_are_keyed_correct_and_held_out() -> None:
    a = ArithmeticPrompts(seed=0, ops=["+", "-", "*"], max_digits=4, eval_count=300, per_step=16)
    b = ArithmeticPrompts(seed=0, ops=["+", "-", "*"], max_digits=4, eval_count=300, per_step=16)
    assert a.eval_set == b.eval_set
    # the questions of (step, index) do not depend on which rank asks for which slice
    assert a.train_questions(5, 0, 16) == b.train_questions(5, 0, 8) + b.train_questions(5, 8, 8)
    held_out = {p for p, _ in a.eval_set}
    train = [q for step in range(60) for q in a.train_questions(step, 0, 16)]
    assert not held_out & {p for p, _ in train}
    small = [p for p, _ in a.eval_set if len(p) <= 5]  # e.g. "3+4=": the held-out set really has them
    assert small, "expected some one-digit questions in 300"
    for prompt, answer in train[:200]:
        a_, op, b_ = prompt[:-1].replace("-", " - ").replace("+", " + ").replace("*", " * ").split()
        assert int(answer) == eval(f"{int(a_)} {op} {int(b_)}")
        if op == "*":
            assert len(a_) <= 3 and len(b_) <= 2
        else:
            assert len(a_) <= 4 and len(b_) <= 4
    assert {p[-1] for p, _ in train} == {"="} and len({p for p, _ in train}) > 500
    other = ArithmeticPrompts(seed=1, ops=["+"], max_digits=4, eval_count=10, per_step=16)
    with pytest.raises(ValueError, match="prompt state: seed=0 but this run has seed=1"):
        other.load_state_dict(a.state_dict())
    # a pool of 24 train questions: steps cycle through them (16 per step) and none is held out
    pooled = ArithmeticPrompts(
        seed=0, ops=["+", "-", "*"], max_digits=4, eval_count=300, per_step=16, pool=24
    )
    seen = [q for step in range(6) for q in pooled.train_questions(step, 0, 16)]
    assert seen[:24] == a.train_questions(0, 0, 16) + a.train_questions(1, 0, 8)
    assert seen[24:48] == seen[:24] and len(set(seen)) == 24 and not held_out & {p for p, _ in seen}
    with pytest.raises(ValueError, match="prompt state: pool=0 but this run has pool=24"):
        pooled.load_state_dict(a.state_dict())


def _tiny_lm(value_head: bool = False):
    config = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml", [*TINY_LM, f"model.value_head={value_head}"])
    return build_model(config.model).init_weights(seed=3).eval(), config


def test_concat_lm_rollouts_pads_and_keeps_every_log_prob() -> None:
    torch.manual_seed(0)
    model, _ = _tiny_lm()
    prompts = [torch.tensor([[2, 40, 41]]), torch.tensor([[2, 50, 51, 52, 53]])]
    with torch.no_grad():
        parts = [
            lm_rollout(model, p, group_size=2, max_new_tokens=4, seed=i, eos_id=1, vocab_limit=300)
            for i, p in enumerate(prompts)
        ]
        merged = concat_lm_rollouts(parts, new_tokens=6)
        assert merged.prompt_ids.shape == (4, 5) and merged.completion_ids.shape == (4, 6)
        assert merged.prompt_mask[:2].tolist() == [[0, 0, 1, 1, 1]] * 2
        assert not merged.completion_mask[:, 4:].any()
        for i, part in enumerate(parts):
            rows = slice(2 * i, 2 * i + 2)
            n = part.completion_ids.shape[1]
            assert torch.equal(merged.completion_ids[rows, :n], part.completion_ids)
            assert torch.equal(merged.logprobs[rows, :n], part.logprobs)
        # the training forward over the padded batch reproduces the sampler's log-probs
        recomputed = lm_policy(model, merged)
    real = merged.completion_mask
    assert real.sum() > 4
    torch.testing.assert_close(recomputed.logprobs[real], merged.logprobs[real], atol=1e-4, rtol=0)


def test_init_loading_keeps_a_fresh_value_head_and_is_strict_otherwise(tmp_path: Path) -> None:
    source, source_config = _tiny_lm()
    save_model_dir(source.state_dict(), source_config, tmp_path / "src")
    model, config = _tiny_lm(value_head=True)
    torch.nn.init.normal_(model.value_head.weight)
    config.train.init_from = str(tmp_path / "src")
    fresh, _ = load_init_weights(model, config, RLTask.keep_fresh, f"--init {config.train.init_from}")
    assert fresh == ("value_head.weight", "value_head.bias")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    wider = load_config(
        ROOT / "configs/lm/hrmgemma_tiny.yaml",
        [*TINY_LM, "model.hidden_size=64", "model.intermediate_size=128"],
    )
    wider.train.init_from = str(tmp_path / "src")
    with pytest.raises(CheckpointError, match="--init .*has shape"):
        load_init_weights(build_model(wider.model).init_weights(seed=0), wider, RLTask.keep_fresh, "--init x")


def test_a_text_dataset_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    for name, digest in (("pretrain", "aa"), ("same", "aa"), ("other", "bb")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"extra": {"tokenizer_sha256": digest}}))
    source = load_config(LM_RECIPE, [f"data.path={tmp_path / 'pretrain'}"])
    check_same_tokenizer(source, load_config(LM_RECIPE, [f"data.path={tmp_path / 'same'}"]))
    check_same_tokenizer(source, load_config(LM_RECIPE, [f"data.path={tmp_path / 'gone'}"]))  # can't tell
    with pytest.raises(ConfigError, match="has another tokenizer than .*pretrain, the dataset --init"):
        check_same_tokenizer(source, load_config(LM_RECIPE, [f"data.path={tmp_path / 'other'}"]))


def test_a_tokenizer_that_merges_the_prompt_end_with_answers_is_refused() -> None:
    """Trained on a-b=c text, BPE's one merge is '=-': a prompt ending in '=' then cannot be followed by
    a negative answer. With '=' atomic the boundary holds and the check passes."""
    import sentencepiece as spm

    docs = [f"{a}-{b}={a - b}" for a in range(30) for b in range(30)]
    questions = [("7-2=", "5"), ("3-5=", "-2")]
    merging = spm.SentencePieceProcessor(model_proto=train_tokenizer(docs, 273, seed=0, max_documents=900))
    with pytest.raises(
        ConfigError, match=r"tok.model merges the end of the prompt '3-5=' .*'=-'.*--atomic-symbols ="
    ):
        check_prompt_boundary(merging, questions, "tok.model")
    atomic = train_tokenizer(docs, 272, seed=0, max_documents=900, atomic_symbols=["="])
    check_prompt_boundary(spm.SentencePieceProcessor(model_proto=atomic), questions, "tok.model")
    assert [operation(p) for p in ("12+3=", "4-56=", "7*8=")] == ["+", "-", "*"]


def test_engine_view_calls_the_engine_and_reads_the_module() -> None:
    class Engine:
        config = {"train_batch_size": 4}  # DeepSpeed's own config dict shadows the model's

        def __init__(self, module):
            self.module = module

        def __call__(self, x):
            return ("engine", x)

    module = torch.nn.Linear(2, 2)
    module.config = "model config"
    view = EngineView(Engine(module))
    assert view(3) == ("engine", 3)
    assert view.config == "model config" and view.weight is module.weight


# --- whole runs --------------------------------------------------------------------------------------


USER_REWARDS = '''
import torch

def exact(*, completions, answers, metadata, **_):
    """A user's reward named as mypkg.rewards:exact: the answer, and the record's task in metadata."""
    assert all("task" in m for m in metadata)
    return torch.tensor([float(c.strip() == a) for c, a in zip(completions, answers)])

def boom(*, completions, **_):
    raise KeyError("difficulty")
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Reward modules on the runs' PYTHONPATH (mods/), and a JSONL prompt set (prompts/) of arithmetic
    records as `hrm-mega prep corpus --format jsonl` writes them."""
    from hrm_mega.prep.cli import main as prep_main

    root = tmp_path_factory.mktemp("rl")
    (root / "mods/mypkg").mkdir(parents=True)
    (root / "mods/rl_test_rewards.py").write_text(REWARDS_MODULE)
    (root / "mods/mypkg/__init__.py").write_text("")
    (root / "mods/mypkg/rewards.py").write_text(USER_REWARDS)
    argv = ["corpus", "--out", str(root / "prompts"), "--docs", "64", "--test-docs", "8", "--format", "jsonl"]
    assert prep_main([*argv, "--tasks", "add,sub", "--max-digits", "2"]) == 0
    return root


def jsonl_prompts(workdir: Path) -> list[str]:
    p = workdir / "prompts"
    return [
        "rl.prompts=jsonl",
        f"rl.prompt_file={p / 'train.jsonl'}",
        f"rl.eval_prompt_file={p / 'test.jsonl'}",
    ]


@pytest.fixture(scope="module")
def puzzle_init(workdir: Path, tiny_sudoku: Path) -> tuple[Path, Path]:
    """(dataset, model directory of a freshly initialised tiny puzzle model)."""
    config = load_config(PUZZLE_RECIPE, [*TINY_PUZZLE, f"data.path={tiny_sudoku}"])
    model = build_model(config.model).init_weights(seed=1)
    return tiny_sudoku, save_model_dir(model.state_dict(), config, workdir / "puzzle_init")


@pytest.fixture(scope="module")
def lm_init(workdir: Path, tiny_text: Path) -> tuple[Path, Path]:
    config = load_config(LM_RECIPE, [*TINY_LM_RL, f"data.path={tiny_text}"])
    model = build_model(config.model).init_weights(seed=1)
    return tiny_text, save_model_dir(model.state_dict(), config, workdir / "lm_init")


def env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir / 'mods'}"}  # fmt: skip


def rl_cmd(
    recipe: Path, overrides: list[str], init: Path | None, nproc: int = 1, resume: str = "auto"
) -> list[str]:
    args = [str(recipe), *[f"--set={o}" for o in overrides], "--resume", resume]
    args += ["--init", str(init)] if init is not None else []
    return module_cmd("hrm_mega.entry.posttrain_rl", args, nproc)


def puzzle_cmd(run_dir: Path, init: tuple[Path, Path], *overrides: str, **kw) -> list[str]:
    data, model = init
    sets = [*TINY_PUZZLE, *COMMON, f"data.path={data}", f"log.out_dir={run_dir}", *overrides]
    return rl_cmd(PUZZLE_RECIPE, sets, model, **kw)


def lm_cmd(
    run_dir: Path, init: tuple[Path, Path], *overrides: str, recipe: Path = LM_RECIPE, **kw
) -> list[str]:
    data, model = init
    sets = [*TINY_LM_RL, *COMMON, f"data.path={data}", f"log.out_dir={run_dir}", *overrides]
    return rl_cmd(recipe, sets, model, **kw)


def run_ok(cmd: list[str], workdir: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env(workdir), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def steps(run_dir: Path) -> dict[int, dict]:
    """The training record of every step (the last one where a resumed run logged a step again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out


@pytest.mark.slow
def test_puzzle_grpo_run_logs_rewards_shaping_and_timing(workdir: Path, puzzle_init, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # the plain k3 penalty is the reported kl (k3_ratio's, k3 x pi/pi_old, differs from it at iteration 2)
    sets = ("train.steps=2", "rl.beta=0.1", "rl.iterations=2", "rl.kl_estimator=k3")
    out = run_ok(puzzle_cmd(run_dir, puzzle_init, *sets), workdir)
    records = steps(run_dir)
    assert sorted(records) == [1, 2]
    for r in records.values():
        # shaping: reward = cells_five - lambda * segments / halt_max_steps, on the means as on each row
        assert r["reward_mean"] == pytest.approx(
            r["reward/test_cells_five"] - 0.5 * r["mean_segments"] / 3, abs=1e-6
        )
        assert 1.0 <= r["mean_segments"] <= 3.0
        assert r["reward_std"] > 0 and r["entropy"] > 0 and r["kl"] >= 0
        # the first iteration is on-policy (ratio 1), so clipping can only come from the second
        assert 0.0 <= r["clip_frac"] <= 0.5 and r["ratio_mean"] != 1.0
        assert r["mismatch/logprob_diff_mean_abs"] < 1e-4  # rollout and training forward agree
        assert r["loss"] == pytest.approx(r["pg_loss"] + 0.1 * r["kl"], rel=1e-5, abs=1e-9)
        assert r["rollout_s"] > 0 and r["train_s"] > 0 and 0 < r["rollout_share"] < 1
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and {"eval_fixed/exact_accuracy", "eval_adaptive/mean_segments"} <= set(final)
    assert (run_dir / "checkpoints/step-00000002/universal").is_dir()


@pytest.mark.slow
def test_puzzle_grpo_raises_a_dense_reward(workdir: Path, puzzle_init, tmp_path: Path) -> None:
    """The update moves the policy the way the advantages point: the share of cells sampled as token 5
    (the test reward) climbs over a few steps. A flipped sign or a lost gradient makes it fall or drift."""
    run_dir = tmp_path / "learn"
    run_ok(
        puzzle_cmd(run_dir, puzzle_init, "train.steps=12", "rl.compute_cost_lambda=0", "optim.lr=1e-2"),
        workdir,
    )
    rewards = [r["reward_mean"] for _, r in sorted(steps(run_dir).items())]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards


@pytest.mark.slow
def test_lm_ppo_run_trains_the_value_head(workdir: Path, lm_init, tmp_path: Path) -> None:
    run_dir = tmp_path / "ppo"
    overrides = ("train.steps=2", "rl.iterations=2", "rl.value_coef=0.5")
    run_ok(lm_cmd(run_dir, lm_init, *overrides, recipe=ROOT / "configs/rl/ppo_arith_tiny.yaml"), workdir)
    records = steps(run_dir)
    assert sorted(records) == [1, 2]
    for r in records.values():
        assert r["loss"] == pytest.approx(r["pg_loss"] + 0.5 * r["value_loss"], rel=1e-5)
        assert r["value_loss"] > 0 and 0 <= r["value_clip_frac"] <= 1
        assert r["mean_cycles"] == pytest.approx(2.0)  # no early halting: every token runs h_cycles
        assert 1 <= r["completion_tokens"] <= 5
    assert records[2]["value_mean"] != 0.0  # the zero-initialised value head has moved
    evaluation = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/" in x]
    assert evaluation[-1]["eval/questions"] == 8
    per_op = [evaluation[-1].get(f"eval/exact_accuracy_{op}") for op in ("add", "sub", "mul")]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in per_op), evaluation[-1]


@pytest.mark.slow
def test_rl_errors_are_one_line(workdir: Path, puzzle_init, lm_init, tmp_path: Path) -> None:
    cases = [
        (puzzle_cmd(tmp_path / "a", puzzle_init, "rl.rewards={nope: 1}"), "unknown reward 'nope'"),
        (puzzle_cmd(tmp_path / "b", puzzle_init, "rl.algorithm=ppo"), "rl.algorithm=ppo needs a value head"),
        (lm_cmd(tmp_path / "c", lm_init, "rl.algorithm=ppo"), "rl.algorithm=ppo needs a value head"),
        (puzzle_cmd(tmp_path / "d", puzzle_init, "rl.reward_modules=[nope]"), "cannot import 'nope'"),
        (puzzle_cmd(tmp_path / "e", (puzzle_init[0], lm_init[1])), "holds a hrm_gemma model"),
        (puzzle_cmd(tmp_path / "f", puzzle_init, "rl.prompts_per_step=3"), "divide rl.prompts_per_step=3"),
        (lm_cmd(tmp_path / "h", lm_init, *jsonl_prompts(workdir), "rl.rewards={'mypkg.rewards:boom': 1}"),
         "reward 'mypkg.rewards:boom' raised KeyError: 'difficulty'"),
        (lm_cmd(tmp_path / "i", lm_init, "rl.prompts=jsonl"), "rl.prompts=jsonl needs rl.prompt_file"),
    ]  # fmt: skip
    for cmd, message in cases:
        out = subprocess.run(cmd, env=env(workdir), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 2, (message, out.stderr[-2000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("hrm-mega rl: error: ") and message in last, last
    no_init = [sys.executable, "-m", "hrm_mega.cli", "rl", str(LM_RECIPE), "--set", "train.init_from=",
               "--set", f"data.path={lm_init[0]}", "--set", f"log.out_dir={tmp_path / 'g'}"]  # fmt: skip
    out = subprocess.run(no_init, env=env(workdir), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "pass --init CKPT" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_puzzle_grpo_dp2_zero2_equals_dp1_with_micro_batches(
    workdir: Path, puzzle_init, tmp_path: Path
) -> None:
    common = ("train.steps=3", "rl.iterations=2", "rl.scale=batch")
    run_ok(puzzle_cmd(tmp_path / "dp1", puzzle_init, *common, "train.micro_batch=4"), workdir)
    run_ok(puzzle_cmd(tmp_path / "dp2", puzzle_init, *common, "parallel.zero_stage=2", nproc=2), workdir)
    one, two = steps(tmp_path / "dp1"), steps(tmp_path / "dp2")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    # The loss is a mean of per-action terms of order 1 that largely cancel (advantages are centred), so
    # fp32 rounding of the terms (~1e-7) shows as an absolute error; a wrong normaliser or a lost
    # micro-batch would change it by its own size (1e-3 .. 1e-1 here).
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step
        for key in ("reward_mean", "clip_frac", "entropy", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-8), (step, key)
    assert any(abs(r["loss"]) > 1e-6 for r in one.values())  # a real comparison, not of zeros


@pytest.mark.slow
def test_dropping_uniform_groups_rescales_the_update_and_keeps_dp2_equal_to_dp1(
    workdir: Path, puzzle_init, tmp_path: Path
) -> None:
    """rl.drop_uniform_groups leaves out the groups whose rewards are all equal (here the odd puzzles,
    which score 0). Their advantages are zero, so with dr_grpo (normaliser: trained rows x max_len) the
    first step's gradient is the full batch's divided by the trained fraction. At DP=2 with one group
    per micro-batch the ranks keep different numbers of groups, so one joins micro-batches with no rows."""
    common = ("train.steps=3", "rl.rewards={test_cells_five_even: 1.0}", "rl.compute_cost_lambda=0",
              "rl.aggregation=dr_grpo", "rl.iterations=2")  # fmt: skip
    run_ok(puzzle_cmd(tmp_path / "all", puzzle_init, *common, "train.micro_batch=4"), workdir)
    drop = (*common, "rl.drop_uniform_groups=true")
    run_ok(puzzle_cmd(tmp_path / "dp1", puzzle_init, *drop, "train.micro_batch=4"), workdir)
    run_ok(puzzle_cmd(tmp_path / "dp2", puzzle_init, *drop, "train.micro_batch=4", "parallel.zero_stage=2",
                      nproc=2), workdir)  # fmt: skip
    every, one, two = steps(tmp_path / "all"), steps(tmp_path / "dp1"), steps(tmp_path / "dp2")
    assert every[1]["trained_fraction"] == 1.0
    kept = one[1]["trained_fraction"]
    assert 0 < kept < 1, kept
    assert one[1]["reward_mean"] == every[1]["reward_mean"]  # the same rollouts
    assert one[1]["grad_norm"] * kept == pytest.approx(every[1]["grad_norm"], rel=1e-4)
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step
        for key in ("trained_fraction", "reward_mean", "clip_frac", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-8), (step, key)


DRAWN_HALTING = ("rl.halt_threshold=0.6", "rl.max_cycles=3", "rl.compute_cost_lambda=0.3")


@pytest.mark.slow
@pytest.mark.parametrize("halting", [(), DRAWN_HALTING], ids=["all-cycles", "drawn-halting"])
def test_lm_grpo_dp2_equals_dp1(workdir: Path, lm_init, tmp_path: Path, halting: tuple[str, ...]) -> None:
    """Also the users' path: a JSONL prompt set and a reward named as module:function (which reads the
    records' other fields as metadata). With drawn halting (rl.halting=sample, the default, and a
    halt_threshold) the halting decisions are keyed draws too, and the policy forward replays them: its
    log-probs equal the sampler's."""
    common = ("train.steps=3", "rl.iterations=2", "rl.beta=0.05", "rl.aggregation=seq_mean_token_mean",
              *jsonl_prompts(workdir), "rl.rewards={test_length: 1.0, 'mypkg.rewards:exact': 1.0}",
              *halting)  # fmt: skip
    run_ok(lm_cmd(tmp_path / "dp1", lm_init, *common), workdir)
    run_ok(lm_cmd(tmp_path / "dp2", lm_init, *common, nproc=2), workdir)
    one, two = steps(tmp_path / "dp1"), steps(tmp_path / "dp2")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step]["reward_mean"] == pytest.approx(one[step]["reward_mean"], rel=1e-9), (
            step
        )  # same samples
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step  # see above
        for key in ("kl", "entropy", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-8), (step, key)
    assert any(abs(r["loss"]) > 1e-6 for r in one.values())
    assert "reward/mypkg.rewards:exact" in one[1]
    if halting:
        assert all(r["mismatch/logprob_diff_mean_abs"] < 1e-5 for r in one.values())
        assert all(1.0 < r["mean_cycles"] < 3.0 for r in one.values())  # drawn, not all 3 cycles
    final = [
        json.loads(x) for x in (tmp_path / "dp1/metrics.jsonl").read_text().splitlines() if "eval/" in x
    ][-1]
    assert final["eval/questions"] == 8 and 0.0 <= final["eval/exact_accuracy"] <= 1.0


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(workdir: Path, puzzle_init, tmp_path: Path) -> None:
    common = ("train.steps=8", "train.checkpoint_interval=2", "rl.beta=0.05")
    run_ok(puzzle_cmd(tmp_path / "ref", puzzle_init, *common), workdir)

    run_dir = tmp_path / "killed"
    # step 5 lies between the checkpoints of steps 4 and 6: the resume redoes it
    sigkill_after_step(puzzle_cmd(run_dir, puzzle_init, *common), run_dir, 5, steps, env(workdir), ROOT)
    assert max(steps(run_dir)) < 8, "the run finished before it could be killed"

    resumed = run_ok(puzzle_cmd(run_dir, puzzle_init, *common), workdir)
    assert "resumed from" in resumed.stdout + resumed.stderr
    reference, again = steps(tmp_path / "ref"), steps(run_dir)
    assert sorted(again) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert again[step]["loss"] == reference[step]["loss"], step
        assert again[step]["reward_mean"] == reference[step]["reward_mean"], step


@pytest.mark.slow
def test_rl_demo_builds_pretrains_post_trains_and_then_reuses(tmp_path: Path) -> None:
    """`make demo-rl` end to end at toy lengths: data, pretraining, GRPO, the report; a second run reuses
    the dataset and the pretrained model."""
    cmd = [sys.executable, "-m", "hrm_mega.entry.rl_demo", "--data", str(tmp_path / "data"),
           "--pretrain-out", str(tmp_path / "pre"), "--out", str(tmp_path / "rl"),
           "--pretrain-set", "train.steps=3", "--pretrain-set", "log.wandb=disabled",
           "--set", "train.steps=2", "--set", "rl.eval_prompts=8", "--set", "log.wandb=disabled"]  # fmt: skip
    first = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining hrmgemma_arith_tiny.yaml for 3 steps" in first.stdout
    report = json.loads((tmp_path / "rl/demo_results.json").read_text())
    assert report["before"]["eval/questions"] == report["after"]["eval/questions"] == 8
    assert "change in exact accuracy" in first.stdout
    again = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the pretrained model" in again.stdout and "hrm_mega.prep corpus" not in again.stdout
