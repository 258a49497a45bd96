"""What a remote-code (`trust_remote_code`) export ships: hrm-mega's model sources plus a thin HF wrapper.

There is one implementation of every model, in hrm_mega/models. The export copies the modules that
lm.py, puzzle.py and kv_cache.py need (found by following their `hrm_mega` imports) into the export
directory as flat files, rewriting `from hrm_mega.models.layers import X` into `from .layers import X` and
`from hrm_mega import distributed` into `from . import distributed`, and adds the two wrapper files of
this package: configuration_hrm_mega.py (the HF config) and modeling_hrm_mega.py (the HF model
classes). transformers loads the wrapper, which imports the copies; hrm-mega need not be installed.
Of hrm-mega's config only the model section travels (hrm_mega/config/model.py and the schema.py it
builds on): no run, train, optim or RL section, and no YAML loading. Imports under `if TYPE_CHECKING:`
name types for annotations only; they are not followed, and become `pass` in the copies.

`ship_model_code` checks what transformers will do with the directory: its loader copies only the files
it reaches through `from .module import` lines, and imports every third-party package that the
entry file names (outside try blocks) to check it is installed. So every shipped module must be
reachable that way, and no shipped module may import a package beyond torch, numpy, safetensors and
transformers when it is imported (imports inside functions, such as megatron-core's for
tensor parallelism, run only when that code path does).

These files are templates: the wrapper's relative imports resolve only inside an export.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

PACKAGE = "hrm_mega"
# kv_cache: lm.py names KVCache for annotations only, but the wrapper decodes against it (generate())
MODEL_ROOTS = ("hrm_mega.models.lm", "hrm_mega.models.puzzle", "hrm_mega.models.kv_cache")
WRAPPER_FILES = ("configuration_hrm_mega.py", "modeling_hrm_mega.py")
ENTRY = "modeling_hrm_mega.py"
# Importable wherever transformers is: its own dependencies, plus torch.
LOAD_TIME_PACKAGES = frozenset({"torch", "numpy", "safetensors", "transformers", "huggingface_hub"})

CONFIG_CLASS = "configuration_hrm_mega.HRMMegaConfig"
LM_CLASS = "HRMGemmaForCausalLM"
PUZZLE_CLASS = "RecursiveReasonerModel"


class ShippingError(ValueError):
    """The model sources cannot be shipped as a self-contained directory; the message names the module."""


def auto_map(family: str) -> dict[str, str]:
    """config.json's auto_map for a model family: which shipped class each Auto class loads."""
    if family == "hrm_gemma":
        model = f"modeling_hrm_mega.{LM_CLASS}"
        return {"AutoConfig": CONFIG_CLASS, "AutoModel": model, "AutoModelForCausalLM": model}
    return {"AutoConfig": CONFIG_CLASS, "AutoModel": f"modeling_hrm_mega.{PUZZLE_CLASS}"}


def ship_model_code(out_dir: str | Path) -> list[Path]:
    """Writes the model sources and the wrapper into out_dir; returns the files written."""
    out = Path(out_dir)
    modules = source_closure(MODEL_ROOTS)
    flat = flat_names(modules)
    root = Path(importlib.util.find_spec(PACKAGE).origin).parent.parent
    written = []
    for name, path in modules.items():
        source = rewrite_imports(path.read_text(), flat, where=name)
        header = (
            f"# Shipped by `hrm-mega export-hf`: {path.relative_to(root).as_posix()} with its hrm_mega "
            "imports made relative.\n"
        )
        written.append(out / f"{flat[name]}.py")
        written[-1].write_text(header + source)
    here = Path(__file__).parent
    for name in WRAPPER_FILES:
        written.append(out / name)
        written[-1].write_text((here / name).read_text())
    check_loadable(out, written)
    return written


# --------------------------------------------------------------------------------------------------
# Finding and rewriting the sources
# --------------------------------------------------------------------------------------------------


def source_closure(roots: tuple[str, ...]) -> dict[str, Path]:
    """Every hrm_mega module the roots import, directly or not (module name -> file), in a stable order."""
    found: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        name = pending.pop(0)
        if name in found:
            continue
        found[name] = _module_file(name)
        tree = ast.parse(found[name].read_text(), filename=str(found[name]))
        type_only = _type_only_imports(tree)
        for node in ast.walk(tree):
            if node not in type_only:
                pending.extend(target for target, _ in _hrm_imports(node, where=name))
    return dict(sorted(found.items()))


def flat_names(modules: dict[str, Path]) -> dict[str, str]:
    """Module name -> file stem in the flat export directory (its last component, which must be unique)."""
    flat: dict[str, str] = {}
    for name in modules:
        stem = name.rsplit(".", 1)[-1]
        clash = next((other for other, s in flat.items() if s == stem), None)
        if clash is not None or f"{stem}.py" in WRAPPER_FILES:
            raise ShippingError(f"{name} and {clash or 'the HF wrapper'} would both ship as {stem}.py")
        flat[name] = stem
    return flat


