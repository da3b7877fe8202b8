"""Shared pytest fixtures for the Strata test suite."""

from __future__ import annotations

import pytest

from engine.log import scan


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--scanner",
        choices=("compiled", "python"),
        default=None,
        help="read logs with this scanner (default: the compiled one when it is built); "
        "`--scanner=python` runs the suite on the pure-Python reference (ADR 0008)",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--scanner")
    if chosen == "python":
        scan.scan_frames = None
    elif chosen == "compiled" and scan.compiled_scan_frames is None:
        raise pytest.UsageError("--scanner=compiled: engine/log/_fastscan is not built")
