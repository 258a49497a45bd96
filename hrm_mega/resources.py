"""Files that ship with the package but live at the top of the repository: the YAML recipes (configs/)
and the Slurm job scripts (launch/slurm/). A wheel carries them inside the package, as hrm_mega/configs/
and hrm_mega/launch/slurm/ (pyproject.toml maps them there); a source checkout or an editable install
reads them where they are. Imports nothing from hrm_mega, so any layer may use it."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _shipped_dir(relative: str) -> Path:
    installed = PACKAGE / relative
    return installed if installed.is_dir() else PACKAGE.parent / relative


def recipes_dir() -> Path:
    """The directory of YAML recipes (lm/, puzzle/, rl/)."""
    return _shipped_dir("configs")


def recipe(name: str) -> Path:
    """A shipped recipe by its path under configs/, e.g. recipe("puzzle/hrm_sudoku_tiny.yaml")."""
    return recipes_dir() / name


def slurm_scripts_dir() -> Path:
    """The directory of the sbatch scripts (pretrain.sbatch, rl.sbatch)."""
    return _shipped_dir("launch/slurm")
