"""Shared test set-up: CPU DeepSpeed, few threads, and a tiny puzzle-model config."""

import os

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
