"""Shared test set-up: CPU DeepSpeed, few threads, and a tiny puzzle-model config."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hrm_mega.config import PuzzleModelConfig  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> PuzzleModelConfig:
    return PuzzleModelConfig(
        vocab_size=11, seq_len=16, num_puzzle_identifiers=3, hidden_size=32, num_heads=2,
        h_layers=1, l_layers=1, h_cycles=2, l_cycles=2, puzzle_emb_ndim=32, halt_max_steps=4,
    )  # fmt: skip


def module_cmd(module: str, args: list[str], nproc: int = 1) -> list[str]:
    """`python -m module args...`: one process, or nproc ranks on this machine under torchrun."""
    script = ["-m", module, *args]
    if nproc == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *script,
    ]


def sigkill_after_step(
    cmd: list[str], run_dir: Path, step: int, logged_steps: Callable[[Path], dict], env: dict, cwd: Path
) -> None:
    """Starts `cmd`, SIGKILLs it once its metrics.jsonl shows `step` (or after 300 s) and waits for it."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(logged_steps(run_dir), default=0) >= step:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
