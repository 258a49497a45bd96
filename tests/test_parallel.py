"""3D parallelism end to end on gloo in fp32: tensor-parallel (megatron-core) and data-parallel (ZeRO)
runs agree with one process step by step, from the same initial weights and data; invalid layouts fail
with one line before any process-group work. Each run is a real subprocess under torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION
from safetensors.torch import load_file
from test_lm_training import lm_cmd
from test_training import env, train_cmd

from hrm_mega.config import ConfigError, load_config, pipeline_stage_blocks, resolve_layout

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4  # the acceptance tolerance on per-step loss and gradient norm
PUZZLE = ("model.vocab_size=12", "train.steps=5", "train.eval_max_samples=8")  # 12: divisible by tp=2
LM = ("model.num_layers=8", "model.num_kv_heads=2", "train.steps=5")  # two CycleBlocks, kv heads split


def run_ok(cmd: list[str], timeout: float = 600) -> str:
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def steps(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = (record["loss"], record["grad_norm"])
    return out


def assert_agree(reference: Path, other: Path) -> None:
    a, b = steps(reference), steps(other)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        for name, x, y in zip(("loss", "grad_norm"), a[step], b[step]):
            assert abs(x - y) <= max(REL * abs(x), 1e-6), (other.name, step, name, x, y)


@pytest.fixture(scope="module")
def puzzle_reference(tiny_sudoku: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("puzzle") / "single"
    run_ok(train_cmd(run_dir, tiny_sudoku, *PUZZLE))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,nproc,layout",
    [
        ("tp2", 2, ("parallel.tp=2",)),
        ("dp2_zero1_micro", 2, ("parallel.zero_stage=1", "train.micro_batch=2")),  # 2 micro-batches
        ("tp2_dp2_zero1", 4, ("parallel.tp=2", "parallel.zero_stage=1")),
    ],
)
def test_puzzle_layouts_agree_with_one_process(puzzle_reference, tiny_sudoku, tmp_path, name, nproc, layout):
    run_dir = tmp_path / name
    stdout = run_ok(train_cmd(run_dir, tiny_sudoku, *PUZZLE, *layout, nproc=nproc))
    tp = 2 if "parallel.tp=2" in layout else 1
    assert f"world {nproc} = tp {tp} x pp 1 x dp {nproc // tp}" in stdout
    assert_agree(puzzle_reference, run_dir)


def layout_runs(root: Path, data: Path, *common: str):
    """run(name, nproc, *layout) runs an HRMGemma layout on `data` once (checkpoints at steps 3 and 5)
    and returns its run dir."""
    done = {}

    def run(name: str, nproc: int = 1, *layout: str, resume: str = "none") -> Path:
        if name not in done:
            cmd = lm_cmd(
                root / name, data, *LM, "train.checkpoint_interval=3", *common, *layout, resume=resume
            )
            if nproc > 1:  # through `hrm-mega train --nproc N`, as a user would
                cmd = [sys.executable, "-m", "hrm_mega.cli", "train", *cmd[3:], "--nproc", str(nproc)]
            run_ok(cmd)
            done[name] = root / name
        return done[name]

    return run


@pytest.fixture(scope="module")
def lm_runs(tiny_text: Path, tmp_path_factory):
    """Runs an HRMGemma layout once per module and returns its run dir. Every run distils from one
    teacher (train.distill_*) of another depth (one CycleBlock) and seed, trained a step in one process:
    at every layout the distillation term and its gradient must agree with one process's as well."""
    root = tmp_path_factory.mktemp("lm")
    teacher = root / "teacher"
    run_ok(
        lm_cmd(
            teacher, tiny_text, "model.num_layers=4", "model.num_kv_heads=2", "train.steps=1", "train.seed=7"
        )
    )
    checkpoint = teacher / "checkpoints/step-00000001"
    distill = (
        "train.distill_weight=0.5",
        "train.distill_temperature=2.0",
        f"train.distill_from={checkpoint}",
    )
    return layout_runs(root, tiny_text, *distill)


