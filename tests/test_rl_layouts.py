"""RL at every layout (issue 21): GRPO and PPO (value head) with tensor and pipeline parallelism, ZeRO-1
and ZeRO-3 agree with one process: the same rollouts, and per-step loss, KL (rl.beta > 0, so the
reference model takes part) and gradient norm within 1e-4 relative (1e-6 absolute) over 5 steps; a run
SIGKILLed at tp2 x pp2 resumes exactly; a ZeRO-3 checkpoint resumes in one process.

The runs (torchrun, gloo, fp32; TINY_LM_RL's HRMGemma with two CycleBlocks and two kv heads, so that it
splits into 2 stages and 2 TP ranks) are launched once per module and shared by the tests:

    grpo_single, ppo_single        the one-process references
    grpo_tp2_pp2        4 ranks    the pipeline schedule's update (TP inside the stages), no old forward
    grpo_pp2_dp2_zero1  4 ranks    the same with two replicas and ZeRO-1
    grpo_dp2_zero3      2 ranks    the engine's update under ZeRO-3, rollouts on the gathered copy
    ppo_tp2_pp2         4 ranks    the value head on the last stage; SIGKILLed (all ranks) once step 4 is
                                   logged, at a random moment of step 5, then resumed from step 3
    ppo_pp2_dp2_zero1   4 ranks    the same with two replicas and ZeRO-1
    ppo_dp2_zero3       2 ranks    old, reference and values on the copy, the update through ZeRO-3
    ppo_zero3_to_1      1 rank     ppo_dp2_zero3's step-3 checkpoint, resumed in one process

About 4 minutes on two cores, most of it the ranks' start-up (importing DeepSpeed and megatron-core)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import sigkill_after_step
from test_rl_training import LM_RECIPE, REWARDS_MODULE, TINY_LM_RL, env, lm_cmd, run_ok, steps

from hrm_mega.checkpoint.model_dir import save_model_dir
from hrm_mega.config import load_config
from hrm_mega.models import build_model
from hrm_mega.rl.rollout import LMRollout, lm_policy, lm_policy_inputs

ROOT = Path(__file__).resolve().parents[1]
PPO_RECIPE = ROOT / "configs/rl/ppo_arith_tiny.yaml"
REL, ABS = 1e-4, 1e-6  # the acceptance tolerance (the loss is near 0 where advantages cancel)
TWO_BLOCKS = ("model.num_layers=8", "model.num_kv_heads=2")
COMMON = (*TWO_BLOCKS, "train.steps=5", "train.checkpoint_interval=3", "rl.beta=0.05", "rl.log_rollouts=1")
ALGORITHMS = {"grpo": (LM_RECIPE, ()), "ppo": (PPO_RECIPE, ("rl.iterations=2", "rl.value_coef=0.5"))}
LAYOUTS = {
    f"{algorithm}_{name}": layout
    for algorithm in ALGORITHMS
    for name, layout in {
        "tp2_pp2": (4, ("parallel.tp=2", "parallel.pp=2")),
        "pp2_dp2_zero1": (4, ("parallel.pp=2", "parallel.zero_stage=1")),
        "dp2_zero3": (2, ("parallel.zero_stage=3",)),
    }.items()
}
KILLED_AFTER = 4  # ppo_tp2_pp2: the resume (from the step-3 checkpoint) runs step 4 again


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl_layouts")
    (root / "mods").mkdir()
    (root / "mods/rl_test_rewards.py").write_text(REWARDS_MODULE)
    return root


@pytest.fixture(scope="module")
def two_block_init(workdir: Path, tiny_text: Path) -> tuple[Path, Path]:
    """(dataset, model directory of a freshly initialised HRMGemma with two CycleBlocks)."""
    config = load_config(LM_RECIPE, [*TINY_LM_RL, *TWO_BLOCKS, f"data.path={tiny_text}"])
    model = build_model(config.model).init_weights(seed=1)
    return tiny_text, save_model_dir(model.state_dict(), config, workdir / "init")


@pytest.fixture(scope="module")
def runs(workdir: Path, two_block_init):
    """Launches a run of the module docstring's table once and returns its run directory."""
    done: dict[str, Path] = {}

    def command(name: str, nproc: int, *overrides: str, **kw) -> list[str]:
        recipe, algorithm = ALGORITHMS[name.split("_")[0]]
        sets = (*COMMON, *algorithm, *overrides)
        return lm_cmd(workdir / name, two_block_init, *sets, recipe=recipe, nproc=nproc, **kw)

    def run(name: str) -> Path:
        if name in done:
            return done[name]
        run_dir = workdir / name
        if name.endswith("_single"):
            run_ok(command(name, 1), workdir)
        elif name == "ppo_zero3_to_1":
            origin = run("ppo_dp2_zero3") / "checkpoints/step-00000003"
            out = run_ok(command(name, 1, resume=str(origin)), workdir)
            assert f"resumed from {origin} at step 3" in out.stdout
        elif name == "ppo_tp2_pp2":
            nproc, layout = LAYOUTS[name]
            cmd = command(name, nproc, *layout)
            sigkill_after_step(cmd, run_dir, KILLED_AFTER, steps, env(workdir), ROOT)
            assert max(steps(run_dir)) < 5, "the run finished before it could be killed"
            shutil.copy(run_dir / "metrics.jsonl", run_dir / "metrics.killed.jsonl")
            out = run_ok(cmd, workdir)
            assert "resumed from" in out.stdout and "at step 3" in out.stdout
        else:
            nproc, layout = LAYOUTS[name]
            run_ok(command(name, nproc, *layout), workdir)
        done[name] = run_dir
        return run_dir

    return run


