"""Inference runtimes: puzzle evaluation (fixed and adaptive halting)."""
