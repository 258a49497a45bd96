"""Config loading: YAML inheritance, overrides with type coercion, unknown keys, cross-field validation."""

import re
from pathlib import Path

import pytest
import yaml

from hrm_mega.cli import main as cli_main
from hrm_mega.config import ConfigError, load_config, save_resolved

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "puzzle").glob("*.yaml"))


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_and_overrides(tmp_path):
    base = write(
        tmp_path, "base.yaml", {"model": {"hidden_size": 64, "num_heads": 4}, "train": {"steps": 10}}
    )
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "model": {"num_heads": 2}})
    cfg = load_config(
        child, ["train.steps=25", "optim.lr=3e-4", "data.augment=true", "train.eval_modes=fixed"]
    )
    assert cfg.model.hidden_size == 64 and cfg.model.num_heads == 2  # child overrides base, keeps the rest
    assert cfg.train.steps == 25 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.augment is True
    assert cfg.train.eval_modes == ["fixed"]
    assert base.exists()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/puzzle/trm_sudoku.yaml", ["train.seed=7"])
    path = save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.model.shared_net and again.model.grad_mode == "last_cycle" and again.train.seed == 7


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.model.family == "puzzle"


BAD = [
    (["model.num_heads=6"], "model.num_heads=6 does not divide model.hidden_size=512"),
    (["model.hiden_size=256"], "unknown config key model.hiden_size; did you mean model.hidden_size?"),
    (["trian.steps=5"], "unknown config key trian; did you mean train?"),
    (["model.grad_mode=two_step"], "model.grad_mode='two_step' must be one of"),
    (["train.steps=ten"], "train.steps='ten' must be an integer"),
    (["train.steps=2.5"], "train.steps=2.5 must be an integer"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["optim.beta2=1.0"], "optim.beta2=1.0 must be in [0, 1)"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 must be one of 0, 1, 2, 3"),
    (["parallel.pp=2"], "parallel.pp=2 is not supported for model.family=puzzle"),
    (["model.halt_exploration_prob=1.5"], "model.halt_exploration_prob=1.5 must be in [0, 1]"),
    (["train.micro_batch=100"], "train.micro_batch=100 does not divide train.global_batch=768"),
    (["data.partitions=5"], "data.partitions=5 does not divide train.global_batch=768"),
    (["model.family=vision"], "model.family='vision' is unknown"),
    (["model.puzzle_emb_ndim=2048", "model.puzzle_emb_len=2"], "model.puzzle_emb_ndim=2048 does not fit"),
    (["train.eval_modes=fixed,sometimes"], "train.eval_modes has 'sometimes'"),
    (["data.augment=maybe"], "data.augment='maybe' must be true or false"),
    (
        ["model.shared_net=false", "model.h_layers=0"],
        "model.h_layers must be >= 1 unless model.shared_net=true",
    ),
    (
        ["parallel.deepspeed.zero_optimization.stage=3"],
        "parallel.deepspeed.zero_optimization.stage is derived from parallel.zero_stage; set that instead",
    ),
    (
        ["parallel.deepspeed.train_batch_size=64"],
        "parallel.deepspeed.train_batch_size is derived from train.global_batch; set that instead",
    ),
    (
        ["parallel.deepspeed.gradient_clipping=0"],
        "parallel.deepspeed.gradient_clipping is derived from optim.grad_clip; set that instead",
    ),
    (["parallel.deepspeed.bf16={enabled: true}"], "parallel.deepspeed.bf16 is derived from train.precision"),
    (["parallel.deepspeed=5"], "parallel.deepspeed must be a mapping of DeepSpeed config keys, got 5"),
    (["trainsteps"], "expected KEY=VALUE"),
    (["train.eval_modes=[fixed,*]"], "--set 'train.eval_modes=[fixed,*]': the value is not valid YAML"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_configs_give_one_line_errors_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/puzzle/hrm_sudoku.yaml", overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_pipeline_parallel_with_zero2_is_rejected():
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 cannot combine with parallel.pp=2"):
        load_config(None, ["parallel.pp=2", "parallel.zero_stage=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    loop = write(tmp_path, "loop.yaml", {"base": "loop.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(loop)


def test_info_reports_the_official_hrm_parameter_count(capsys):
    assert cli_main(["info", str(ROOT / "configs/puzzle/hrm_sudoku.yaml")]) == 0
    out = capsys.readouterr().out
    assert "parameters (excluding the puzzle-embedding table): 27,275,266" in out
    assert "FLOPs per sample per segment" in out and "memory per rank" in out


def test_info_error_is_one_line_on_stderr(capsys):
    code = cli_main(["info", str(ROOT / "configs/puzzle/hrm_sudoku.yaml"), "--set", "model.num_heads=7"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "model.num_heads=7" in err


def test_info_on_an_lm_recipe_reports_gemma_counts(capsys):
    assert cli_main(["info", str(ROOT / "configs/lm/hrmgemma_1b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Gemma 3: 999,885,952" in out  # transformers' Gemma3ForCausalLM count for the 1B shape
    # memory per GPU: bf16 weights and grads (2 bytes each) and 12 bytes of optimizer state per parameter,
    # the optimizer split over dp = 4 by ZeRO-1
    assert (
        cli_main(
            [
                "info",
                "hrmgemma_1b",
                "--world-size",
                "4",
                "--set",
                "parallel.zero_stage=1",
                "--seq-len",
                "1024",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    params = int(re.search(r"parameters: ([\d,]+)", out)[1].replace(",", ""))
    line = re.search(
        r"stage 0: ([\d.]+) GiB = weights ([\d.]+)  grads ([\d.]+)  optimizer ([\d.]+)  activations ~([\d.]+)",
        out,
    )
    assert line, out
    total, weights, grads, optimizer, activations = map(float, line.groups())
    assert weights == grads == round(params * 2 / 2**30, 3)
    assert optimizer == round(params * 12 / 4 / 2**30, 3)
    assert activations > 0 and total == pytest.approx(weights + grads + optimizer + activations, abs=0.01)
    assert "seq 1024 x micro-batch" in out


def test_the_model_section_has_the_type_of_its_family():
    import hrm_mega.config as config_module
    from hrm_mega.config import LMModelConfig, PuzzleModelConfig

    assert type(load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml").model) is PuzzleModelConfig
    lm = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml").model
    assert type(lm) is LMModelConfig and lm.value_head is False  # no getattr(..., default) needed
    assert not hasattr(config_module, "ModelConfig")  # the alias that typed every LM config as a puzzle one
    with pytest.raises(ConfigError, match="unknown config key model.value_head"):
        load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", ["model.value_head=true"])
    with pytest.raises(ConfigError, match="model.family='gemma' is unknown; did you mean hrm_gemma"):
        load_config(None, ["model.family=gemma"])


# The optimizer settings of the official trainers. Both pretrain.py files (sapientinc/HRM and
# SamsungSAILMontreal/TinyRecursiveModels) build `adam_atan2.AdamATan2(lr, weight_decay, betas=(beta1,
# beta2))` from the adam-atan2 package (no update scale: our adam_atan2_scale=1), step it right after
# backward and the gradient all-reduce with no clip_grad_norm_ (grad_clip 0), and set the lr from
# cosine_schedule_with_warmup_lr_lambda. Defaults from config/cfg_pretrain.yaml (both repositories, the
# ARC recipe): global_batch_size 768, lr 1e-4, lr_min_ratio 1.0, lr_warmup_steps 2000, beta1 0.9,
# beta2 0.95, weight_decay 0.1, puzzle_emb_lr 1e-2, puzzle_emb_weight_decay 0.1, EMA off (TRM: ema_rate
# 0.999 when ema=True).
OFFICIAL_DEFAULTS = dict(
    name="adam_atan2", adam_atan2_scale=1.0, grad_clip=0.0, lr=1e-4, lr_min_ratio=1.0, warmup_steps=2000,
    beta1=0.9, beta2=0.95, weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, ema_decay=0.0,
)  # fmt: skip
# The Sudoku-Extreme and Maze-Hard commands of HRM's README and TRM's README override
# "lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0"; TRM's add "ema=True".
SUDOKU_MAZE = dict(lr=1e-4, puzzle_emb_lr=1e-4, weight_decay=1.0, puzzle_emb_weight_decay=1.0)
OFFICIAL_OPTIM = {
    "hrm_sudoku": OFFICIAL_DEFAULTS | SUDOKU_MAZE,  # HRM README, "Sudoku Extreme (1k)"
    "hrm_maze": OFFICIAL_DEFAULTS | SUDOKU_MAZE,  # HRM README, "Maze 30x30 Hard (1k)"
    "hrm_arc": OFFICIAL_DEFAULTS,  # HRM README, "ARC-1": pretrain.py with cfg_pretrain.yaml as it is
    "trm_sudoku": OFFICIAL_DEFAULTS | SUDOKU_MAZE | {"ema_decay": 0.999},  # TRM README, "Sudoku-Extreme"
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_OPTIM))
def test_paper_recipes_use_the_official_optimizer_and_no_clipping(name):
    import torch

    from hrm_mega.training.engine import World, deepspeed_config

    cfg = load_config(ROOT / f"configs/puzzle/{name}.yaml")
    got = {key: getattr(cfg.optim, key) for key in OFFICIAL_OPTIM[name]}
    assert got == OFFICIAL_OPTIM[name]
    assert cfg.train.global_batch == 768  # global_batch_size in every official command
    # What DeepSpeed is told: 0 turns its clipping off.
    world = World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    assert deepspeed_config(cfg, world, cfg.train.global_batch)["gradient_clipping"] == 0.0


def test_adam_atan2_scale_is_checked():
    with pytest.raises(ConfigError, match=r"optim.adam_atan2_scale=0.0 must be > 0"):
        load_config(ROOT / "configs/puzzle/hrm_sudoku.yaml", ["optim.adam_atan2_scale=0"])
    with pytest.raises(ConfigError, match="applies only to optim.name=adam_atan2, not adamw"):
        load_config(
            ROOT / "configs/puzzle/hrm_sudoku.yaml", ["optim.name=adamw", "optim.adam_atan2_scale=1.27"]
        )


def test_the_deepspeed_pass_through_merges_into_the_generated_config():
    from hrm_mega.config.run import deep_merge

    generated = {"steps_per_print": 2**31 - 1, "zero_optimization": {"stage": 2, "reduce_bucket_size": 9}}
    extra = {"steps_per_print": 50, "zero_optimization": {"overlap_comm": True}, "flops_profiler": {}}
    assert deep_merge(generated, extra) == {
        "steps_per_print": 50,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 9, "overlap_comm": True},
        "flops_profiler": {},
    }
    assert generated["steps_per_print"] == 2**31 - 1  # the generated config itself is not changed
    config = load_config(None, ["parallel.deepspeed.zero_optimization.overlap_comm=true"])
    assert config.parallel.deepspeed == {"zero_optimization": {"overlap_comm": True}}


def test_a_shipped_recipe_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not next to configs/: the name alone finds it
    by_path = load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml").to_dict()
    for name in (
        "hrm_sudoku_tiny",
        "hrm_sudoku_tiny.yaml",
        "puzzle/hrm_sudoku_tiny",
        "configs/puzzle/hrm_sudoku_tiny.yaml",
    ):
        assert load_config(name).to_dict() == by_path, name
    with pytest.raises(
        ConfigError, match=r"^config file sudoku does not exist, and no shipped recipe has that name"
    ):
        load_config("sudoku")


def test_the_config_command_prints_the_resolved_config_and_lists_recipes(capsys):
    from importlib.metadata import version

    from hrm_mega.cli import main as cli_main
    from hrm_mega.config import config_from_dict

    assert (
        cli_main(["config", "hrm_sudoku_tiny", "--set", "train.steps=3", "--set", "log.tensorboard=true"])
        == 0
    )
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    expected = load_config(
        ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", ["train.steps=3", "log.tensorboard=true"]
    )
    assert printed == expected
    assert cli_main(["config", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "puzzle/hrm_sudoku_tiny" in names and "lm/hrmgemma_tiny" in names
    assert len(names) == len(list((ROOT / "configs").rglob("*.yaml")))
    assert cli_main(["config", "hrm_sudoku_tiny", "--world-size", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"hrm-mega {version('hrm-mega')}\n"


def test_the_field_reference_in_docs_is_current():
    from hrm_mega.config.reference import field_reference, with_reference

    document = (ROOT / "docs/configs.md").read_text()
    assert with_reference(document) == document, (
        "docs/configs.md is out of date: python -m hrm_mega.config.reference --write docs/configs.md"
    )
    reference = field_reference()
    assert "| `deepspeed` | dict[str, Any] | `{}` | Merged into the generated DeepSpeed config" in reference
    assert "| `tensorboard` | bool | `false` |" in reference


def test_changed_fields_lists_every_difference_by_its_dotted_name():
    from hrm_mega.config.run import changed_fields

    old = load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml").to_dict()
    new = load_config(
        ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml",
        ["optim.lr=0.5", "data.path=elsewhere", "parallel.deepspeed.steps_per_print=3"],
    ).to_dict()
    assert changed_fields(old, new) == [
        ("parallel.deepspeed", {}, {"steps_per_print": 3}),
        ("data.path", old["data"]["path"], "elsewhere"),
        ("optim.lr", old["optim"]["lr"], 0.5),
    ]
    assert changed_fields(old, old) == []
    assert changed_fields({"a": {"x": 1}}, {"a": {}}) == [("a.x", 1, None)]
