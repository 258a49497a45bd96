"""The config is the contract, validated once (issue 15): every check that needs only the config (plus
data.path's manifest.json and the world size) refuses a bad config in `load_config`, and `hrm-mega
train | rl | info | launch --dry-run` print that one line and exit 2 before importing DeepSpeed or
megatron-core and before starting torchrun.

Each case runs `python -X importtime -m hrm_mega.cli ...` as a real subprocess (they exit early: about a
second each) and reads the import log from stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VISION

from hrm_mega.config import BUILTIN_REWARDS, ConfigError, load_config, read_config, save_resolved
from hrm_mega.data.shards import ShardWriter, write_manifest

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml"
LM = ROOT / "configs/lm/hrmgemma_tiny.yaml"
RL_PUZZLE = ROOT / "configs/rl/grpo_sudoku_tiny.yaml"
RL_LM = ROOT / "configs/rl/grpo_arith_tiny.yaml"
TEXT_SEQ_LEN = 32


def write_dataset(out: Path, task: str, vocab_size: int, seq_len: int, shards: int) -> Path:
    """A small dataset in the on-disk format: `shards` train shards of 4 random rows, 1 test shard."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4 * shards), ("test", 4)):
        writer = ShardWriter(out / split, samples_per_shard=4)
        for i in range(n):
            labels = rng.integers(1, vocab_size, seq_len).astype(np.int32)
            writer.write({"inputs": labels, "labels": labels, "meta": {"puzzle_id": 0, "group_id": i}})
        splits[split] = writer.close()
    write_manifest(
        out, task=task, builder_version="test", seed=0, command="test", vocab_size=vocab_size,
        seq_len=seq_len, num_puzzle_identifiers=1, splits=splits,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Shared by every case: a sudoku-shaped dataset with 8 train shards and a text one with a tokenizer
    file (only the manifest and the file's presence are read: the runs stop at the config)."""
    root = tmp_path_factory.mktemp("config_errors")
    text = write_dataset(root / "text", "text", 320, TEXT_SEQ_LEN, shards=2)
    (text / "tokenizer.model").write_bytes(b"")
    teachers = {}  # model directories of which the checks read config.yaml only
    for name, sets in (("vocab", ["model.vocab_size=256"]), ("heads", ["model.num_kv_heads=1"])):
        teachers[name] = root / f"teacher_{name}"
        teachers[name].mkdir()
        save_resolved(load_config(LM, sets), teachers[name] / "config.yaml")
        (teachers[name] / "model.safetensors").write_bytes(b"")
    sudoku = write_dataset(root / "sudoku", "sudoku", 11, 81, shards=8)
    return {
        "sudoku": sudoku,
        "text": text,
        "teacher_vocab": teachers["vocab"],
        "teacher_heads": teachers["heads"],
    }


def cli(data: dict[str, Path], command: str, recipe: Path, *sets: str, nproc: int = 1, extra=()) -> list[str]:
    data_path = data["text"] if recipe in (LM, RL_LM) else data["sudoku"]
    args = [command, str(recipe), "--set", f"data.path={data_path}", "--set", "log.out_dir=/nonexistent/run"]
    for s in sets:
        args += ["--set", s]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    return [sys.executable, "-X", "importtime", "-m", "hrm_mega.cli", *args, *extra]


# (id, command, recipe, overrides, nproc, what the one line must contain). Every case but the first
# two was, before issue 15, refused only after DeepSpeed had started (or by torchrun's ranks).
CASES = [
    ("num_heads", "train", PUZZLE, ["model.num_heads=7"], 1, "model.num_heads=7 does not divide"),
    ("num_heads_nproc2", "train", PUZZLE, ["model.num_heads=7"], 2, "model.num_heads=7 does not divide"),
    ("rl_vision_pp", "rl", RL_LM, [*TINY_VISION, "parallel.pp=2"], 2,
     "is not available with parallel.pp > 1"),  # RL's own refusal, or (before it) any vision model's
    ("distill_missing", "train", LM, ["train.distill_weight=1", "train.distill_from=/nonexistent/x"], 1,
     "train.distill_from=/nonexistent/x: no teacher there"),
    ("distill_vocab", "train", LM, ["train.distill_weight=1", "train.distill_from=TEACHER_VOCAB"], 1,
     "the teacher must be an hrm_gemma model with the student's vocab_size 512"),
    ("distill_tp", "train", LM, ["train.distill_weight=1", "train.distill_from=TEACHER_HEADS", "parallel.tp=2"], 2,
     "the teacher's model.num_kv_heads=1 is not divisible by parallel.tp=2"),
    ("partitions_samples", "train", PUZZLE, ["data.partitions=64"], 1, "data.partitions=64 exceeds the 32 samples"),
    ("ema_zero3", "train", PUZZLE, ["optim.ema_decay=0.999", "parallel.zero_stage=3"], 1,
     "optim.ema_decay > 0 is not supported with parallel.zero_stage=3"),
    ("micro_per_rank", "train", PUZZLE, ["train.micro_batch=64"], 2,
     "train.micro_batch=64 does not divide the per-rank batch 32"),
    ("rl_prompts_dp", "rl", RL_PUZZLE, ["rl.prompts_per_step=3", "data.partitions=1"], 2,
     "rl.prompts_per_step=3 must be a multiple of the 2 data-parallel ranks"),
    ("rl_no_init", "rl", RL_PUZZLE, ["train.init_from="], 1, "pass --init CKPT"),
    ("rl_no_rewards", "rl", RL_PUZZLE, ["rl.rewards={}"], 1, "rl.rewards is empty"),
    ("rl_unknown_reward", "rl", RL_PUZZLE, ["rl.rewards={nope: 1}"], 1, "rl.rewards: unknown reward 'nope'"),
    ("ppo_no_value_head", "rl", RL_LM, ["rl.algorithm=ppo"], 1, "rl.algorithm=ppo needs a value head"),
    ("ppo_puzzle", "rl", RL_PUZZLE, ["rl.algorithm=ppo"], 1, "puzzle models lack"),
    ("rl_rows_micro", "rl", RL_PUZZLE, ["rl.prompts_per_step=8", "rl.group_size=3", "train.micro_batch=16"], 1,
     "train.micro_batch=16 does not divide the 24 rollouts"),
    ("pp_compile", "train", LM, ["parallel.pp=2", "train.compile=true"], 2,
     "train.compile is not available with parallel.pp > 1"),
    ("augment_text", "train", LM, ["data.augment=true"], 1, "data.augment=true does not apply to text data"),
    ("manifest_vocab", "train", PUZZLE, ["model.vocab_size=10"], 1, "model.vocab_size=10 is smaller than"),
    ("manifest_seq_len", "train", PUZZLE, ["model.seq_len=80"], 1, "model.seq_len=80 but"),
    ("manifest_task", "train", LM, ["data.path=SUDOKU"], 1, "train.task=lm needs a text dataset"),
    ("max_position", "train", LM, ["model.max_position=16"], 1, "model.max_position=16 is shorter"),
    ("kv_heads_tp", "train", LM, ["parallel.tp=2", "model.num_kv_heads=1"], 2,
     "model.num_kv_heads=1 is not divisible by parallel.tp=2"),
    ("groups_pp", "train", LM, ["parallel.pp=2", "model.num_layers=12"], 2,
     "parallel.pp=2 does not divide the model's 3 CycleBlocks"),
    ("partitions_dp", "train", PUZZLE, ["data.partitions=1"], 2,
     "data.partitions=1 must be a multiple of the 2 data-parallel ranks"),
    ("world_size", "train", PUZZLE, ["parallel.tp=2", "model.vocab_size=12"], 3,
     "world size 3 is not parallel.tp x parallel.pp x dp"),
]  # fmt: skip


def run_cli(cmd: list[str]) -> tuple[int, list[str], list[str]]:
    """(exit code, stderr lines other than the import log, modules imported)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = out.stderr.splitlines()
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    return out.returncode, [line for line in lines if not line.startswith("import time:")], imported


def assert_refused_early(cmd: list[str], command: str, message: str) -> None:
    code, errors, imported = run_cli(cmd)
    assert code == 2, errors
    assert len(errors) == 1, errors  # one line: not once per rank, no torchrun failure block
    assert errors[0].startswith(f"hrm-mega {command}: error: ") and message in errors[0], errors[0]
    heavy = [m for m in imported if m.split(".")[0] in ("deepspeed", "megatron")]
    assert not heavy, heavy[:5]
    assert "torch.distributed.run" not in imported


@pytest.mark.slow  # a process per case (each exits at the config check, ~1-2 s)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_a_bad_config_in_one_line_before_any_engine(data, case) -> None:
    _, command, recipe, sets, nproc, message = case
    for key in ("sudoku", "teacher_vocab", "teacher_heads"):
        sets = [s.replace(key.upper(), str(data[key])) for s in sets]
    extra = ("--init", "/nonexistent/ckpt") if command == "rl" and "train.init_from=" not in sets else ()
    assert_refused_early(cli(data, command, recipe, *sets, nproc=nproc, extra=extra), command, message)


@pytest.mark.slow
def test_info_and_launch_dry_run_refuse_a_bad_layout_the_same_way(data) -> None:
    sets = ["--set", "parallel.tp=2", "--set", "model.num_kv_heads=1"]
    message = "model.num_kv_heads=1 is not divisible by parallel.tp=2"
    info = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "hrm_mega.cli",
        "info",
        str(LM),
        *sets,
        "--world-size",
        "2",
    ]
    assert_refused_early(info, "info", message)
    launch = [sys.executable, "-X", "importtime", "-m", "hrm_mega.cli", "launch", "--dry-run",
              "--procs-per-node", "2", str(LM), *sets]  # fmt: skip
    assert_refused_early(launch, "launch", message)
    # launch knows the command from the entry module: RL's checks apply to posttrain_rl
    launch_rl = [sys.executable, "-X", "importtime", "-m", "hrm_mega.cli", "launch", "--dry-run",
                 "--entry", "hrm_mega.entry.posttrain_rl", str(RL_PUZZLE), "--set", "rl.rewards={}"]  # fmt: skip
    assert_refused_early(launch_rl, "launch", "rl.rewards is empty")


def test_every_recipe_passes_the_checks_of_its_command(tmp_path: Path) -> None:
    """No false refusals: the shipped recipes load for the command they are written for (their
    datasets are not built here, so the manifest checks are skipped; a JSONL prompt set is given)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    for recipe in sorted((ROOT / "configs").glob("*/*.yaml")):
        command = "rl" if recipe.parent.name == "rl" else "train"
        if read_config(recipe).data.sources:  # a mixture: its sources must exist (make demo-lm builds them)
            missing = ["data.sources=[{path: /nonexistent/text}]"]
            with pytest.raises(ConfigError, match=r"data.sources\[0\] .*: no manifest.json there"):
                load_config(recipe, missing, world_size=config_world(recipe), command=command)
            continue
        sets = ["data.path=/nonexistent/data"]  # some recipes leave it to the user
        if read_config(recipe).rl.prompts == "jsonl":  # its prompt files are the user's (or a bench's)
            sets += [f"rl.prompt_file={prompts}", f"rl.eval_prompt_file={prompts}"]
        config = load_config(recipe, sets, world_size=config_world(recipe), command=command)
        assert config.validate(command=command) is config


def config_world(recipe: Path) -> int:
    config = read_config(recipe)
    return config.parallel.tp * config.parallel.pp


def test_world_size_and_command_are_checked_only_when_given(data) -> None:
    sets = [f"data.path={data['sudoku']}", "train.micro_batch=64"]
    load_config(PUZZLE, sets)  # the per-rank batch is unknown without a world size
    with pytest.raises(ConfigError, match="does not divide the per-rank batch 32"):
        load_config(PUZZLE, sets, world_size=2)
    small = [f"data.path={data['sudoku']}", "model.vocab_size=10"]
    load_config(PUZZLE, small)  # e.g. a checkpoint's config, whose dataset may have changed since
    with pytest.raises(ConfigError, match="model.vocab_size=10 is smaller than"):
        load_config(PUZZLE, small, command="train")
    load_config(
        PUZZLE, ["data.path=/nonexistent"], command="train"
    )  # no manifest here: the data layer says so
    load_config(RL_PUZZLE, ["rl.rewards={}"], command="train")  # the rl section matters to `rl` only
    with pytest.raises(ConfigError, match="rl.rewards is empty"):
        load_config(RL_PUZZLE, ["rl.rewards={}"], command="rl")


def test_the_builtin_reward_names_are_the_registered_ones() -> None:
    from hrm_mega.rl.rewards import reward_names

    assert sorted(BUILTIN_REWARDS) == reward_names()


def test_importing_the_config_and_the_cli_imports_neither_deepspeed_nor_megatron() -> None:
    code = "import sys, hrm_mega.config, hrm_mega.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'deepspeed'" not in out.stdout and "'megatron'" not in out.stdout
