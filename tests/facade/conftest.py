"""Two real localfs repositories in a temporary directory, and an engine connected to both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine


@pytest.fixture
def engine(tmp_path: Path, repo_paths: tuple[str, str]) -> Iterator[StorageEngine]:
    with StorageEngine("host-a", state_dir=str(tmp_path / "state-a"), poll_interval=0.1) as se:
        for name, path in zip(("r1", "r2"), repo_paths, strict=True):
            se.create_storage_repository("localfs-1.0", {"path": path})
            se.connect_storage_repository(name, "localfs-1.0", {"path": path})
        yield se
