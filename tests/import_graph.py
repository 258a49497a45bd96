"""The import graph of a Python package, read from its source with `ast`, checked against a layer order.

Nothing is imported: every `import` and `from ... import` statement in every module is read, including
those inside functions (a lazy import is still a dependency), except those under `if TYPE_CHECKING:`
(never run). `importlib.import_module("pkg.mod")` with a literal name (or an f-string whose literal
start names the package) counts too. An import of a package module resolves to the deepest module that
exists (`from pkg.models import build_model` -> pkg.models; `from pkg import distributed` ->
pkg.distributed).

`check` reports, one line each:
- every import cycle between modules (one per strongly connected component, with one cycle through it),
  and every cycle between the package's direct subpackages/modules (`pkg.a.x -> pkg.b.y` and
  `pkg.b.z -> pkg.a.w` make pkg.a and pkg.b depend on each other, with no module cycle);
- every import of a module in a higher layer than the importer's;
- every module that belongs to no layer (so a new package must be placed on purpose);
- every import of a forbidden top-level package.

A layer is a tuple of module-name prefixes ("pkg.models" covers pkg/models.py or pkg/models/**); the
longest matching prefix places a module. Modules of one layer may import each other (cycles aside). The
package's own __init__ runs before any of its modules, so it belongs to the bottom layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `file`:`line`. `target` is a module of the package, or for an import
    from outside it the imported top-level name."""

    source: str
    target: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every .py file of root/package (packages by their __init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def read_imports(root: Path, package: str) -> tuple[dict[str, Path], list[Edge]]:
    """The package's modules and every import edge out of them (into the package or not)."""
    modules = find_modules(root, package)
    edges: dict[tuple[str, str, int], Edge] = {}
    for name, path in modules.items():
        file = path.relative_to(root).as_posix()
        is_package = path.name == "__init__.py"
        for line, target in _imported_names(ast.parse(path.read_text(), filename=file), name, is_package):
            top = target.split(".")[0]
            resolved = _deepest_module(target, modules) if top == package else top
            edges.setdefault((name, resolved, line), Edge(name, resolved, file, line))
    return modules, list(edges.values())


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterable[tuple[int, str]]:
    """(line, absolute dotted name) for each name an import statement reaches, skipping TYPE_CHECKING."""
    here = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterable[tuple[int, str]]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` in pkg/a/b.py -> pkg.a.x.y
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from pkg import mod` imports the module pkg.mod if it exists, else a name of pkg
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            name = _literal_prefix(node.args[0])
            if name:
                yield node.lineno, name
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "import_module") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )


def _literal_prefix(arg: ast.expr) -> str:
    """The dotted module name a literal (or the literal start of an f-string) spells, else ''."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return ""


def _deepest_module(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def layer_of(module: str, layers: Sequence[Sequence[str]], package: str) -> int | None:
    """Index (0 = bottom) of the layer whose longest prefix matches the module, or None."""
    if module == package:
        return 0
    best, best_len = None, -1
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def find_cycles(edges: Iterable[Edge]) -> list[tuple[list[Edge], set[str]]]:
    """For each strongly connected component of more than one module: one shortest cycle through it (as
    its edges) and all its modules, in a stable order."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, {}).setdefault(e.target, e)
            graph.setdefault(e.target, {})
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            start = min(component)
            cycles.append((_shortest_cycle(graph, start, component), component))
    return sorted(cycles, key=lambda c: c[0][0].source)


def _strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (a deep package must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _shortest_cycle(graph: dict[str, dict[str, Edge]], start: str, component: set[str]) -> list[Edge]:
    """Breadth-first search from start back to start, inside the component."""
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in component:
                    continue
                if target == start:
                    path = [graph[node][target]]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if target not in came_from:
                    came_from[target] = graph[node][target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _unit(module: str, package: str) -> str:
    """The direct child of the package that holds the module (pkg.models.lm -> pkg.models)."""
    return ".".join(module.split(".")[:2]) if module != package else package


def check(
    root: Path,
    package: str,
    layers: Sequence[Sequence[str]],
    forbidden: Iterable[str] = (),
    layer_names: Sequence[str] | None = None,
) -> list[str]:
    """Every problem in root/package's imports, one line each (empty when it obeys the rules)."""
    names = list(layer_names) if layer_names else [" + ".join(p) for p in layers]
    modules, edges = read_imports(root, package)
    problems = []
    inside = [e for e in edges if e.target in modules]
    units = [Edge(_unit(e.source, package), _unit(e.target, package), e.file, e.line) for e in inside]
    for kind, cycles in (("import cycle", find_cycles(inside)), ("package cycle", find_cycles(units))):
        for cycle, component in cycles:
            path = " -> ".join([cycle[0].source] + [e.target for e in cycle])
            more = sorted(component - {e.source for e in cycle})
            also = f"; also in the same cycle group: {', '.join(more)}" if more else ""
            problems.append(f"{kind}: {path} ({', '.join(e.where for e in cycle)}){also}")
    for module in sorted(modules):
        if layer_of(module, layers, package) is None:
            problems.append(f"{module} is in no layer; add it to the layer order")
    forbidden = set(forbidden)
    for e in edges:
        if e.target in forbidden:
            problems.append(f"{e.where}: {e.source} imports {e.target}, which {package} must not import")
        if e.target not in modules:
            continue
        low, high = layer_of(e.source, layers, package), layer_of(e.target, layers, package)
        if low is not None and high is not None and high > low:
            problems.append(
                f"{e.where}: {e.source} ({names[low]}) imports {e.target} ({names[high]}), a higher layer"
            )
    return problems
