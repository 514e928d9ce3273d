"""The shape of both packages, ``lash`` and ``lash_kernels``: every module imports; no import
cycle (function-level imports, ``TYPE_CHECKING`` imports and dotted module paths in strings, as
``importlib`` loads them, count); nothing private imported across packages, and ``lash`` imports
``lash_kernels``' public names only; ``lash.models`` never reaches back for routing or generation;
no module hidden behind a same-named package attribute; no free function of ``lash.trainer``
that takes the trainer (a method in hiding); files of at most 500 lines and classes of at most 250."""

import ast
import importlib
from pathlib import Path

import pytest

import lash
import lash_kernels

MAX_FILE_LINES = 500
MAX_CLASS_LINES = 250


def _modules(package) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (a package by its ``__init__.py``)."""
    root = Path(package.__file__).parent
    return {
        ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(root.rglob("*.py"))
    }


MODULES = {**_modules(lash), **_modules(lash_kernels)}


def _imports(module: str, path: Path) -> set[str]:
    """The modules ``module`` imports, at run time or for annotations (``TYPE_CHECKING``): a
    circle held apart by annotations is still a circle for a reader. Edges into its own enclosing
    packages are left out: a package imports its submodules, which import the package back for
    nothing else."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # ``from package import submodule`` loads the submodule, anything else the module itself.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            found.add(node.value)  # a dotted module path, as tools.aot_check's OPS hands to importlib
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != module and not module.startswith(name + ".")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _import(module: str):
    if module.startswith("lash.hf"):
        pytest.importorskip("transformers")  # the optional `hf` extra
    return importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"lash.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(module):
    _import(module)


def test_no_import_cycle():
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for dep in sorted(GRAPH[module]):
            walk(dep, path + [module])
        done.add(module)

    for module in sorted(GRAPH):
        walk(module, [])


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_private_is_imported_across_packages(module):
    """A name with a leading underscore stays in its package; a private module (``_launch``)
    stays in its top-level package (``lash`` uses ``lash_kernels``' public names only)."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level or node.module not in MODULES:
            continue
        names = [alias.name for alias in node.names if _private(alias.name)]
        assert not names or _package(node.module) == _package(module), f"{module} imports {names} from {node.module}"
        if node.module.split(".")[0] != module.split(".")[0]:
            assert not any(_private(part) for part in node.module.split(".")), f"{module} imports the private {node.module}"


def test_no_free_function_of_the_trainer_takes_the_trainer():
    for node in ast.parse(MODULES["lash.trainer"].read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.args.args:
            first = node.args.args[0]
            annotation = ast.unparse(first.annotation) if first.annotation else ""
            assert first.arg != "trainer" and "Trainer" not in annotation, f"lash.trainer.{node.name} takes the trainer"


def test_the_kernels_never_import_lash():
    assert not {dep for m in GRAPH if m.startswith("lash_kernels") for dep in GRAPH[m] if not dep.startswith("lash_kernels")}


def test_lash_takes_only_the_kernels_public_api():
    # `from lash_kernels import ...`: the names lash_kernels/__init__.py exports, no submodule.
    lash_modules = [m for m in GRAPH if m == "lash" or m.startswith("lash.")]
    assert not {f"{m} -> {dep}" for m in lash_modules for dep in GRAPH[m] if dep.startswith("lash_kernels.")}


def test_models_import_no_routing_nor_generation():
    # routing and generation take a model as an argument; a model never reaches back for them.
    reached, todo = set(), ["lash.models"]
    while todo:
        for dep in GRAPH[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not reached & {"lash.routing", "lash.generation"}, sorted(reached)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "." in m and m != "lash.__main__"))
def test_no_module_is_shadowed_by_a_package_attribute(module):
    parent, _, child = module.rpartition(".")
    before = getattr(_import(parent), child, None)  # None until something imports the submodule
    imported = _import(module)
    assert before in (None, imported) and getattr(_import(parent), child) is imported


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_classes_are_short_enough_to_read(module):
    source = MODULES[module].read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{module} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, f"{module}.{node.name} has {lines} lines (at most {MAX_CLASS_LINES})"