def logged(run_dir: Path, key: str) -> list[float]:
    """Every logged value of `key` in metrics.jsonl, in order."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r[key] for r in records if key in r]


def eval_record(run_dir: Path) -> dict[str, float]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x][
        -1
    ]


LM_LAYOUTS = {
    "tp2": (2, "parallel.tp=2", "train.activation_checkpointing=true"),
    "pp2": (2, "parallel.pp=2"),
    "tp2_pp2": (4, "parallel.tp=2", "parallel.pp=2"),
    "pp2_dp2_zero1": (4, "parallel.pp=2", "parallel.zero_stage=1", "train.activation_checkpointing=true"),
    "dp2_zero2": (2, "parallel.zero_stage=2", "train.micro_batch=1"),  # 2 micro-batches per rank
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LM_LAYOUTS)
def test_hrmgemma_layouts_agree_with_one_process(lm_runs, name):
    """Cycles are drawn per step from [1, 3] (TINY_LM), so some steps run CycleBlocks without halting
    terms: every stage must still agree."""
    single, run_dir = lm_runs("single"), lm_runs(name, *LM_LAYOUTS[name])
    assert_agree(single, run_dir)
    distill = [logged(single, "distill"), logged(run_dir, "distill")]
    assert len(distill[0]) == 5 and min(distill[0]) > 0.01  # the teacher differs from the student
    assert distill[1] == pytest.approx(distill[0], rel=REL)
    cycles = lambda d: [json.loads(x).get("cycles") for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert cycles(single) == cycles(run_dir)
    reference, other = eval_record(single), eval_record(run_dir)
    for key in ("eval/loss", "eval/mean_cycles"):
        assert other[key] == pytest.approx(reference[key], rel=REL), key


@pytest.mark.slow
def test_consolidating_a_tp2_pp2_checkpoint_gives_the_single_process_weights(lm_runs, tmp_path):
    single, split = lm_runs("single"), lm_runs("tp2_pp2", *LM_LAYOUTS["tp2_pp2"])
    files = {}
    for name, run_dir in (("single", single), ("split", split)):
        files[name] = tmp_path / f"{name}.safetensors"
        checkpoint = run_dir / "checkpoints/step-00000005"
        run_ok([sys.executable, "-m", "hrm_mega.cli", "consolidate", str(checkpoint), str(files[name])])
    a, b = load_file(files["single"]), load_file(files["split"])
    assert a.keys() == b.keys() and len(a) > 20
    lr = 3e-3  # TINY_LM's optim.lr
    for key in a:
        assert a[key].shape == b[key].shape, key
        # The layouts reduce in another order, so a weight whose gradient is near zero can get a visibly
        # different Adam update (m / sqrt(v) amplifies rounding there): allow 1 in 1000 elements to differ
        # by less than one step's worth (lr); a wrong reshard would move whole rows or columns.
        off = ~torch.isclose(b[key], a[key], rtol=1e-4, atol=1e-6)
        assert int(off.sum()) <= max(1, a[key].numel() // 1000), key
        assert float((b[key] - a[key]).abs().max()) < lr, key
    assert not torch.equal(a["embed_tokens.weight"], torch.zeros_like(a["embed_tokens.weight"]))
    # `hrm-mega eval` (one process) on the split checkpoint reproduces what the 4 ranks logged
    out = run_ok([sys.executable, "-m", "hrm_mega.cli", "eval", str(split / "checkpoints/step-00000005")])
    logged = eval_record(split)["eval/loss"]
    assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "source,target,nproc,layout",
    [
        ("tp2_pp2", "from_tp2_pp2_to_1", 1, ()),
        ("tp2_pp2", "from_tp2_pp2_to_dp2", 2, ()),
        ("dp2_zero2", "from_dp2_zero2_to_1", 1, ()),
    ],
)
def test_resuming_at_another_layout_continues_the_losses(lm_runs, source, target, nproc, layout):
    """Weights and Adam moments carry over through the layout-free copy: steps 4-5 after resuming from
    step 3 equal the uninterrupted run's."""
    origin = lm_runs(source, *LM_LAYOUTS[source])
    resumed = lm_runs(target, nproc, *layout, resume=str(origin / "checkpoints/step-00000003"))
    a, b = steps(origin), steps(resumed)
    assert sorted(b) == [4, 5]
    for step in (4, 5):
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= REL * abs(x), (target, step, x, y)


