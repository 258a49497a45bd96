"""Shared test set-up: CPU DeepSpeed, few threads, a tiny puzzle-model config, the tiny datasets that the
training tests share (session-scoped: built once, then only read), subprocess helpers, a transcription of
HRM's LR schedule, and the guard that keeps `pytest -m "not slow"` a unit suite: a test not marked slow
may not start a run."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hrm_mega.config import PuzzleModelConfig  # noqa: E402
from hrm_mega.data.shards import ShardWriter, write_manifest  # noqa: E402

torch.set_num_threads(1)

# Commands that start a training run, torchrun or a launcher: only tests marked slow may start them.
RUN_MODULES = ("pipelines.", "hrm_mega.", "launch.", "data_prep.", "torch.distributed.run", "deepspeed.")
RUN_PROGRAMS = {"torchrun", "deepspeed", "sbatch", "srun"}


def starts_a_run(args: object) -> bool:
    """Whether a Popen command (a list, or a shell string) starts hrm-mega, torchrun or a launcher."""
    words = [str(w) for w in args] if isinstance(args, list | tuple) else str(args).split()
    return any(w.startswith(RUN_MODULES) or Path(w).name in RUN_PROGRAMS for w in words)


@contextlib.contextmanager
def runs_refused(item: pytest.Item) -> Iterator[None]:
    """While a test not marked slow sets up and runs, subprocess refuses commands that start a run."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        if starts_a_run(args):
            raise AssertionError(
                f"{item.nodeid} starts a run ({args}); mark it @pytest.mark.slow (`make test-unit` skips those)"
            )
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with runs_refused(item):  # fixtures too: a module fixture that trains belongs to slow tests
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with runs_refused(item):
        return (yield)


@pytest.fixture
def tiny_config() -> PuzzleModelConfig:
    return PuzzleModelConfig(
        vocab_size=11, seq_len=16, num_puzzle_identifiers=3, hidden_size=32, num_heads=2,
        h_layers=1, l_layers=1, h_cycles=2, l_cycles=2, puzzle_emb_ndim=32, halt_max_steps=4,
    )  # fmt: skip


def write_tiny_sudoku(out: Path) -> Path:
    """A small sudoku-shaped dataset (random digits: enough for losses, equivalence and resume checks):
    96 train and 24 test samples of 81 cells, 12 per shard."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 96), ("test", 24)):
        writer = ShardWriter(out / split, samples_per_shard=12)
        for i in range(n):
            labels = rng.integers(2, 11, 81).astype(np.int16)
            inputs = np.where(rng.random(81) < 0.5, 1, labels).astype(np.int16)
            writer.write({"inputs": inputs, "labels": labels, "meta": {"puzzle_id": 0, "group_id": i}})
        splits[split] = writer.close()
    write_manifest(
        out, task="sudoku", builder_version="test", seed=0, command="test", vocab_size=11, seq_len=81,
        num_puzzle_identifiers=1, splits=splits,
    )  # fmt: skip
    return out


def build_tiny_text(root: Path) -> Path:
    """Generated corpus -> SentencePiece (vocab 320, '=' a piece of its own) -> packed rows of 32 tokens,
    8 per shard, in root/data (the corpus stays in root/corpus)."""
    from hrm_mega.prep.cli import main as prep_main

    assert prep_main(["corpus", "--out", str(root / "corpus"), "--docs", "400", "--seed", "0"]) == 0
    out = root / "data"
    assert (
        prep_main(["text", "--input", str(root / "corpus/train.txt"), "--test-input", str(root / "corpus/test.txt"),
                   "--vocab-size", "320", "--atomic-symbols", "=", "--seq-len", "32", "--out", str(out), "--workers", "1",
                   "--samples-per-shard", "8"])
        == 0
    )  # fmt: skip
    return out


IMAGE_PIECES = ("<start_of_image>", "<end_of_image>")


def build_tiny_image_text(root: Path, corpus: Path) -> Path:
    """A text source and an image-text source with one tokenizer, for multimodal mixtures: corpus ->
    SentencePiece (vocab 320; '=' and the image pieces atomic) -> root/text (rows of 32 tokens, as
    build_tiny_text); 2 x 2 digit grids of 16 px (160 train, 32 test) -> root/images, each image 4 tokens
    (its text "12/34"), two documents per row. Returns root."""
    from hrm_mega.prep.cli import main as prep_main

    assert (
        prep_main(["text", "--input", str(corpus / "train.txt"), "--test-input", str(corpus / "test.txt"),
                   "--vocab-size", "320", "--atomic-symbols", "=", *IMAGE_PIECES, "--seq-len", "32",
                   "--out", str(root / "text"), "--workers", "1", "--samples-per-shard", "8"])
        == 0
    )  # fmt: skip
    src = root / "grids"
    assert prep_main(["grid-images", "--out", str(src), "--train", "160", "--test", "32", "--grid", "2",
                      "--cell", "8", "--separator", "/", "--workers", "1", "--quiet"]) == 0  # fmt: skip
    assert (
        prep_main(["images", "--input", str(src / "train.jsonl"), "--test-input", str(src / "test.jsonl"),
                   "--tokenizer", str(root / "text/tokenizer.model"), "--seq-len", "32", "--image-size", "16",
                   "--mm-tokens-per-image", "4", "--out", str(root / "images"), "--workers", "1",
                   "--samples-per-shard", "8", "--quiet"])
        == 0
    )  # fmt: skip
    return root


# the model.vision of build_tiny_image_text's data: 16 px, patch 4, 4 tokens per image (the tokenizer's
# 320 pieces put the image placeholder at id 320; <start_of_image>/<end_of_image> are ids 5 and 6)
TINY_VISION = [
    "model.vision={image_size: 16, patch_size: 4, hidden_size: 16, intermediate_size: 32, num_layers: 1, "
    "num_heads: 2, mm_tokens_per_image: 4, image_token_id: 320, boi_token_id: 5, eoi_token_id: 6, "
    "trainable: true}"
]


@pytest.fixture(scope="session")
def tiny_image_text(tiny_text: Path, tmp_path_factory) -> Path:
    """build_tiny_image_text's two sources (root/text, root/images), from tiny_text's corpus; read only."""
    return build_tiny_image_text(tmp_path_factory.mktemp("tiny_image_text"), tiny_text.parent / "corpus")


@pytest.fixture(scope="session")
def tiny_sudoku(tmp_path_factory) -> Path:
    """write_tiny_sudoku's dataset, shared by every test of the session: read it, never write into it."""
    return write_tiny_sudoku(tmp_path_factory.mktemp("tiny_sudoku"))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """build_tiny_text's dataset, shared by every test of the session: read it, never write into it."""
    return build_tiny_text(tmp_path_factory.mktemp("tiny_text"))


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
    """Starts `cmd`, SIGKILLs it once its metrics.jsonl shows `step` (or after 300 s) and waits for it.
    Every process it started dies with it, as on a lost machine: torchrun's ranks run in sessions of
    their own and would outlive their launcher."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(logged_steps(run_dir), default=0) >= step:
            break
        time.sleep(0.05)
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    proc.send_signal(signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def hrm_lr(current_step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Transcribed from sapientinc/HRM pretrain.py, cosine_schedule_with_warmup_lr_lambda (num_cycles
    0.5); its train_batch advances train_state.step before computing the LR, so updates are 1..total."""
    if current_step < warmup:
        return base_lr * float(current_step) / float(max(1, warmup))
    progress = float(current_step - warmup) / float(max(1, total - warmup))
    return base_lr * (
        min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    )