def rewrite_imports(source: str, flat: dict[str, str], where: str) -> str:
    """The source with every `hrm_mega` import made relative to the flat directory; nothing else changes."""
    lines = source.splitlines(keepends=True)
    edits = []
    tree = ast.parse(source)
    type_only = _type_only_imports(tree)
    for node in ast.walk(tree):
        targets = _hrm_imports(node, where)
        if not targets:
            continue
        assert isinstance(node, ast.ImportFrom)
        module = targets[0][0]
        if node in type_only:  # names for annotations only, which stay strings: not shipped
            if not _postpones_annotations(tree):
                raise ShippingError(
                    f"{where}: an `if TYPE_CHECKING:` import of hrm_mega code needs "
                    "`from __future__ import annotations` to be shipped"
                )
            statement = f"pass  # type-only import of {module.rsplit('.', 1)[-1]} (not shipped)"
        elif targets[0][1] is None:  # from hrm_mega.x.y import names
            statement = f"from .{flat[module]} import {_names(node.names)}"
        else:  # from hrm_mega(.x) import submodule [as alias], ...
            statement = "from . import " + ", ".join(
                flat[target] if flat[target] == alias else f"{flat[target]} as {alias}"
                for target, alias in targets
            )
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, statement))
    for start, col, end, end_col, statement in sorted(edits, reverse=True):
        first, last = lines[start - 1], lines[end - 1]
        lines[start - 1 : end] = [first[:col] + statement + last[end_col:]]
    return "".join(lines)


def _hrm_imports(node: ast.AST, where: str) -> list[tuple[str, str | None]]:
    """For an import of hrm_mega code: (module, None) for `from hrm_mega.x.y import names`, or one
    (module, bound name) per submodule for `from hrm_mega.x import y, z`. Empty for other nodes."""
    if isinstance(node, ast.Import):
        bad = next((a.name for a in node.names if a.name.split(".")[0] == PACKAGE), None)
        if bad is not None:
            raise ShippingError(f"{where}: `import {bad}` cannot be shipped; use `from {bad} import ...`")
        return []
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        raise ShippingError(f"{where}: relative imports cannot be shipped; use absolute hrm_mega imports")
    if node.module is None or node.module.split(".")[0] != PACKAGE:
        return []
    if not _is_package(node.module):
        return [(node.module, None)]
    targets = []
    for alias in node.names:
        target = f"{node.module}.{alias.name}"
        if importlib.util.find_spec(target) is None:
            raise ShippingError(
                f"{where}: `from {node.module} import {alias.name}` takes a name from a package __init__, "
                "which is not shipped; import it from its module"
            )
        targets.append((target, alias.asname or alias.name))
    return targets


def _type_only_imports(tree: ast.Module) -> set[ast.AST]:
    """The import statements inside `if TYPE_CHECKING:` blocks (they never run)."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            found.update(n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.ImportFrom))
    return found


def _postpones_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )


def _names(aliases: list[ast.alias]) -> str:
    return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ShippingError(f"cannot find the source of {module}")
    return Path(spec.origin)


# --------------------------------------------------------------------------------------------------
# What transformers will do with the directory
# --------------------------------------------------------------------------------------------------


def check_loadable(out: Path, files: list[Path]) -> None:
    """Every shipped file is reached by transformers' relative-import scan from the entry file, and no
    shipped module imports anything beyond LOAD_TIME_PACKAGES and the standard library when imported."""
    from transformers.dynamic_module_utils import get_relative_import_files

    reached = {Path(f).resolve() for f in get_relative_import_files(str(out / ENTRY))} | {
        (out / ENTRY).resolve()
    }
    missed = sorted(f.name for f in files if f.resolve() not in reached)
    if missed:
        raise ShippingError(
            f"transformers would not copy {missed[0]} when loading the export (no `from .{missed[0][:-3]} "
            "import ...` line reaches it); import from it by name somewhere in the shipped code"
        )
    for f in files:
        for package in sorted(
            _load_time_imports(f.read_text()) - LOAD_TIME_PACKAGES - sys.stdlib_module_names
        ):
            raise ShippingError(
                f"{f.name} imports {package} when it is imported; the export must not need it"
            )


def hub_only_requirements(files: list[Path]) -> dict[str, list[str]]:
    """Packages beyond LOAD_TIME_PACKAGES that transformers makes a user install before loading the export
    from the Hub, by file. Loaded from a local directory only the entry file is checked; from the Hub
    every file is, counting imports inside functions too (all but those in try blocks)."""
    from transformers.dynamic_module_utils import get_imports

    found = {}
    for f in files:
        extra = sorted(set(get_imports(str(f))) - LOAD_TIME_PACKAGES - sys.stdlib_module_names)
        if extra:
            found[f.name] = extra
    return found


def _load_time_imports(source: str) -> set[str]:
    """Top-level packages a module imports as it is imported: module-level statements (including
    those inside if/with blocks), not function bodies, try blocks or `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.If) and not (
                isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            ):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(source).body)
    return found
