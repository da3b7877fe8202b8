"""Fixtures of the live tests: engines on short state dirs whose daemons are always stopped."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from engine import StorageEngine
from engine.formats.qemu.storage_daemon import StorageDaemon

Engines = Callable[..., StorageEngine]


@pytest.fixture
def engines(repo_paths: tuple[str, str]) -> Iterator[Engines]:
    """``engines(host_id, state_dir=None, **kwargs)``: an engine connected to r1 (formatted
    once); each state dir's daemon is stopped and the dir removed at the end, even on failure."""
    state_dirs: list[str] = []
    opened: list[StorageEngine] = []

    def make(host_id: str, state_dir: str | None = None, **kwargs: object) -> StorageEngine:
        if state_dir is None:
            state_dir = tempfile.mkdtemp(prefix="strata-lv-")
            state_dirs.append(state_dir)
        kwargs.setdefault("poll_interval", 0.1)
        se = StorageEngine(host_id, state_dir=state_dir, **kwargs)  # type: ignore[arg-type]
        opened.append(se)
        if len(opened) == 1:
            se.create_storage_repository("localfs-1.0", {"path": repo_paths[0]})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        return se

    try:
        yield make
    finally:
        try:
            for se in opened:
                se.close()
        finally:
            for state_dir in state_dirs:
                try:
                    StorageDaemon(state_dir).stop()
                finally:
                    shutil.rmtree(state_dir, ignore_errors=True)
