"""Fixtures shared by more than one test package, and the suite's `--scanner` option."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.formats.qemu.image_tools import QemuImg
from engine.log import batch, scan
from engine.projections import log_events
from tests.faults.smallfs import SmallFs, skip_reason


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


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., SmallFs]]:
    """Make small loop-mounted filesystems (``small_fs(size_mib=64)``); all unmounted after."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[SmallFs] = []

    def make(size_mib: int = 64) -> SmallFs:
        workdir = tmp_path / f"smallfs{len(made)}"
        workdir.mkdir()
        fs = SmallFs(str(workdir), size_mib)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.destroy()


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
