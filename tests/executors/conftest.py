"""Real localfs repositories in a temporary directory, as one host sees them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.executors.executor_repos import Repo


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    os.mkdir(tmp_path / "repo1")
    r = Repo(str(tmp_path / "repo1"))
    yield r
    r.close()


@pytest.fixture
def repo2(tmp_path: Path, repo: Repo) -> Iterator[Repo]:
    """A second repository, connected on the same host as ``repo``."""
    os.mkdir(tmp_path / "repo2")
    r = Repo(str(tmp_path / "repo2"))
    r.others.append(repo)
    repo.others.append(r)
    yield r
    r.close()
