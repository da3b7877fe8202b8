"""Every module says what lives there and what it imports, and what it says is true.

The direction of imports is checked by ``lint-imports`` (docs/adr/0025); this checks that a
newcomer reading a module's docstring is told the truth about its neighbours.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "log_tools", "demo", "strata_server")
MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(name: str) -> str:
    """``engine.projections.view`` -> ``engine.projections``, ``log_tools.verify`` ->
    ``log_tools``: what a docstring names."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" else parts[0]


def imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # ``from engine import validation, StorageEngine``
                names.update(
                    f"{node.module}.{alias.name}"
                    if (ROOT / node.module / alias.name).exists()
                    or (ROOT / node.module / f"{alias.name}.py").exists()
                    else node.module
                    for alias in node.names
                )
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_says_what_lives_there_and_what_it_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc, f"{path}: no docstring saying what lives there"
    assert "Imports:" in doc, f"{path}: the docstring does not say what the module imports"
    if path.name == "__init__.py":
        return  # a package states its rule in words; its modules list their imports
    said = doc[doc.index("Imports:") :]
    own = component(dotted(path)) if dotted(path).count(".") > 1 else dotted(path)
    package = dotted(path).rpartition(".")[0]
    for name in sorted(imported(tree)):
        if name in (own, package) or name.startswith(package + "."):
            continue  # its own package
        wanted = component(name)
        if wanted == component(dotted(path)):
            continue
        assert re.search(rf"\b{re.escape(wanted)}\b", said), (
            f"{path} imports {name}, which its docstring's 'Imports:' does not name ({wanted})"
        )
