"""Imports in hrm_mega point one way: down the layer order below, with no cycles (see docs/architecture.md).

The checker (tests/import_graph.py) reads the source with ast; its own tests run it on small packages
written here, so that a broken checker cannot pass hrm_mega by finding nothing.
"""

from pathlib import Path

import pytest
from import_graph import check, read_imports

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top; a module may import its own layer or lower ones. Adding a layer is one line.
LAYERS: list[tuple[str, ...]] = [
    ("hrm_mega.resources",),  # where the shipped recipes and sbatch files are
    ("hrm_mega.config",),
    ("hrm_mega.distributed",),  # process groups, seeds, collectives
    ("hrm_mega.launch",),  # launch planning: layouts, hosts, launcher commands
    ("hrm_mega.data",),
    ("hrm_mega.prep",),  # shard builders (data_prep)
    ("hrm_mega.optim",),
    ("hrm_mega.models",),  # the KV cache included
    ("hrm_mega.checkpoint",),  # checkpoint I/O, below both training and convert
    ("hrm_mega.inference", "hrm_mega.convert"),
    ("hrm_mega.rl",),
    ("hrm_mega.training",),
    ("hrm_mega.cli", "hrm_mega.entry"),  # the CLI and the entry points that launchers start
]
# Top-level folders of the repository that hold entry scripts; the library never imports them.
FORBIDDEN = ("pipelines", "launch", "data_prep")


def test_hrm_mega_imports_point_down_without_cycles():
    problems = check(ROOT, "hrm_mega", LAYERS, FORBIDDEN)
    assert not problems, f"{len(problems)} import problem(s):\n" + "\n".join(problems)


def test_the_graph_sees_hrm_mega_imports():
    # A reader that found no edges would pass everything: check that known imports are seen.
    modules, edges = read_imports(ROOT, "hrm_mega")
    seen = {(e.source, e.target) for e in edges}
    assert ("hrm_mega.models.lm", "hrm_mega.models.recurrence") in seen  # module level
    assert ("hrm_mega.models", "hrm_mega.models.lm") in seen  # inside a function
    assert ("hrm_mega.cli", "hrm_mega.config") in seen
    assert len(modules) > 40


# --------------------------------------------------------------------------------------------------
# The checker on synthetic packages
# --------------------------------------------------------------------------------------------------

TOY_LAYERS = [("toy.base",), ("toy.mid", "toy.side"), ("toy.top",)]


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Writes toy/<path> for each entry (plus toy/__init__.py) and returns root."""
    files = {"__init__.py": "", **files}
    for name, source in files.items():
        path = root / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


CLEAN = {
    "base.py": "import os\n",
    "mid/__init__.py": "from toy.mid.inner import f\n",
    "mid/inner.py": "from toy import base\n\ndef f():\n    from ..base import os\n",
    "side.py": "from toy.mid import f\n",  # same layer: allowed
    "top.py": (
        "from typing import TYPE_CHECKING\nimport toy.side\n"
        "if TYPE_CHECKING:\n    from toy.top import nothing  # never runs: not an edge\n"
    ),
}


def test_checker_passes_a_clean_package(tmp_path):
    assert check(write_package(tmp_path, CLEAN), "toy", TOY_LAYERS, ["scripts"]) == []


def test_checker_reports_a_cycle_through_a_lazy_import(tmp_path):
    files = {**CLEAN, "side.py": "from toy.mid import f\n", "mid/inner.py": "def g():\n    import toy.side\n"}
    problems = check(write_package(tmp_path, files), "toy", TOY_LAYERS)
    assert problems == [
        "import cycle: toy.mid -> toy.mid.inner -> toy.side -> toy.mid "
        "(toy/mid/__init__.py:1, toy/mid/inner.py:2, toy/side.py:1)",
        "package cycle: toy.mid -> toy.side -> toy.mid (toy/mid/inner.py:2, toy/side.py:1)",
    ]


def test_checker_reports_a_cycle_between_packages_of_one_layer(tmp_path):
    # toy.side -> toy.mid (__init__) and toy.mid.other -> toy.side: no module cycle, but the two depend on
    # each other.
    files = {**CLEAN, "mid/other.py": "import toy.side\n"}
    problems = check(write_package(tmp_path, files), "toy", TOY_LAYERS)
    assert problems == ["package cycle: toy.mid -> toy.side -> toy.mid (toy/mid/other.py:1, toy/side.py:1)"]


def test_checker_reports_an_upward_import(tmp_path):
    files = {**CLEAN, "top.py": "", "side.py": "def helper():\n    from toy.top import g\n"}
    problems = check(write_package(tmp_path, files), "toy", TOY_LAYERS)
    assert problems == [
        "toy/side.py:2: toy.side (toy.mid + toy.side) imports toy.top (toy.top), a higher layer"
    ]


@pytest.mark.parametrize(
    "source",
    [
        "import scripts.run\n",
        "from scripts import run\n",
        "import importlib\nimportlib.import_module('scripts.run')\n",
        "from importlib import import_module\n\ndef f(m):\n    return import_module(f'scripts.{m}')\n",
    ],
)
def test_checker_reports_a_forbidden_package(tmp_path, source):
    problems = check(write_package(tmp_path, {**CLEAN, "top.py": source}), "toy", TOY_LAYERS, ["scripts"])
    assert len(problems) == 1 and "toy.top imports scripts, which toy must not import" in problems[0]


def test_checker_reports_a_module_in_no_layer(tmp_path):
    problems = check(write_package(tmp_path, {**CLEAN, "extra.py": ""}), "toy", TOY_LAYERS)
    assert problems == ["toy.extra is in no layer; add it to the layer order"]
