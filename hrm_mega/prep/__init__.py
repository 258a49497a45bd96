"""Shard builders: puzzle datasets (sudoku, maze, ARC, HRM .npy imports) and text (corpus, text).

Run `hrm-mega prep TASK --out DIR ...` or `python -m hrm_mega.prep TASK --out DIR ...`; the on-disk
format is described in docs/data_format.md. `hrm_mega.prep.cli.main(argv)` is the same entry point as
a function.
"""
