"""Run logging without a terminal: progress lines, the metrics trail on resume, `hrm-mega plot`.
The multi-process run that checks them end to end (restart, TensorBoard, W&B id) is in test_launch.py."""

from __future__ import annotations

import json

from hrm_mega.cli import main as cli_main
from hrm_mega.config import load_config
from hrm_mega.resources import recipe
from hrm_mega.training.metrics import MetricsLogger


def tiny_config(tmp_path, *overrides):
    return load_config(
        recipe("puzzle/hrm_sudoku_tiny.yaml"),
        [f"data.path={tmp_path}", f"log.out_dir={tmp_path / 'run'}", "log.wandb=disabled", *overrides],
    )


def test_without_a_terminal_each_logged_step_prints_a_line_with_an_eta(tmp_path, capsys):
    logger = MetricsLogger(tiny_config(tmp_path), tmp_path / "run", rank=0, total_steps=10, start_step=4)
    logger.log(5, {"loss": 1.23456, "lr": 3e-4, "grad_norm": 0.5, "samples_per_s": 8.0, "tokens_per_s": 0.0})
    logger.log(5, {"eval/loss": 1.0})  # evaluation records print no progress line
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("step 5/10  loss 1.2346  lr 3.00e-04  grad_norm 0.5  8.0 samples/s  eta ")


def test_a_resumed_logger_drops_the_records_after_its_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = [{"step": s, "loss": float(s)} for s in range(1, 8)] + [{"step": 4, "eval/loss": 0.5}]
    # the last line was cut short by a kill mid-write
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 8, "lo')
    MetricsLogger(tiny_config(tmp_path), run, rank=0, total_steps=10, start_step=4).close()
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kept == [r for r in old if r["step"] <= 4]
    # Other ranks never touch the file.
    MetricsLogger(tiny_config(tmp_path), run, rank=1, total_steps=10, start_step=2).close()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(kept)


def test_plot_refuses_a_directory_without_metrics_in_one_line(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hrm-mega plot: error: {tmp_path}: holds no metrics.jsonl (give a run directory, "
                   "i.e. log.out_dir, or its metrics.jsonl)"]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo'
    )
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"hrm-mega plot: error: {tmp_path}/metrics.jsonl:2: not a JSON record"
    )


def test_plot_reads_a_running_jobs_file_whose_last_line_is_being_written(tmp_path):
    from hrm_mega.entry.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    assert read_metrics(tmp_path) == {"loss": [(1, 2.0), (2, 1.5)]}