# --- images: HRMGemma with a vision encoder on a mixture of text and image-text rows ---------------------


def vlm_common(sources: Path) -> tuple[str, ...]:
    """A trainable SigLIP tower (so its TP-split weights get gradients) and a mixture whose batches hold
    text rows (no images) and image-text rows (two images each), read with a loader worker."""
    mix = f"data.sources=[{{path: '{sources / 'text'}', name: text}}, {{path: '{sources / 'images'}', name: images}}]"
    return (*TINY_VISION, mix, "data.num_workers=1")


@pytest.fixture(scope="module")
def vlm_runs(tiny_image_text: Path, tmp_path_factory):
    return layout_runs(tmp_path_factory.mktemp("vlm"), tiny_image_text / "text", *vlm_common(tiny_image_text))


VLM_LAYOUTS = {
    "tp2": (2, "parallel.tp=2"),
    "pp2": (2, "parallel.pp=2"),  # the vision tower and projector on the first stage
    "tp2_pp2": (4, "parallel.tp=2", "parallel.pp=2"),
    "dp2_zero2": (2, "parallel.zero_stage=2", "train.micro_batch=1"),  # micro-batches with 0 and 2 images
}


@pytest.mark.slow
@pytest.mark.parametrize("name", VLM_LAYOUTS)
def test_multimodal_layouts_agree_with_one_process(vlm_runs, name):
    single, run_dir = vlm_runs("single"), vlm_runs(name, *VLM_LAYOUTS[name])
    assert_agree(single, run_dir)
    reference, other = eval_record(single), eval_record(run_dir)
    assert reference["eval/images/tokens"] > 0
    for key in ("eval/text/loss", "eval/images/loss", "eval/images/mean_cycles"):
        assert other[key] == pytest.approx(reference[key], rel=REL), key
    images = [
        json.loads(x).get("data/images/samples") for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(images)  # image-text rows were trained on


@pytest.mark.slow
def test_multimodal_resume_after_sigkill_with_image_rows_in_flight_is_exact(
    vlm_runs, tiny_image_text, tmp_path
):
    """Killed after step 3 while its loader worker holds image rows read ahead, a run with checkpoints at
    every step resumes from its latest one and logs the uninterrupted run's losses, grad norms and
    per-source sample counts, bit for bit."""
    from conftest import sigkill_after_step

    common = [*LM, *vlm_common(tiny_image_text), "train.checkpoint_interval=1"]
    killed = tmp_path / "killed"
    cmd = lm_cmd(killed, tiny_image_text / "text", *common)
    sigkill_after_step(cmd, killed, 3, steps, env(), ROOT)
    assert max(steps(killed)) < 5
    run_ok(cmd)

    def logged(run_dir: Path) -> dict[int, tuple]:
        keys = ("loss", "grad_norm", "data/text/samples", "data/images/samples")
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: tuple(r[k] for k in keys) for r in records if "loss" in r}

    assert logged(killed) == logged(vlm_runs("single"))


@pytest.mark.slow
def test_multimodal_run_resumes_at_another_layout(vlm_runs):
    """An image-text run saved at TP=2 x PP=2 (the SigLIP tower split across TP ranks, on the first stage)
    resumes in one process through the layout-free copy: steps 4-5 equal the uninterrupted run's,
    image rows included."""
    origin = vlm_runs("tp2_pp2", *VLM_LAYOUTS["tp2_pp2"])
    resumed = vlm_runs("from_tp2_pp2_to_1", 1, resume=str(origin / "checkpoints/step-00000003"))
    a, b = steps(origin), steps(resumed)
    assert sorted(b) == [4, 5]
    for step in (4, 5):
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= REL * abs(x), (step, x, y)
    records = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/images/samples") for r in records)  # the resumed steps read image-text rows


