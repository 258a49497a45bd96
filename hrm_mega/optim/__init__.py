"""Optimizers and schedules: AdamATan2 for parameters, sparse sign-SGD for the puzzle-embedding table,
the warmup-cosine LR schedule, and an EMA of the weights."""

from hrm_mega.optim.adam_atan2 import AdamATan2
from hrm_mega.optim.ema import EMA
from hrm_mega.optim.schedule import LRSchedule, lr_at
from hrm_mega.optim.sign_sgd import SparseSignSGD

__all__ = ["EMA", "AdamATan2", "LRSchedule", "SparseSignSGD", "lr_at"]
