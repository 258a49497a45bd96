"""Whole puzzle runs in this process (no launcher, a world of one on the CPU), on the tiny sudoku data:

- a tiny TRM run (configs/puzzle/trm_sudoku_tiny.yaml, shrunk): the loss falls, every update's LR is
  HRM's schedule at HRM's step, evaluation uses the EMA weights (and only them), a resume keeps the EMA;
- an HRM run with model.puzzle_emb_ndim=0 (no puzzle embedding) trains, checkpoints, evaluates and
  resumes.

The runs are module-scoped and small (seconds each); the process group they start is taken down with
the module, so later tests see a clean process.
"""

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import hrm_lr
from safetensors import safe_open
from safetensors.torch import save_file

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.checkpoint.integrity import write_checksums
from hrm_mega.checkpoint.model_dir import CheckpointError
from hrm_mega.config import ConfigError, load_config
from hrm_mega.data.shards import manifest_digest
from hrm_mega.inference.puzzle import run_fixed
from hrm_mega.training.evaluation import evaluation
from hrm_mega.training.tasks.puzzle import evaluate_puzzles
from hrm_mega.training.trainer import Trainer, build_trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, LR, MIN_RATIO = 24, 3, 1e-2, 0.5
SMALL = [
    "model.hidden_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.halt_max_steps=2",
    "model.h_cycles=2", "model.l_cycles=2", "train.global_batch=8", "data.partitions=2",
    "data.shuffle_buffer=16", "train.eval_interval=0", "train.checkpoint_interval=0",
    "train.eval_modes=fixed", "train.eval_max_samples=8", "log.wandb=disabled", "log.log_interval=1",
    "log.progress_bar=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    """Restores the environment (setup_distributed writes RANK, MASTER_PORT, ...) and takes the process
    group down after the module's runs."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def config(recipe: str, run_dir: Path, data: Path, *overrides: str):
    return load_config(
        ROOT / "configs/puzzle" / recipe, [*SMALL, f"data.path={data}", f"log.out_dir={run_dir}", *overrides]
    )


def logged(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def checkpoint_dir(trainer: Trainer) -> Path:
    (path,) = sorted((trainer.run_dir / "checkpoints").glob("step-*"))
    return path


# --------------------------------------------------------------------------------------------------
# A tiny TRM run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trm_run(world_of_one, tiny_sudoku, tmp_path_factory) -> tuple[Trainer, dict[str, float]]:
    run_dir = tmp_path_factory.mktemp("trm") / "run"
    cfg = config(
        "trm_sudoku_tiny.yaml", run_dir, tiny_sudoku, f"train.steps={STEPS}", f"optim.warmup_steps={WARMUP}",
        f"optim.lr={LR}", f"optim.lr_min_ratio={MIN_RATIO}", "optim.ema_decay=0.9",
    )  # fmt: skip
    assert cfg.model.token_mixer == "mlp" and cfg.model.shared_net  # still TRM after shrinking
    trainer = build_trainer(cfg, resume="none")
    return trainer, trainer.train()


def test_trm_run_loss_falls_and_every_update_has_hrms_lr(trm_run):
    trainer, _ = trm_run
    records = logged(trainer.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    # The update logged as step k is HRM's train_state.step == k: the first is at LR/WARMUP, not 0.
    for r in records:
        assert r["lr"] == pytest.approx(hrm_lr(r["step"], LR, WARMUP, STEPS, MIN_RATIO), rel=1e-12), r["step"]
    assert records[0]["lr"] > 0 and records[-1]["lr"] == pytest.approx(LR * MIN_RATIO)


def test_trm_evaluation_uses_the_ema_weights(trm_run):
    """The run's evaluation equals evaluating the checkpoint's model loaded with the EMA shadow, and
    differs from evaluating the raw weights; the raw weights are back in place afterwards."""
    trainer, results = trm_run
    cfg, model = trainer.config, trainer.model
    raw = {k: v.clone() for k, v in model.state_dict().items()}

    def q_halts(m, ema):
        with evaluation(m, cfg, trainer.world, ema) as batches:
            return torch.tensor([r.q_halt for r in run_fixed(m, cfg.model, batches)])

    with_ema, without = q_halts(model, trainer.ema), q_halts(model, None)
    loaded, _ = load_model(checkpoint_dir(trainer))  # a training checkpoint loads with its EMA weights
    torch.testing.assert_close(q_halts(loaded, None), with_ema, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_ema, without, atol=1e-4)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    metrics = evaluate_puzzles(loaded, cfg, trainer.world, "fixed")
    assert metrics == pytest.approx({k.removeprefix("eval_fixed/"): v for k, v in results.items()})


def test_trm_resume_keeps_the_ema_state(trm_run):
    trainer, _ = trm_run
    resumed = build_trainer(trainer.config, resume="auto")
    assert resumed.step == STEPS
    assert resumed.ema.shadow.keys() == trainer.ema.shadow.keys()
    for name, shadow in trainer.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], shadow), name
    params = dict(resumed.model.named_parameters())
    assert any(not torch.equal(params[n].float(), s) for n, s in resumed.ema.shadow.items())  # not re-seeded


def test_a_training_checkpoint_records_its_format_version(trm_run, tmp_path, capsys):
    """Every rank's client state says hrm-mega/checkpoint/1 and the layout-free copy hrm-mega/universal/1.
    A newer version of either is refused in one line by resume and by load_model; a checkpoint without a
    version (written before versions were recorded) resumes and loads as version 1, with one line
    saying so."""
    trainer, _ = trm_run
    saved = checkpoint_dir(trainer)
    universal = "universal/tp00-pp00.safetensors"
    assert [json.loads(c.read_text())["format"] for c in (saved / "client").glob("rank-*.json")] == [
        "hrm-mega/checkpoint/1"
    ]
    with safe_open(str(saved / universal), "pt") as f:
        assert f.metadata()["format"] == "hrm-mega/universal/1"
    expected = load_model(saved)[0].state_dict()

    def variant(name: str, format_tag: str | None, universal_tag: str = "hrm-mega/universal/1") -> Path:
        copy = Path(shutil.copytree(saved, tmp_path / name))
        for client in (copy / "client").glob("rank-*.json"):
            state = json.loads(client.read_text())
            state.pop("format")
            client.write_text(json.dumps(state if format_tag is None else {**state, "format": format_tag}))
        with safe_open(str(copy / universal), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
        save_file(tensors, copy / universal, metadata={**meta, "format": universal_tag})
        write_checksums(copy)  # as the writer of that version did
        return copy

    for name, tags, version in (
        ("newer", ("hrm-mega/checkpoint/2",), 2),
        ("newer_universal", ("hrm-mega/checkpoint/1", "hrm-mega/universal/3"), 3),
    ):
        copy = variant(name, *tags)
        newer = (
            rf"format version {version} is newer than this hrm-mega reads \(1\); upgrade hrm-mega to load it$"
        )
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(copy))}\S*: {newer}"):
            load_model(copy)
        if name == "newer":  # resuming at the same layout reads DeepSpeed's files, not universal/
            with pytest.raises(CheckpointError, match=newer) as error:
                build_trainer(trainer.config, resume=str(copy))
            assert "\n" not in str(error.value)

    note = "records no format version (written before versions were recorded); reading it as hrm-mega/checkpoint/1"
    older = variant("older", None)
    capsys.readouterr()
    loaded = load_model(older)[0].state_dict()
    assert capsys.readouterr().err == f"note: {older} {note}\n"
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    older = variant("older_resumed", None)
    resumed = build_trainer(trainer.config, resume=str(older))
    assert resumed.step == STEPS
    assert capsys.readouterr().err.count(note) == 1


