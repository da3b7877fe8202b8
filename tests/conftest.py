"""Fixtures shared by more than one test package, and the suite's `--scanner` option."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.log import read_ahead, scan
from tests.facade.images import Engines
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
        help="read logs with this code (default: the compiled one when it is built); "
        "`--scanner=python` turns off every compiled path (the scanner and the read-ahead), "
        "as on a machine without a C compiler (docs/adr/0023)",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--scanner")
    if chosen == "python":
        # The selected paths and the compiled ones themselves, so that the tests comparing
        # the two skip as where nothing is built.
        scan.scan_frames = scan.compiled_scan_frames = None
        read_ahead.compiled_read_frames = read_ahead.compiled_hash_frames = None
    elif chosen == "compiled" and scan.compiled_scan_frames is None:
        raise pytest.UsageError("--scanner=compiled: engine/log/_fastscan is not built")


@pytest.fixture
def state_dir() -> Iterator[Callable[[], str]]:
    """``state_dir()``: a new short state dir (a daemon's Unix socket paths hold 108 bytes);
    at the end, each one's storage daemon is stopped (QMP quit, then its pid killed) and the
    dir removed, even when the test failed."""
    made: list[str] = []

    def make() -> str:
        made.append(tempfile.mkdtemp(prefix="strata-s-"))
        return made[-1]

    try:
        yield make
    finally:
        for directory in made:
            try:
                StorageDaemon(directory).stop()
            finally:
                shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def engines(repo_paths: tuple[str, str], state_dir: Callable[[], str]) -> Iterator[Engines]:
    """``engines(host_id, directory=None, **kwargs)``: an engine connected to r1 (formatted
    once), on a state dir of the ``state_dir`` fixture unless given; closed at the end."""
    opened: list[StorageEngine] = []

    def make(host_id: str, directory: str | None = None, **kwargs: object) -> StorageEngine:
        kwargs.setdefault("poll_interval", 0.1)
        se = StorageEngine(host_id, state_dir=directory or state_dir(), **kwargs)  # type: ignore[arg-type]
        opened.append(se)
        if len(opened) == 1:
            se.create_storage_repository("localfs-1.0", {"path": repo_paths[0]})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        return se

    try:
        yield make
    finally:
        for se in opened:
            se.close()
