"""The package's layering, read from its import statements: no import cycles between modules, the method core never
imports the data layer, a model family or the integration, and no code outside the family modules branches on
``model_type``; and the tests' own layering: test modules share code through ``helpers.py`` and fixtures through
``conftest.py``, never by importing one another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .helpers import REPO


PACKAGE = REPO / "aimkp_plugin"
TESTS = REPO / "tests"
LAYERS = {  # package -> packages it must never import
    "aimkp_plugin.method": ("aimkp_plugin.data", "aimkp_plugin.families", "aimkp_plugin.integration"),
    "aimkp_plugin.data": ("aimkp_plugin.method", "aimkp_plugin.families", "aimkp_plugin.integration"),
    "aimkp_plugin.families": ("aimkp_plugin.integration",),
    "aimkp_plugin.models.building": ("aimkp_plugin.method", "aimkp_plugin.families", "aimkp_plugin.integration"),
    "aimkp_plugin.config": ("aimkp_plugin.method", "aimkp_plugin.families", "aimkp_plugin.integration"),
    "aimkp_plugin.checks": ("aimkp_plugin.method", "aimkp_plugin.families", "aimkp_plugin.integration"),
}
STEP_MODULES = ("aimkp_plugin.method.fast_step", "aimkp_plugin.method.step")  # families read the method's interface


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from . import x`` counts as ``package.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    modules = {module_name(file) for file in PACKAGE.rglob("*.py")}
    return {item for item in found if item in modules and item != name}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_cycles() -> None:
    edges = graph()
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node) :] + [node])
            return
        visiting.append(node)
        for target in sorted(edges.get(node, ())):
            if not target.endswith("__init__") and target != node.rsplit(".", 1)[0]:
                visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    assert cycles == []


def test_layers_import_only_downwards() -> None:
    violations = []
    for module, targets in graph().items():
        for layer, forbidden in LAYERS.items():
            if module == layer or module.startswith(layer + "."):
                violations += [(module, target) for target in targets if target.startswith(forbidden)]
    assert violations == []


def test_only_family_modules_branch_on_model_type() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if "model_type ==" in path.read_text() and path.parent.name != "families"
    ]
    assert offenders == []


def test_families_never_import_a_step() -> None:
    """A family describes its model to the steps through ``method.family_interface`` and the method's types; it never
    imports the step modules, which call it."""
    edges = graph()
    violations = [
        (module, target)
        for module, targets in edges.items()
        if module.startswith("aimkp_plugin.families")
        for target in targets
        if target.startswith(STEP_MODULES)
    ]
    assert violations == []


def imported_test_modules(path: Path) -> set[str]:
    """The ``test_*`` modules of the tests package that ``path`` imports, in any form (``from .test_<name> import``,
    ``from . import test_<name>``, ``import tests.test_<name>``), or names as ``tests.test_<name>`` in a string (code
    it runs in a fresh interpreter)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "tests"):
            base = (node.module or "").removeprefix("tests").lstrip(".")
            modules = [base] if base else [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            modules = re.findall(r"\btests\.(test_\w+)", node.value)
        else:
            continue
        found |= {part for module in modules for part in module.split(".") if part.startswith("test_")}
    return found


def test_no_test_module_imports_another() -> None:
    imports = {path.name: imported_test_modules(path) for path in sorted(TESTS.glob("*.py"))}
    assert {name: found for name, found in imports.items() if found} == {}
