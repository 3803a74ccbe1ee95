"""The package's layer order, read from its source with `ast` (the package itself is never imported).

Layers, top to bottom; a module may import transfer modules of its own layer or of layers below it:

    command  transfer (the package __init__), transfer.__main__, transfer.api, transfer.cli[.*]
    export   transfer.exports[.*]  (the package is plural: `transfer.export` is the API function)
    engine   transfer.engine.*
    tasks    transfer.tasks.*
    parts    transfer.data.*, transfer.models.*, transfer.metrics.*
    ground   transfer.errors, transfer.files, transfer.config, transfer.checkpoint, transfer.distributed,
             transfer.resources

Each test lists every offending file:line, so one run shows everything there is to fix.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "transfer"
LAYERS = ("command", "export", "engine", "tasks", "parts", "ground")  # top to bottom
# The name right under transfer decides the layer, for a module and for everything inside a package.
PLACES = {
    "__main__": "command", "api": "command", "cli": "command",
    "exports": "export",
    "engine": "engine",
    "tasks": "tasks",
    "data": "parts", "models": "parts", "metrics": "parts", "trackers": "parts",
    "errors": "ground", "files": "ground", "config": "ground", "checkpoint": "ground", "distributed": "ground",
    "resources": "ground",
}


@dataclass(frozen=True)
class Import:
    """One transfer module loaded by one import statement (a statement naming two modules gives two)."""

    path: str  # the importing file, relative to the repository root
    line: int
    importer: str
    target: str  # the module named explicitly; a parent package loaded on the way is not counted
    names: tuple[str, ...]  # names taken from target (`from target import a, b`); empty for a module
    binds: str | None  # the local (dotted) name bound to target, when target is a module
    text: str
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:`, so it never runs


@dataclass
class Module:
    name: str
    path: str
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


def module_name(path: str) -> tuple[str, bool]:
    """Dotted name of a file such as transfer/data/loaders.py, and whether it is a package __init__."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return "command" if parts == ["transfer"] else PLACES.get(parts[1])


def is_private(name: str) -> bool:
    """`_name` is private to its module; `__dunder__` names are public protocol."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def in_transfer(module: str | None) -> bool:
    return module is not None and (module == "transfer" or module.startswith("transfer."))


class _Collector(ast.NodeVisitor):
    """Records the transfer imports of one module, noting whether each sits in a function or TYPE_CHECKING."""

    def __init__(self, module: Module, is_package: bool, known: set[str]) -> None:
        self.module, self.known = module, known
        parts = module.name.split(".")
        self.package = parts if is_package else parts[:-1]  # what `from . import x` is relative to
        self.in_function = self.type_checking = False

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.in_function = self.in_function, True
        self.generic_visit(node)
        self.in_function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if dotted(node.test) not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return self.generic_visit(node)
        outer, self.type_checking = self.type_checking, True
        for statement in node.body:
            self.visit(statement)
        self.type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def add(self, node: ast.stmt, target: str, names: tuple[str, ...], binds: str | None, text: str) -> None:
        self.module.imports.append(Import(self.module.path, node.lineno, self.module.name, target, names, binds,
                                          text, self.in_function, self.type_checking))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if in_transfer(alias.name):
                self.add(node, alias.name, (), alias.asname or alias.name, ast.unparse(ast.Import([alias])))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module
        if node.level:
            if node.level - 1 >= len(self.package):
                return  # beyond the top-level package: Python refuses it anyway
            base = ".".join(self.package[:len(self.package) - node.level + 1] + ([node.module] if node.module else []))
        if not in_transfer(base):
            return
        taken = []
        for alias in node.names:
            if f"{base}.{alias.name}" in self.known:  # a submodule, not a name defined in base
                text = ast.unparse(ast.ImportFrom(node.module, [alias], node.level))
                self.add(node, f"{base}.{alias.name}", (), alias.asname or alias.name, text)
            else:
                taken.append(alias)
        if taken:
            text = ast.unparse(ast.ImportFrom(node.module, taken, node.level))
            self.add(node, base, tuple(alias.name for alias in taken), None, text)


def parse(files: Mapping[str, str]) -> dict[str, Module]:
    """Every module of {path relative to the repository root: source}, with its transfer imports."""
    known = {module_name(path)[0] for path in files}
    modules = {}
    for path, source in sorted(files.items()):
        name, is_package = module_name(path)
        module = modules[name] = Module(name, path, ast.parse(source, filename=path))
        _Collector(module, is_package, known).visit(module.tree)
    return modules


def unplaced(modules: dict[str, Module]) -> list[str]:
    return [f"{m.path} ({m.name}): no layer; place it in PLACES" for m in modules.values() if not layer_of(m.name)]


def upward_imports(modules: dict[str, Module]) -> list[str]:
    """Imports that reach a higher layer. Modules without a layer are left to test_every_module_has_a_layer."""
    found = []
    for i in (i for m in modules.values() for i in m.imports if not i.type_checking):
        low, high = layer_of(i.importer), layer_of(i.target)
        if low and high and LAYERS.index(high) < LAYERS.index(low):
            found.append(f"{i.path}:{i.line}: {i.text}  ({low} {i.importer} -> {high} {i.target})")
    return found


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that all reach each other (a cycle when more than one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for after in sorted(graph[node]):
            if after not in index:
                visit(after)
                low[node] = min(low[node], low[after])
            elif after in stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            group = stack[stack.index(node):]
            del stack[stack.index(node):]
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def shortest_cycle(graph: Mapping[str, set[str]], start: str) -> list[str]:
    """A shortest path from start back to start, found breadth first: one cycle to read, among maybe many."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for after in sorted(graph[node]):
            if after == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if after not in came_from:
                came_from[after] = node
                queue.append(after)
    return []