# --------------------------------------------------------------------------------------------------
# No puzzle embedding (model.puzzle_emb_ndim=0)
# --------------------------------------------------------------------------------------------------


NO_EMB = ["model.puzzle_emb_ndim=0", "model.h_layers=1", "model.l_layers=1"]


def test_puzzle_emb_ndim_0_trains_checkpoints_evaluates_and_resumes(
    world_of_one, tiny_sudoku, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    cfg = config("hrm_sudoku_tiny.yaml", run_dir, tiny_sudoku, *NO_EMB, "train.steps=3",
                 "parallel.deepspeed.steps_per_print=7")  # fmt: skip
    trainer = build_trainer(cfg, resume="none")
    assert trainer.model.puzzle_emb is None and trainer.task.sign_sgd is None
    # the pass-through reaches the engine and the saved DeepSpeed config
    assert trainer.engine.steps_per_print() == 7
    assert json.loads((run_dir / "ds_config.json").read_text())["steps_per_print"] == 7
    results = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged(run_dir))
    assert results["eval_fixed/samples"] == 8
    model, _ = load_model(checkpoint_dir(trainer))
    assert model.puzzle_emb is None and "puzzle_emb" not in model.state_dict()

    # Other data is refused before any engine starts: other order fields, other shards. The same shards
    # moved elsewhere, and a changed optimizer, are reported.
    moved, subset = tmp_path / "moved", tmp_path / "subset"
    shutil.copytree(tiny_sudoku, moved)
    shutil.copytree(tiny_sudoku, subset)
    manifest = json.loads((subset / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["shards"].pop()
    manifest["splits"]["train"]["num_samples"] -= dropped["num_samples"]
    manifest["sha256"] = manifest_digest(manifest)  # a consistent manifest of fewer shards
    (subset / "manifest.json").write_text(json.dumps(manifest))
    for changed, reason in (
        ("data.shuffle_buffer=8", "data.shuffle_buffer 16 -> 8"),
        (
            f"data.path={subset}",
            f"the train shards under data.path differ from the checkpoint's; data.path '{tiny_sudoku}' -> '{subset}'",
        ),
    ):
        other = config("hrm_sudoku_tiny.yaml", run_dir, tiny_sudoku, *NO_EMB, "train.steps=4", changed)
        with pytest.raises(
            ConfigError, match=rf"^resuming \S+step-00000003 on other training data \({re.escape(reason)}\)"
        ):
            build_trainer(other, resume="auto")
    capsys.readouterr()
    longer = config("hrm_sudoku_tiny.yaml", run_dir, moved, *NO_EMB, "train.steps=4", "optim.lr=0.005")
    resumed = build_trainer(longer, resume="auto")
    assert resumed.step == 3
    assert (f"changed since the checkpoint: parallel.deepspeed {{'steps_per_print': 7}} -> {{}}; data.path '{tiny_sudoku}' -> '{moved}'; optim.lr {cfg.optim.lr!r} -> 0.005; "
            "train.steps 3 -> 4") in capsys.readouterr().out  # fmt: skip
    resumed.train()
    assert [r["step"] for r in logged(run_dir)] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# The demo's halting table, figure and `hrm-mega eval --mode table`
# --------------------------------------------------------------------------------------------------


def test_the_demo_prints_the_halting_table_and_the_eval_cli_agrees(
    world_of_one, tiny_sudoku, tmp_path, capsys
):
    from hrm_mega.entry import demo, evaluate

    out = tmp_path / "demo"
    small = [o for o in SMALL if not o.startswith("train.eval_modes")] + [
        "train.steps=4",
        "log.wandb=disabled",
    ]
    overrides = [x for o in small for x in ("--set", o)]
    assert demo.main(["--data", str(tiny_sudoku), "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    for row in ("fixed, 1 segment", "fixed, 2 segments", "adaptive, the halt_only rule", "adaptive, threshold 0.8",
                "adaptive run, model.halt_threshold=0.8", "halting bar ("):  # fmt: skip
        assert row in printed, row
    for figure in ("accuracy_vs_segments.png", "metrics.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "demo_results.json").read_text())
    # The real adaptive run of the trainer's evaluation is what the one-pass table says for its threshold.
    assert results["adaptive run, model.halt_threshold=0.8"] == pytest.approx(
        results["adaptive, threshold 0.8"]
    )

    ckpt = str(out / "checkpoints" / "step-00000004")
    common = ["--data", str(tiny_sudoku), "--max-samples", "8"]
    assert evaluate.main([ckpt, *common, "--mode", "table", "--thresholds", "0,0.8"]) == 0
    table = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mode"], r["threshold"]) for r in table] == [("fixed", None), ("fixed", None), ("adaptive", 0.0),
                                                            ("adaptive", 0.8)]  # fmt: skip
    assert evaluate.main([ckpt, *common, "--mode", "fixed"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert evaluate.main([ckpt, *common, "--mode", "adaptive", "--halt-threshold", "0.8"]) == 0
    adaptive = json.loads(capsys.readouterr().out)
    keys = ("samples", "exact_accuracy", "token_accuracy", "mean_segments")
    assert {k: table[1][k] for k in keys} == pytest.approx({k: fixed[k] for k in keys})
    assert {k: table[3][k] for k in keys} == pytest.approx({k: adaptive[k] for k in keys})
    assert evaluate.main([ckpt, *common, "--halt-threshold", "1.5"]) == 2  # one line naming the field
    assert "model.halt_threshold=1.5" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints: found by their checksums, passed over on --resume auto
# --------------------------------------------------------------------------------------------------


def flip_a_bit(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_latest_checkpoint_resumes_from_an_intact_one(world_of_one, tiny_sudoku, tmp_path, capsys):
    """Checkpoints at steps 2 and 4. A flipped bit in step 4's client state: --resume auto continues
    from step 2 with a one-line note, logging what resuming from step 2 directly logs. Damage to
    DeepSpeed's own file alone: step 4 resumes from its layout-free copy, as an intact step 4 does. With
    both checkpoints damaged: one line. `hrm-mega eval` of a damaged checkpoint: one line."""
    base = tmp_path / "base"
    base_cfg = config(
        "hrm_sudoku_tiny.yaml", base, tiny_sudoku, *NO_EMB, "train.steps=4", "train.checkpoint_interval=2"
    )
    build_trainer(base_cfg, resume="none").train()
    (base / "metrics.jsonl").unlink()

    def continued(name: str, resume: str, damage=()) -> tuple[int, list[tuple], str]:
        run_dir = tmp_path / name
        shutil.copytree(base, run_dir)
        for relative in damage:  # "!" in front: truncated, else one bit flipped
            path = run_dir / "checkpoints" / relative.lstrip("!")
            if relative.startswith("!"):
                path.write_bytes(path.read_bytes()[:-7])
            else:
                flip_a_bit(path)
        cfg = config(
            "hrm_sudoku_tiny.yaml",
            run_dir,
            tiny_sudoku,
            *NO_EMB,
            "train.steps=6",
            "train.checkpoint_interval=2",
        )
        resume = resume if resume == "auto" else str(run_dir / "checkpoints" / resume)
        capsys.readouterr()
        trainer = build_trainer(cfg, resume=resume)
        start = trainer.step
        trainer.train()
        trail = [(r["step"], r["loss"], r["grad_norm"]) for r in logged(run_dir)]
        return start, trail, capsys.readouterr().out

    # the client state of step 4 is damaged: step 2 it is
    start, records, out = continued("client", "auto", ["step-00000004/client/rank-00000.safetensors"])
    assert start == 2
    assert re.search(r"step-00000004 is damaged \(client/rank-00000\.safetensors: its sha256 differs from when "
                     r"it was written\); trying the next older checkpoint", out)  # fmt: skip
    assert records == continued("from_2", "step-00000002")[1]
    # DeepSpeed's module file of step 4 is damaged: its universal/ copy resumes step 4 exactly
    start, records, out = continued("deepspeed", "auto", ["step-00000004/mp_rank_00_model_states.pt"])
    assert start == 4 and "resuming from its layout-free copy universal/" in out
    assert records == continued("from_4", "auto")[1]
    # nothing intact: one line
    both = ["!step-00000004/client/rank-00000.json", "step-00000002/universal/tp00-pp00.safetensors"]
    with pytest.raises(CheckpointError, match=r"^no intact checkpoint to resume: \S+step-00000004 is damaged \(client/"
                       r"rank-00000\.json: \d+ bytes, \d+ when written\) \| \S+step-00000002 is damaged \(universal/tp00-pp00\.safetensors: .*"
                       r"restore a copy, or start over with --resume none$") as error:  # fmt: skip
        continued("none", "auto", both)
    assert "\n" not in str(error.value)
    # the readers of a checkpoint say the same in one line
    with pytest.raises(
        CheckpointError, match=r"step-00000002 is damaged: universal/tp00-pp00\.safetensors: its sha256"
    ):
        load_model(tmp_path / "none/checkpoints/step-00000002")
