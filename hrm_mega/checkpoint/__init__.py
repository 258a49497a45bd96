"""Checkpoint I/O, below both training and convert: atomic training checkpoints (atomic.py), their
layout-free copy (universal.py), self-contained model directories (model_dir.py) and consolidation of a
training checkpoint into full weights (consolidate.py)."""
