"""Shared pytest fixtures for the Strata test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.formats.qemu.image_tools import QemuImg
from engine.log import batch, scan
from engine.projections import log_events


@pytest.fixture
def qemu() -> QemuImg:
    return QemuImg()


@pytest.fixture
def repo_paths(tmp_path: Path) -> tuple[str, str]:
    """Two empty directories to format as repositories."""
    paths = (str(tmp_path / "repo1"), str(tmp_path / "repo2"))
    for p in paths:
        os.mkdir(p)
    return paths


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--scanner",
        choices=("compiled", "python"),
        default=None,
        help="read and frame logs with this code (default: the compiled one when it is built); "
        "`--scanner=python` runs the suite on the pure-Python reference (ADRs 0008, 0011), "
        "and replay makes events without the C loop (ADR 0014)",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--scanner")
    if chosen == "python":
        scan.scan_frames = None
        batch.fast_frame_batch = batch.fast_index_batch = None
        log_events.build_events = None
    elif chosen == "compiled" and scan.compiled_scan_frames is None:
        raise pytest.UsageError("--scanner=compiled: engine/log/_fastscan is not built")
