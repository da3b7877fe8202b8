"""The parts of the import rule that ``lint-imports`` cannot see (docs/adr/0025).

``strata-log`` uses only the engine's public names: no module or name starting with ``_``, and
no ``_attribute`` of an engine module or name. And a compiled private module
(``engine/log/_fastscan``, ...) is imported only inside its own package: import-linter's
private-modules contract reads ``.py`` files only, so it does not know them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources(*packages: str) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield module.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _engine_uses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Each private engine name the module imports or reaches through an engine import."""
    bound: set[str] = set()  # local names bound to an engine module or name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "engine":
            parts = node.module.split(".") if node.module else []
            for alias in node.names:
                if any(_private(p) for p in [*parts, alias.name]):
                    yield node.lineno, f"from {node.module} import {alias.name}"
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "engine":
                    continue
                if any(_private(p) for p in alias.name.split(".")):
                    yield node.lineno, f"import {alias.name}"
                bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            yield node.lineno, f"{node.value.id}.{node.attr}"


def test_the_tools_use_only_public_engine_names() -> None:
    found = [
        f"{module}:{line}: {what}"
        for module, tree in _sources("log_tools")
        for line, what in _engine_uses(tree)
    ]
    assert found == []


def test_the_check_finds_a_private_name_however_it_is_reached() -> None:
    tree = ast.parse(
        "from engine.log import _fastscan\n"
        "from engine.executors.liveness import _describe\n"
        "import engine.log._fastscan\n"
        "from engine.aggregates import operations as ops\n"
        "ops._hidden\n"
        "ops.public\n"
    )
    assert [line for line, _ in _engine_uses(tree)] == [1, 2, 3, 5]


def test_a_compiled_private_module_is_imported_only_inside_its_package() -> None:
    compiled = sorted(
        ".".join((*p.relative_to(ROOT).parts[:-1], p.name.split(".")[0]))
        for p in (ROOT / "engine").rglob("_*.c")
    )
    outside = []
    for module, tree in _sources("engine", "log_tools", "demo"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                for private in compiled:
                    package = private.rsplit(".", 1)[0]
                    if name == private and not (module + ".").startswith(package + "."):
                        outside.append(f"{module}:{node.lineno}: {private}")
    assert outside == []
