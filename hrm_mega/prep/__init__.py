"""Shard builders for puzzle datasets (sudoku, maze, ARC, HRM .npy imports).

Run `python -m data_prep {sudoku,maze,arc,hrm-npy} --out DIR ...`; the on-disk format is described in
docs/data_format.md. `data_prep.cli.main(argv)` is the same entry point as a function.
"""