@pytest.mark.slow
def test_a_frozen_vision_tower_stays_as_it_was_and_the_projector_trains(tiny_image_text, tmp_path):
    """model.vision.trainable=false (Gemma 3's recipe, the default): over image-text steps on DeepSpeed the
    SigLIP tower's weights do not move, the projector's do."""
    from hrm_mega.checkpoint.consolidate import load_model

    common = [x.replace("trainable: true", "trainable: false") for x in vlm_common(tiny_image_text)]
    run_dir = tmp_path / "frozen"
    run_ok(
        lm_cmd(
            run_dir, tiny_image_text / "text", *LM, *common, "train.steps=2", "train.checkpoint_interval=1"
        )
    )
    (first, _), (second, _) = (load_model(run_dir / f"checkpoints/step-0000000{k}") for k in (1, 2))
    a, b = first.vision.state_dict(), second.vision.state_dict()
    assert not any(p.requires_grad for p in second.vision.tower.parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("tower."))
    assert all(not torch.equal(a[k], b[k]) for k in a if k.startswith("projector."))


# --- invalid layouts: one line, before any process-group work ------------------------------------------


def puzzle_config(*overrides: str):
    return load_config(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml", list(overrides))


def lm_config(*overrides: str):
    tiny = ("model.num_layers=8", "model.local_per_global=3", "model.num_heads=4", "model.num_kv_heads=2")
    return load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml", [*tiny, *overrides])


@pytest.mark.parametrize(
    "config,world,message",
    [
        (lambda: puzzle_config("parallel.tp=2", "model.vocab_size=12"), 3, "world size 3 is not parallel.tp x parallel.pp x dp"),
        (lambda: lm_config("parallel.tp=4"), 4, "model.num_kv_heads=2 is not divisible by parallel.tp=4"),
        (lambda: lm_config("parallel.tp=8"), 8, "model.num_heads=4 is not divisible by parallel.tp=8"),
        (lambda: puzzle_config("parallel.tp=2"), 2, "model.vocab_size=11 is not divisible by parallel.tp=2; "
                                                    "pad it: set model.vocab_size=12"),
        (lambda: lm_config("parallel.pp=3"), 3, "parallel.pp=3 does not divide the model's 2 CycleBlocks"),
        (lambda: lm_config("parallel.pp=2", "parallel.pp_blocks=[2,1]"), 2,
         "parallel.pp_blocks=[2, 1] must list 2 positive CycleBlock counts"),
    ],
)  # fmt: skip
def test_invalid_layouts_are_one_line_errors(config, world, message):
    with pytest.raises(ConfigError) as error:
        resolve_layout(config(), world)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_zero_above_1_with_pipeline_stages_and_puzzle_stages_are_rejected_by_the_config():
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=2 cannot combine with parallel.pp=2"):
        lm_config("parallel.pp=2", "parallel.zero_stage=2")
    with pytest.raises(
        ConfigError, match=r"parallel.pp=2 is not supported for model.family=puzzle \(a single"
    ):
        puzzle_config("parallel.pp=2")


def test_valid_layouts_and_stage_partitions():
    layout = resolve_layout(lm_config("parallel.tp=2", "parallel.pp=2"), 8)
    assert (layout.tp, layout.pp, layout.dp) == (2, 2, 2)
    # rank = (pp_rank * dp + dp_rank) * tp + tp_rank: TP fastest, then DP, then PP
    assert [layout.coordinates(r) for r in (0, 1, 2, 5, 7)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)
    ]  # fmt: skip
    assert pipeline_stage_blocks(lm_config("parallel.pp=2")) == [1, 1]
    six = lm_config("model.num_layers=12", "parallel.pp=2", "parallel.pp_blocks=[2,1]")
    assert pipeline_stage_blocks(six) == [2, 1]


@pytest.mark.slow
def test_a_bad_layout_fails_before_process_groups_start(tiny_sudoku, tmp_path):
    out = subprocess.run(
        train_cmd(tmp_path / "x", tiny_sudoku, "parallel.tp=2", "train.steps=1"),
        env=env(), capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("hrm-mega train: error: world size 1 is not parallel.tp x parallel.pp x dp")
    assert "Traceback" not in out.stderr
    assert "Initializing TorchBackend" not in out.stdout + out.stderr  # DeepSpeed's process-group start
