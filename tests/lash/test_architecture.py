"""The package's shape: every ``lash`` module imports, none takes part in an import cycle, none is too long."""

import ast
import importlib
from pathlib import Path

import pytest

import lash

PACKAGE = Path(lash.__file__).parent
MODULES = {
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
    for path in sorted(PACKAGE.rglob("*.py"))
}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """The ``lash`` modules ``module`` imports at run time, function-level imports included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return  # annotations only: never executed
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"lash.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle():
    # A package imports its submodules, which import the package back for nothing else: leave
    # the edges into a package's own __init__ out (``lash.modules`` → ``lash.modules.attention``).
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            walk(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_models_import_no_routing_nor_generation():
    # routing and generation take a model as an argument; a model never reaches back for them.
    reached, todo = set(), ["lash.models"]
    while todo:
        for dep in GRAPH[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not reached & {"lash.routing", "lash.generation"}, sorted(reached)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_are_short_enough_to_read(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= 500, f"{module} has {lines} lines (at most 500)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_classes_are_short_enough_to_read(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 250, f"{module}.{node.name} has {lines} lines (at most 250)"