def cycles(modules: dict[str, Module]) -> list[str]:
    """Counts every import that runs, in functions too: a lazy import still ties the two modules together."""
    running = [i for m in modules.values() for i in m.imports
               if not i.type_checking and i.target in modules and i.target != i.importer]
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for i in running:
        graph[i.importer].add(i.target)
    found = []
    for group in (g for g in strongly_connected(graph) if len(g) > 1):
        members = set(group)
        found.append(f"cycle among {', '.join(group)}\n  e.g. {' -> '.join(shortest_cycle(graph, group[0]))}\n"
                     "  imports inside it:")
        found += [f"    {i.path}:{i.line}: {i.text}" for i in running if i.importer in members and i.target in members]
    return found


def function_imports(modules: dict[str, Module]) -> list[str]:
    """Lazy imports hide a dependency from the module's header; only the command layer needs them."""
    return [f"{i.path}:{i.line}: {i.text}" for m in modules.values() for i in m.imports
            if i.in_function and layer_of(m.name) != "command"]


def private_uses(modules: dict[str, Module]) -> list[str]:
    """`from transfer.x import _name` and `x._name` through an imported module reach into another module."""
    found = []
    for m in modules.values():
        for i in m.imports:
            if i.target != m.name and (hidden := [n for n in i.names if is_private(n)]):
                found.append(f"{i.path}:{i.line}: {i.text}  (private: {', '.join(hidden)})")
        bound = {i.binds: i.target for i in m.imports if i.binds and i.target != m.name}
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr) and dotted(node.value) in bound:
                found.append(f"{m.path}:{node.lineno}: {ast.unparse(node)}  ({dotted(node.value)} is "
                             f"{bound[dotted(node.value)]})")
    return sorted(set(found), key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


def fail_on(problems: list[str], headline: str) -> None:
    if problems:
        pytest.fail(f"{headline}:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    return parse({path.relative_to(REPO).as_posix(): path.read_text(encoding="utf-8")
                  for path in sorted(PACKAGE.rglob("*.py"))})


def test_every_module_has_a_layer(package: dict[str, Module]) -> None:
    fail_on(unplaced(package), "modules outside the layer table (a new top-level module is placed deliberately)")


def test_imports_follow_the_layer_order(package: dict[str, Module]) -> None:
    fail_on(upward_imports(package), f"imports of a higher layer (order, top to bottom: {' > '.join(LAYERS)})")


def test_no_import_cycles(package: dict[str, Module]) -> None:
    fail_on(cycles(package), "import cycles (imports inside functions count)")


def test_no_imports_inside_functions(package: dict[str, Module]) -> None:
    fail_on(function_imports(package), "transfer imports inside functions outside the command layer; "
            "move them to the top of the module")


def test_no_private_names_across_modules(package: dict[str, Module]) -> None:
    fail_on(private_uses(package), "private names used from another module; make them public or move the code")


def test_the_rules_can_fail() -> None:
    """Each rule catches a small synthetic offence, so a green run means a clean package, not a blind parser."""
    modules = parse({
        "transfer/__init__.py": "",
        "transfer/errors.py": "from transfer.data import loaders\n",
        "transfer/data/__init__.py": "",
        "transfer/data/loaders.py": "from .. import errors\nfrom ..errors import _hidden, __doc__\n"
                                    "def load():\n    import transfer.models.backbone as bb\n    return bb._build()\n",
        "transfer/models/__init__.py": "",
        "transfer/models/backbone.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from transfer.cli import main\n",
        "transfer/stray.py": "import json\n",
    })
    assert [i.target for i in modules["transfer.data.loaders"].imports] == [
        "transfer.errors", "transfer.errors", "transfer.models.backbone"]
    assert unplaced(modules) == ["transfer/stray.py (transfer.stray): no layer; place it in PLACES"]
    assert upward_imports(modules) == [
        "transfer/errors.py:1: from transfer.data import loaders"
        "  (ground transfer.errors -> parts transfer.data.loaders)"]
    assert cycles(modules) == [
        "cycle among transfer.data.loaders, transfer.errors\n"
        "  e.g. transfer.data.loaders -> transfer.errors -> transfer.data.loaders\n  imports inside it:",
        "    transfer/data/loaders.py:1: from .. import errors",
        "    transfer/data/loaders.py:2: from ..errors import _hidden, __doc__",
        "    transfer/errors.py:1: from transfer.data import loaders"]
    assert function_imports(modules) == ["transfer/data/loaders.py:4: import transfer.models.backbone as bb"]
    assert private_uses(modules) == [
        "transfer/data/loaders.py:2: from ..errors import _hidden, __doc__  (private: _hidden)",
        "transfer/data/loaders.py:5: bb._build  (bb is transfer.models.backbone)"]
