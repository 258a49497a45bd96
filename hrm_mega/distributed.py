"""Process-group layout, seeding and rank-aware logging.

Model code asks only two questions of this module: how many tensor-parallel ranks there are and
which one this is. With no distributed setup both answers describe a single process, so every model
runs as-is in a notebook or a unit test.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

_tp_size = 1
_tp_rank = 0


def tp_size() -> int:
    return _tp_size


def tp_rank() -> int:
    return _tp_rank


def set_tensor_parallel(size: int, rank: int) -> None:
    """Records this process's tensor-parallel coordinates (called once megatron-core's groups exist)."""
    global _tp_size, _tp_rank
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside 0..{size - 1}")
    _tp_size, _tp_rank = size, rank


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and, when present, CUDA) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return global_rank() == 0
