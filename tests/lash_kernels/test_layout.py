"""The package's layout rules: no module hidden behind a same-named attribute, small files and
classes, and an acyclic import graph (function-level imports included)."""

import ast
import importlib
from pathlib import Path

import lash_kernels

ROOT = Path(lash_kernels.__file__).parent
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 250


def _modules() -> dict[str, Path]:
    """Every module of ``lash_kernels`` by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("lash_kernels", *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def test_no_module_is_shadowed_by_a_package_attribute():
    shadowed = []
    for name in MODULES:
        if "." not in name:
            continue
        parent, _, child = name.rpartition(".")
        module = importlib.import_module(name)
        attribute = getattr(importlib.import_module(parent), child)
        if attribute is not module:
            shadowed.append(f"{name} (the attribute is {attribute!r})")
    assert not shadowed, f"attributes named like a submodule: {shadowed}"


def test_files_and_classes_stay_small():
    too_long = []
    for name, path in MODULES.items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, f"over {MAX_FILE_LINES} lines per file or {MAX_CLASS_LINES} per class: {too_long}"


def _imports(name: str, path: Path) -> set[str]:
    """The ``lash_kernels`` modules that ``name`` imports anywhere in its file, or names in a string
    of its own (what ``importlib.import_module`` loads, as aot_check's ``OPS``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from package import submodule`` depends on the submodule, else on the module itself.
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            targets.add(node.value)
    return {t for t in targets if t in MODULES and t != name}


def test_no_import_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(name: str, stack: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*stack, name, target]
            if target not in state and (cycle := visit(target, [*stack, name])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])
