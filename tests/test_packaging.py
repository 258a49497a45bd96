"""Packaging: only `hrm_mega` is installed (pipelines/, launch/ and data_prep/ are folders of thin scripts
and sbatch files), and a wheel carries the recipes and the sbatch scripts that the code reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from hrm_mega.resources import recipe, recipes_dir, slurm_scripts_dir

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("pipelines", "launch", "data_prep")  # top-level folders that must never be installed packages


def setuptools_table() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package_and_recipe_folder():
    """pyproject.toml lists packages by hand (find cannot add mapped folders): a new subpackage or recipe
    folder that is not listed would be missing from the wheel."""
    table = setuptools_table()
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hrm_mega").rglob("__init__.py")}
    recipe_folders = {f"hrm_mega.configs.{d.name}" for d in (ROOT / "configs").iterdir() if d.is_dir()}
    assert set(table["packages"]) == code | recipe_folders | {"hrm_mega.configs", "hrm_mega.launch.slurm"}
    assert table["package-dir"] == {"hrm_mega.configs": "configs", "hrm_mega.launch.slurm": "launch/slurm"}
    assert not any(name.split(".")[0] in GENERIC for name in table["packages"])


def test_the_top_level_folders_are_not_packages():
    for folder in GENERIC:
        assert (ROOT / folder).is_dir(), folder
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must not be a package"


def test_every_entry_point_has_a_thin_script_that_runs_it():
    entry = ROOT / "hrm_mega/entry"
    modules = {p.stem for p in entry.glob("*.py")} - {"__init__", "common"}
    scripts = {p.stem: p.read_text() for p in (ROOT / "pipelines").glob("*.py")}
    assert set(scripts) == modules
    for name, text in scripts.items():
        assert f"from hrm_mega.entry.{name} import main\n" in text, name
        assert len(text.splitlines()) <= 10, f"pipelines/{name}.py is more than a thin script"


def test_resources_are_found_in_a_checkout():
    assert recipes_dir() == ROOT / "configs"
    assert recipe("puzzle/hrm_sudoku_demo.yaml").is_file()
    assert sorted(p.name for p in slurm_scripts_dir().iterdir()) == ["pretrain.sbatch", "rl.sbatch"]


def run(cmd: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow  # about 25 s: a wheel build, a venv, and three commands that import hrm_mega
def test_a_wheel_installs_only_hrm_mega_and_ships_the_recipes(tmp_path):
    """Builds a wheel from a copy of the sources (no network: --no-index, the build backend of this
    environment), installs it into a fresh venv, and uses it from a directory outside the repository."""
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    for name in ("hrm_mega", "configs", *GENERIC):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src],
        tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("hrm_mega-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"hrm_mega"}

    # A venv that sees this environment's packages (torch, yaml, ...) through a plain path line: a .pth
    # line adds the folder but does not run the .pth files in it, so an editable install of this or
    # another checkout of hrm-mega stays out of sight.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin/python"
    site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).stdout.strip()
    )
    here = sysconfig.get_paths()
    (site / "_outer_env.pth").write_text("\n".join(dict.fromkeys([here["purelib"], here["platlib"]])) + "\n")
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    probe = (
        "import importlib.util, json, hrm_mega.resources as r\n"
        "def where(name):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    return None if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]\n"
        f"print(json.dumps({{'generic': {{n: where(n) for n in {GENERIC!r}}}, 'package': r.PACKAGE.as_posix(),\n"
        "    'recipes': r.recipes_dir().as_posix(), 'slurm': r.slurm_scripts_dir().as_posix()}))\n"
    )
    found = json.loads(run([python, "-c", probe], outside, env).stdout)
    installed = Path(found["package"])
    assert installed.is_relative_to(venv), installed
    for name, places in found["generic"].items():  # absent, or someone else's package: never ours
        for place in filter(None, places or []):
            assert not Path(place).is_relative_to(venv) and not Path(place).is_relative_to(src), (name, place)
    assert Path(found["recipes"]) == installed / "configs"
    assert Path(found["slurm"]) == installed / "launch/slurm"
    assert (installed / "configs/puzzle/hrm_sudoku_tiny.yaml").is_file()

    hrm_mega = venv / "bin/hrm-mega"
    assert "launch" in run([hrm_mega, "--help"], outside, env).stdout
    # the planner reads a shipped recipe and names the shipped sbatch script
    recipe_path = installed / "configs/puzzle/hrm_sudoku_tiny.yaml"
    plan = run(
        [hrm_mega, "launch", "--launcher", "slurm", "--nodes", "2", "--dry-run", recipe_path], outside, env
    )
    command = plan.stdout.replace(" \\\n    ", " ")  # undo the wrapping
    assert f"sbatch --nodes 2 --ntasks-per-node 1 {installed / 'launch/slurm/pretrain.sbatch'} " in command