def rollouts(run_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(step, row over the whole step) -> the completion's token ids, from rollouts.jsonl."""
    lines = (run_dir / "rollouts.jsonl").read_text().splitlines()
    return {(r["step"], r["row"]): r["completion_ids"] for r in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_rl_layouts_agree_with_one_process(runs, name: str) -> None:
    single, other = steps(runs(f"{name.split('_')[0]}_single")), steps(runs(name))
    assert sorted(single) == sorted(other) == [1, 2, 3, 4, 5]
    keys = ["loss", "kl", "grad_norm"] + (["value_loss"] if name.startswith("ppo") else [])
    worst = dict.fromkeys(keys, 0.0)
    for step in single:
        assert other[step]["reward_mean"] == single[step]["reward_mean"], step  # the same rollouts
        for key in keys:
            x, y = single[step][key], other[step][key]
            assert abs(x - y) <= max(REL * abs(x), ABS), (name, step, key, x, y)
            worst[key] = max(worst[key], abs(x - y) / max(abs(x), ABS))
    print(f"{name}: largest relative difference (1e-6 floor) over 5 steps: {worst}")
    assert any(abs(r["loss"]) > 1e-3 for r in single.values())  # a real comparison, not of zeros


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_rl_layouts_roll_out_what_one_process_does(runs, name: str) -> None:
    """Every sample of every step: the same token ids (a rollout copy's tensor-parallel logits differ
    from one process's in rounding only, too little to move a draw across a token boundary here)."""
    single, other = rollouts(runs(f"{name.split('_')[0]}_single")), rollouts(runs(name))
    assert len(single) == 5 * 12 and single.keys() == other.keys()
    flipped = [key for key in single if single[key] != other[key]]
    assert not flipped, f"{name}: samples (step, row) that differ from one process's: {flipped}"


@pytest.mark.slow
def test_sigkill_at_tp2_pp2_then_resume_repeats_the_steps_exactly(runs) -> None:
    run_dir = runs("ppo_tp2_pp2")
    killed = [json.loads(x) for x in (run_dir / "metrics.killed.jsonl").read_text().splitlines()]
    before, after = {r["step"]: r for r in killed if "loss" in r}, steps(run_dir)
    assert KILLED_AFTER in before and sorted(after) == [1, 2, 3, 4, 5]
    for step in sorted(before):  # steps 1-3 kept from before the kill, 4 run again (5 was cut short)
        for key in ("loss", "kl", "value_loss", "grad_norm", "reward_mean", "entropy"):
            assert after[step][key] == before[step][key], (step, key)


@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_in_one_process(runs) -> None:
    origin, resumed = steps(runs("ppo_dp2_zero3")), steps(runs("ppo_zero3_to_1"))
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        for key in ("loss", "kl", "value_loss", "grad_norm"):
            x, y = origin[step][key], resumed[step][key]
            assert abs(x - y) <= max(REL * abs(x), ABS), (step, key, x, y)
        assert resumed[step]["reward_mean"] == origin[step]["reward_mean"]


# --- in process ----------------------------------------------------------------------------------


def test_rl_at_pipeline_and_zero3_layouts_passes_the_config_checks() -> None:
    for sets, world in ((["parallel.tp=2", "parallel.pp=2"], 4), (["parallel.zero_stage=3"], 2),
                        (["parallel.pp=2", "parallel.zero_stage=1", "rl.drop_uniform_groups=true"], 4)):  # fmt: skip
        config = load_config(LM_RECIPE, ["data.path=/nonexistent", *sets], world_size=world, command="rl")
        assert config.validate(world, "rl") is config


def test_the_policy_forward_masks_padding_by_documents_as_the_attention_mask_did() -> None:
    """lm_policy_inputs marks a row's real tokens as one document (what pipeline stages pass along): the
    logits of the real tokens equal the forward's with an attention mask over the padding."""
    import torch

    config = load_config(LM_RECIPE, [*TINY_LM_RL, "data.path=/nonexistent"])
    model = build_model(config.model).init_weights(seed=2).eval()
    rollout = LMRollout(
        prompt_ids=torch.tensor([[0, 0, 2, 40, 41], [2, 50, 51, 52, 53]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        completion_ids=torch.tensor([[7, 8, 1, 0], [9, 1, 0, 0]]),
        completion_mask=torch.tensor([[True, True, True, False], [True, True, False, False]]),
        logprobs=torch.zeros(2, 4), cycles=torch.zeros(2, 4, 1, dtype=torch.long),
        finished=torch.tensor([True, True]), group_size=1, temperature=1.0, vocab_limit=None,
    )  # fmt: skip
    ids, positions, doc_ids = lm_policy_inputs(rollout)
    assert doc_ids.tolist() == [[1, 1, 2, 2, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 1, 2, 2]]
    mask = torch.cat((rollout.prompt_mask, rollout.completion_mask.long()), dim=1)
    with torch.no_grad():
        by_docs, _ = model(ids, position_ids=positions, doc_ids=doc_ids)
        by_mask, _ = model(ids, position_ids=positions, attention_mask=mask)
        policy = lm_policy(model, rollout)
    real = mask.bool()
    # per-document attention (the default) and the masked SDPA sum in other orders: kernel rounding only
    # (1.8e-6 at most on logits up to 3.9: a few ulps; 1e-5 as the other attention equalities)
    torch.testing.assert_close(by_docs[real], by_mask[real], rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(by_mask[:, 4:8], dim=-1)  # position P-1+t predicts new token t
    expected = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(policy.logprobs, torch.where(rollout.completion_mask, expected, 0.0))
